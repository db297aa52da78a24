"""The cost model: work from the job, speeds from measurements, learned efficiency, budgets."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas import subjects
from schemas.base import to_builtins
from schemas.commands import RunInfo
from schemas.specs import RunSpec, ServerOffer
from schemas.telemetry import Capacity
from stratosd.costmodel import JobCosting
from stratosd.costmodel.costs import CostModel
from stratosd.costmodel.learn import EfficiencyBook, posterior
from stratosd.costmodel.model import train_loop_prior_s
from stratosd.costmodel.work import estimate_work, model_shape
from stratosd.errors import ConfigError
from stratosd.plugins import Plugins
from stratosd.validate import parse_spec_toml
from tests.conftest import ROOT

DEMO = ROOT / "examples" / "mahjong-demo.toml"
CPU = ServerOffer(id="cpu", agent_id="cpu", cpu_count=2, price_usd_per_hour=0.4,
                  latency_ms=1.0)


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return Plugins()


def spec(**over: Any) -> RunSpec:
    data = msgspec.to_builtins(parse_spec_toml(DEMO))
    data.update(over)
    return msgspec.convert(data, RunSpec)


def test_student_size_from_config_matches_the_real_model() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from plugins.models.tiny import config_class, model_config_dict, parse_config_ref

    for ref in ("config:tiny", "config:small", "config:base", "config:qwen2-tiny",
                "config:qwen2-small-tied", "config:llama3-tiny", "config:llama3-base-tied"):
        name, over = parse_config_ref(ref)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config_class(name)(**model_config_dict(name, over)))
        real = sum(p.numel() for p in model.parameters())
        assert model_shape(ref).params == real, ref
    assert model_shape("config:qwen2-tiny").tokens_per_char < 1.0  # BPE, not char-level


def test_student_size_from_a_local_dir_and_from_a_hub_name(tmp_path: Path) -> None:
    # a Qwen2.5-0.5B-shaped config.json, as the hub ships it (tied embeddings)
    cfg = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
           "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
           "vocab_size": 151936, "tie_word_embeddings": True, "model_type": "qwen2"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = model_shape(str(tmp_path))
    # Qwen2.5-0.5B has 494M parameters (without q/k/v biases, which this count leaves out)
    assert shape.params == pytest.approx(494e6, rel=0.01)
    assert model_shape("Qwen/Qwen2.5-7B-Instruct").params == 7e9
    with pytest.raises(ConfigError, match="cannot tell the size") as exc:
        model_shape("someone/mystery-model")
    assert exc.value.field == "students"


def test_training_work_comes_from_the_job(plugins: Plugins) -> None:
    # the demo job with the char-level student and step count this test's figures are for
    char = [{"model": "config:small"}]
    train = msgspec.to_builtins(parse_spec_toml(DEMO))["train"]
    s = spec(students=char, train={**train, "max_steps": 400})
    w = estimate_work(s, plugins)
    row = w.seq_tokens
    assert w.train_steps == 400
    assert w.train_tokens == pytest.approx(400 * 16 * row)  # max_steps x batch x row length
    assert 100 < row < 512  # prompt + reference reasoning of a level-1 hand, char-level
    assert w.student == "config:small" and w.trainer == "full-sft"
    assert w.trainable_params == w.params
    assert w.eval_prompts == 2 * 40 and w.teacher_local
    assert "task's training data" in w.notes["row_length"]
    lora = estimate_work(spec(trainer="lora-sft", students=char), plugins)
    assert lora.trainable_params < lora.params / 5
    # rows kept by synthesis and their measured length refine it
    fewer = estimate_work(spec(train={"num_train_epochs": 2, "max_steps": -1}, students=char),
                          plugins, rows=100, row_chars=150.0)
    # char-level: one token per character + the eos the trainer appends
    assert fewer.train_tokens == pytest.approx(100 * 2 * (150.0 + 1))


def test_grpo_warm_start_sft_is_training_work(plugins: Plugins, tmp_path: Path) -> None:
    from stratosd.costmodel.capacity import job_threads, offer_speed
    from stratosd.costmodel.model import (
        TRAIN_STEP_OVERHEAD_S,
        rollout_s,
        train_flops,
        train_loop_prior_s,
    )

    char = [{"model": "config:small"}]  # char-level: a 150-char row is 151 tokens (eos)
    train = {**msgspec.to_builtins(parse_spec_toml(DEMO))["train"], "max_steps": 20}

    def work(**over: Any) -> Any:
        s = spec(trainer="grpo", students=char, train={**train, **over})
        return estimate_work(s, plugins, rows=100, row_chars=150.0)

    auto, none = work(), work(warm_start="none")
    # one pass over the 100 rows at the job's batch (16, shared with the SFT phase)
    assert auto.warm_start_tokens == pytest.approx(100 * 151) and auto.warm_start_steps == 7
    assert none.warm_start_tokens == 0 and none.warm_start_steps == 0
    assert auto.train_tokens == none.train_tokens and auto.train_steps == none.train_steps
    per_token = train_flops(none) / none.train_tokens
    assert train_flops(auto) - train_flops(none) == pytest.approx(100 * 151 * per_token)
    gen = rollout_s(none, offer_speed(CPU, job_threads(CPU, True)), "cpu")
    assert gen > 0  # the loop includes GRPO's generation
    rate = train_flops(none) / (train_loop_prior_s(none, CPU) - gen
                                - none.train_steps * TRAIN_STEP_OVERHEAD_S["cpu"])
    assert train_loop_prior_s(auto, CPU) == pytest.approx(
        train_flops(auto) / rate + (20 + 7) * TRAIN_STEP_OVERHEAD_S["cpu"] + gen)
    assert "SFT warm start" in auto.notes["warm_start"] and "100 rows" in auto.notes["warm_start"]
    assert "none" in none.notes["warm_start"]
    with_sft, without = (next(p for p in JobCosting(w).estimate(CPU).phases
                              if p.phase == "train") for w in (auto, none))
    assert with_sft.seconds.value > without.seconds.value
    assert "SFT warm start" in with_sft.basis
    # sft_steps x batch x row; LoRA warm start (lora_r > 0) likewise; a given start: none
    steps = work(sft_steps=5, lora_r=4)
    assert steps.warm_start_tokens == pytest.approx(5 * 16 * 151)
    assert steps.warm_start_steps == 5 and "lora-sft" in steps.notes["warm_start"]
    assert work(warm_start=str(tmp_path)).warm_start_tokens == 0
    sft = estimate_work(spec(students=char), plugins)  # other trainers have no warm start
    assert sft.warm_start_tokens == 0 and "warm_start" not in sft.notes


def test_row_length_is_counted_with_the_students_tokenizer_and_chat_template(
        plugins: Plugins) -> None:
    from plugins.models import prompting
    from plugins.models.bpe import load_tokenizer

    # the demo's BPE student: ChatML wrapper + Qwen's default system message on every row
    student = "config:qwen2-tiny?vocab_size=512"
    s = parse_spec_toml(DEMO)
    w = estimate_work(s, plugins, student=student)
    task = plugins.task(s.task.name, dict(s.task.params))
    tok = load_tokenizer("qwen2", 512)
    lengths = [len(prompting.encode_example(
        tok, prompting.task_messages(task, e.question),
        task.format_target(task.reference_reasoning(e.question, e.answer) or "", e.answer))
        ["input_ids"]) for e in task.examples("train")]
    real = sum(lengths) / len(lengths)
    assert w.seq_tokens == pytest.approx(real, rel=0.05)  # every row, as the trainer encodes
    assert "chat template" in w.notes["tokens"]
    # a hub id that is not in the local cache: the prior, and the notes say so
    hub = estimate_work(spec(students=[{"model": "someone/Tiny-0.5B"}]), plugins)
    assert "prior" in hub.notes["tokens"] and "not on this machine" in hub.notes["tokens"]


def test_api_teacher_needs_a_price(plugins: Plugins) -> None:
    teacher = {"backend": "openai", "model": "my-private-model", "api_key_env": "X"}
    s = spec(teachers=[{"backend": "openai", "model": "my-private-model"}])
    with pytest.raises(ConfigError, match="no known price") as exc:
        estimate_work(s, plugins)
    assert exc.value.field == "teachers" and "price_in_per_mtok" in exc.value.hint
    del teacher
    priced = spec(teachers=[{"backend": "openai", "model": "my-private-model",
                             "params": {"price_in_per_mtok": 1.0, "price_out_per_mtok": 4.0}}])
    w = estimate_work(priced, plugins)
    assert not w.teacher_local and w.teacher_usd is not None and w.teacher_usd.value > 0
    known = estimate_work(spec(teachers=[{"backend": "openai", "model": "gpt-4o-mini"}]),
                          plugins)
    costing = JobCosting(known)
    assert costing.columns([CPU]).total_usd[0] == pytest.approx(
        costing.columns([CPU]).server_usd[0] + known.teacher_usd.value)  # type: ignore[union-attr]


def test_devices_the_trainer_does_not_use_are_not_credited(plugins: Plugins) -> None:
    one_rank = spec()
    w = estimate_work(spec(train={**one_rank.train, "ranks": 1}), plugins)  # it uses one
    one = ServerOffer(id="1", gpu_model="H100", gpu_count=1, gpu_mem_mib=81920,
                      price_usd_per_hour=2.0)
    eight = msgspec.structs.replace(one, id="8", gpu_count=8, price_usd_per_hour=16.0)
    cols = JobCosting(w).columns([one, eight])
    assert cols.hardware[0] == cols.hardware[1]  # one device trains either way
    assert cols.seconds[0] == pytest.approx(cols.seconds[1])
    assert cols.total_usd[1] == pytest.approx(8 * cols.total_usd[0])


def test_measured_capacity_replaces_the_table(plugins: Plugins) -> None:
    w = estimate_work(spec(), plugins)
    cap = Capacity(device="cpu", threads=2, job_threads=2, matmul_tflops={"fp32": 0.2},
                   mem_bw_gbps=8.0, disk_write_mbps=300.0, upload_mbps=50.0)
    fast = msgspec.structs.replace(CPU, id="fast", capacity=cap)
    slow_cap = msgspec.structs.replace(cap, matmul_tflops={"fp32": 0.05})
    slow = msgspec.structs.replace(CPU, id="slow", capacity=slow_cap)
    costing = JobCosting(w)
    cols = costing.columns([CPU, fast, slow])
    assert list(cols.measured) == [False, True, True]
    assert cols.hardware[1] == pytest.approx(0.2) and cols.hardware[2] == pytest.approx(0.05)
    assert cols.seconds[2] > cols.seconds[1]
    est = costing.estimate(fast)
    assert est.capacity_source == "measured"
    assert {p.phase for p in est.phases} >= {"train", "evaluate", "synthesis"}
    train = next(p for p in est.phases if p.phase == "train")
    assert train.seconds.source == "prior" and train.seconds.low < train.seconds.value \
        < train.seconds.high
    assert "FLOPs" in train.basis and "measured" in train.basis


def test_efficiency_is_learned_and_narrows(plugins: Plugins) -> None:
    book = EfficiencyBook()
    k = "cpu-1t.lt10M.full-sft.train"
    first = posterior(book.records.get(k))
    assert first.factor == 1.0 and first.n == 0
    book.observe(k, prior_s=100.0, measured_s=180.0)
    one = book.correction(k)
    assert 1.6 < one.factor < 1.8  # most of the way to 1.8 after one run
    assert one.ratio < first.ratio  # and the interval narrowed
    for measured in (175.0, 185.0, 178.0):
        book.observe(k, prior_s=100.0, measured_s=measured)
    four = book.correction(k)
    assert four.factor == pytest.approx(1.79, rel=0.03) and four.n == 4
    assert four.ratio < one.ratio
    w = estimate_work(spec(), plugins)
    before = JobCosting(w).estimate(CPU)
    after = JobCosting(w, EfficiencyBook({"cpu-1t.lt10M.full-sft.train": book.records[k]}))
    est = after.estimate(CPU)
    t0 = next(p for p in before.phases if p.phase == "train").seconds
    t1 = next(p for p in est.phases if p.phase == "train").seconds
    assert t1.source == "calibrated" and t1.n == 4
    assert t1.value == pytest.approx(t0.value * four.factor)


async def test_learned_efficiency_survives_in_kv(daemon: Any) -> None:
    book = daemon.costs.book
    book.observe("cpu-2t.lt10M.lora-sft.train", 10.0, 20.0)
    await daemon.costs.save(daemon.bus, ["cpu-2t.lt10M.lora-sft.train"])
    fresh = EfficiencyBook()
    await fresh.load(daemon.bus)
    got = fresh.correction("cpu-2t.lt10M.lora-sft.train")
    assert got.n == 1 and got.factor > 1.5
    kv = await daemon.bus.kv(subjects.COSTMODEL_BUCKET)
    assert "cpu-2t.lt10M.lora-sft.train" in await kv.keys()


def test_a_given_training_time_far_from_the_model_is_refused(plugins: Plugins) -> None:
    costs = CostModel(plugins)
    with pytest.raises(ConfigError, match="disagrees with the cost model") as exc:
        costs.check_given(spec(est_train_hours=50.0), [CPU])
    assert exc.value.field == "est_train_hours" and "--force" in exc.value.hint
    costs.check_given(spec(est_train_hours=50.0), [CPU], force=True)
    costs.check_given(spec(), [CPU])  # no override: nothing to check


def _run(s: RunSpec, results: dict[str, Any]) -> RunInfo:
    now = datetime.now(UTC)
    return RunInfo(run_id="01jcostmodeltest0000000000", name=s.name, state="running",
                   stage="train", created=now, updated=now, spec=s, results=results)


def test_a_job_that_deploys_nothing_has_no_deploy_phase_and_learns_none(
        plugins: Plugins) -> None:
    costs = CostModel(plugins)
    s = spec(deploy=False)
    phases = {p.phase for p in costs.costing(s).estimate(CPU).phases}
    assert "deploy" not in phases and "train" in phases
    run = _run(s, {})
    assert costs.stage_cost(run, "deploy", CPU, 0.002, {"skipped": True}) is None
    assert costs.book.records == {}  # a skipped deploy teaches nothing


def test_budget_counts_every_phase_and_what_was_spent(plugins: Plugins) -> None:
    costs = CostModel(plugins)
    s = spec()
    full = costs.costing(s).estimate(CPU)
    assert full.usd is not None and full.seconds is not None
    by_phase = sum(p.usd.value for p in full.phases)
    assert full.usd.value == pytest.approx(by_phase)  # one budget: the sum of all phases
    run = _run(s, {"select_server": {}, "probe_teachers": {"cost": _paid("probe", 0.5)},
                   "select_student": {"cost": _paid("prescreen", 0.25)}})
    assert costs.spent_usd(run) == pytest.approx(0.75)
    rest = costs.remaining(run, "choose_strategy", CPU)
    assert rest is not None
    later = {p.phase for p in costs.costing(s, phases=("synthesis", "train", "evaluate",
                                                         "deploy")).estimate(CPU).phases}
    assert later == {"synthesis", "train", "evaluate", "deploy"}
    assert 0 < rest.value < full.usd.value


def _paid(phase: str, usd: float) -> dict[str, Any]:
    return {"phase": phase, "server": CPU.id, "measured_s": 1.0, "measured_usd": usd}


async def test_budget_check_stops_a_run_that_would_overspend(daemon: Any) -> None:
    from stratosd.stages import budget_check

    s = spec(constraints={"budget_usd": 0.01, "target_accuracy": 0.0})
    chosen = to_builtins(CPU)
    run = _run(s, {"select_server": {"selection": {"selector": "pfg", "chosen": chosen},
                                     "agent_id": CPU.agent_id},
                   "probe_teachers": {"cost": _paid("probe", 0.009)}})
    verdict = await budget_check(run, "synthesize", daemon.pipeline.services)
    assert verdict is not None
    assert verdict.spent_usd == pytest.approx(0.009) and verdict.next_usd > 0.001
    assert "would be exceeded" in verdict.message and "synthesize" in verdict.message
    roomy = _run(msgspec.structs.replace(
        s, constraints=msgspec.structs.replace(s.constraints, budget_usd=1000.0)), run.results)
    assert await budget_check(roomy, "synthesize", daemon.pipeline.services) is None


async def test_submit_refuses_a_job_whose_estimate_breaks_the_budget(
        daemon: Any, nats_url: str, tmp_path: Path, users_url: str) -> None:
    import asyncio

    from tests.conftest import start_agent, wait_latency_known

    a, task = await start_agent(nats_url, tmp_path, "cpu-1", price=0.4, calibrate=False,
                                probe_url=[f"users={users_url}"])
    try:
        await wait_latency_known(daemon, "cpu-1")
        data = msgspec.to_builtins(spec(constraints={"budget_usd": 0.0001,
                                                     "max_latency_ms": 500}))
        body = json.dumps({"type": "submit_run", "spec": data}).encode()
        msg = await daemon.bus.nc.request(subjects.daemon_cmd("submit"), body, timeout=20)
        reply = json.loads(msg.data)
        assert reply["code"] == "infeasible" and reply["field"] == "constraints.budget_usd"
        assert "budget $0.00 too low" in reply["message"] and "cpu-1" in reply["message"]
        cost = float(reply["message"].split("costs $")[1].split(" ")[0])
        assert math.isfinite(cost) and cost > 0.0001
        runs = await daemon.store.list()
        assert runs == []  # nothing was started
    finally:
        a.stop()
        await asyncio.wait_for(task, 30)


def test_grpo_loop_record_counts_the_warm_start_it_estimates(plugins: Plugins) -> None:
    # the loop estimate includes the SFT warm start; GRPO times it apart from train_time_s
    costs = CostModel(plugins)
    s = spec(trainer="grpo")
    run = _run(s, {})
    prior = train_loop_prior_s(costs.work(s, run), CPU)
    got = costs.stage_cost(run, "train", CPU, 2 * prior + 30.0,
                           {"train_time_s": prior, "warm_start": {"train_time_s": prior}})
    assert got is not None
    loop = [v for k, v in costs.book.records.items() if k.endswith(".loop")]
    assert len(loop) == 1 and loop[0].n == 1
    assert loop[0].mean == pytest.approx(math.log(2.0), rel=1e-6)  # measured = 2 x the prior


def test_grpo_rollouts_decode_a_steps_completions_together(plugins: Plugins) -> None:
    from stratosd.costmodel.capacity import job_threads, offer_speed
    from stratosd.costmodel.model import rollout_s

    char = [{"model": "config:small"}]

    def work(batch: int) -> Any:
        train = {"max_steps": 10, "per_device_train_batch_size": batch,
                 "max_completion_length": 24, "warm_start": "none"}
        return estimate_work(spec(trainer="grpo", students=char, train=train), plugins)

    w8, w16 = work(8), work(16)
    assert (w16.rollout_batch, w16.rollout_length) == (16, 24)
    assert w16.rollout_tokens == 10 * 16 * 24 == 2 * w8.rollout_tokens
    sp = offer_speed(CPU, job_threads(CPU, True))
    # twice the completions per step, decoded together: about the same time, not twice it
    assert rollout_s(w16, sp, "cpu") < 1.5 * rollout_s(w8, sp, "cpu")
