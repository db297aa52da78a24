"""Ranks under torchrun (gloo on CPU): same loss curve as one process, resume on any world size,
sharding's memory fit, and the launcher's plan and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from plugins.trainers import distributed
from plugins.trainers.distributed import LaunchPlan, plan_launch, split_batch
from schemas.specs import ServerOffer
from stratosd.api import DataRow, TrainContext
from stratosd.errors import ConfigError, JobFailed, OutOfMemory

STEPS = 12
HALF = 6
ROWS = 32  # a multiple of the global batch: no epoch ends in a padded batch (accelerate's
# even_batches repeats samples to fill the last batch of an epoch on every rank)


def write_dataset(path: Path) -> Path:
    """32 sums, as the synthesis step writes them."""
    rows = [DataRow(example_id=f"{a}-{b}", question=f"{a}+{b}=", answer=str(a + b),
                    reasoning=f"{a}+{b}={a + b}", target=f"{a}+{b}={a + b}\nAnswer: {a + b}",
                    teacher="reference", mode="injection", verified=True)
            for a in range(8) for b in range(4)]
    assert len(rows) == ROWS
    path.write_bytes(b"\n".join(msgspec.json.encode(r) for r in rows) + b"\n")
    return path


def make_ctx(root: Path, data: Path, **kw: Any) -> TrainContext:
    params = {"max_steps": STEPS, "save_steps": HALF, "per_device_train_batch_size": 8,
              "learning_rate": 5e-3, "save_total_limit": 5, "cpu_threads": 1}
    params.update(kw.pop("params", {}))
    return TrainContext(model="config:tiny", train_file=data, out_dir=root / "out",
                        checkpoint_dir=root / "ckpt", params=params, seed=7, **kw)


def curve(metrics: dict[str, Any]) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in metrics["loss_curve"]}


def assert_same_curve(a: dict[int, float], b: dict[int, float], steps: range) -> None:
    for step in steps:
        assert b[step] == pytest.approx(a[step], rel=2e-3), (step, a, b)


# --- plan, batch split, errors (fast) ---------------------------------------------------------

def test_split_batch_keeps_the_global_batch() -> None:
    assert split_batch(8, 1, 2) == (4, 1)
    assert split_batch(4, 4, 8) == (2, 1)
    assert split_batch(3, 4, 2) == (3, 2)
    assert split_batch(6, 1, 4) is None
    for pd, ga, n in ((8, 1, 1), (8, 2, 4), (6, 2, 3), (12, 1, 8), (5, 4, 4)):
        got = split_batch(pd, ga, n)
        if got is not None:
            assert got[0] * got[1] * n == pd * ga


def test_plan_uses_every_gpu_and_one_process_on_cpu() -> None:
    assert plan_launch({}, devices=0) == LaunchPlan(1, "single", "1 rank(s) on no GPU(s) (all)")
    assert plan_launch({}, devices=4).ranks == 4
    assert plan_launch({}, devices=4).strategy == "ddp"
    assert plan_launch({"ranks": 2}, devices=0).strategy == "ddp"  # CPU ranks when asked
    assert plan_launch({"ranks": 2}, devices=4).ranks == 2
    # every device unless the job's global batch does not split among them
    assert plan_launch({"per_device_train_batch_size": 6}, devices=4).ranks == 3
    # a trainer that is not rank-safe runs on one device unless ranks were asked for
    assert plan_launch({}, devices=4, supports_ranks=False).ranks == 1
    with pytest.raises(ConfigError):
        plan_launch({"ranks": 2}, devices=4, supports_ranks=False)
    with pytest.raises(ConfigError) as err:
        plan_launch({"ranks": 8}, devices=4)
    assert err.value.field == "train.ranks"


def test_plan_shards_when_a_replica_does_not_fit_and_keeps_a_sharded_checkpoint_sharded() -> None:
    assert plan_launch({}, devices=4, fits_one_device=False).strategy == "fsdp"
    assert plan_launch({}, devices=4, fits_one_device=True).strategy == "ddp"
    assert plan_launch({}, devices=2, world={"world_size": 2, "strategy": "fsdp"}
                       ).strategy == "fsdp"
    with pytest.raises(ConfigError, match="does not shard"):
        plan_launch({"strategy": "fsdp"}, devices=2, supports_fsdp=False)


def test_fsdp_on_cpu_is_refused_with_the_reason() -> None:
    """accelerate enables FSDP only for multi-GPU process groups: on CPU it would run DDP."""
    with pytest.raises(ConfigError, match="needs GPUs") as err:
        plan_launch({"ranks": 2, "strategy": "fsdp"}, devices=0)
    assert "accelerate" in err.value.message and err.value.field == "train.strategy"


def test_each_rank_takes_its_share_of_the_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from plugins.trainers.hparams import COMMON_PARAMS, resolve_params

    params = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}
    one = resolve_params("full-sft", 10_000, params, COMMON_PARAMS)
    assert (one["per_device_train_batch_size"], one["gradient_accumulation_steps"]) == (8, 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    four = resolve_params("full-sft", 10_000, params, COMMON_PARAMS)
    assert (four["per_device_train_batch_size"], four["gradient_accumulation_steps"]) == (2, 2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="does not divide among 3 ranks"):
        resolve_params("full-sft", 10_000, params, COMMON_PARAMS)


def test_prepare_resume_gives_each_rank_its_rng_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-6"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    for i in range(2):
        (ckpt / f"rng_state_{i}.pth").write_bytes(b"rank%d" % i)
    distributed.prepare_resume(ckpt, 1)
    assert (ckpt / "rng_state.pth").read_bytes() == b"rank0"
    distributed.prepare_resume(tmp_path, 4)  # the newest checkpoint of a directory
    assert (ckpt / "rng_state_1.pth").read_bytes() == b"rank1"  # kept
    assert (ckpt / "rng_state_3.pth").read_bytes() == b"rank0"


def test_a_failed_rank_keeps_its_error_type(tmp_path: Path) -> None:
    (tmp_path / "error-1.json").write_text(json.dumps({
        "rank": 1, "code": "out_of_memory", "message": "CUDA out of memory", "hint": "smaller",
        "detail": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}}))
    (tmp_path / "error-0.json").write_text(json.dumps({
        "rank": 0, "code": "job_failed", "message": "gloo: connection closed", "hint": ""}))
    err = distributed.rank_error(tmp_path, 1, 2)
    assert isinstance(err, OutOfMemory)
    assert err.detail["per_device_train_batch_size"] == 8  # in the job's (global) terms
    (tmp_path / "error-1.json").unlink()
    err2 = distributed.rank_error(tmp_path, 1, 2)
    assert isinstance(err2, JobFailed) and "rank 0 of 2" in err2.message
    assert isinstance(distributed.rank_error(tmp_path / "none", 1, 2), JobFailed)


def test_event_reader_forwards_whole_lines_only(tmp_path: Path) -> None:
    seen: list[Any] = []
    ctx = TrainContext(model="m", train_file=tmp_path, out_dir=tmp_path, checkpoint_dir=tmp_path,
                       params={}, progress=lambda **kw: seen.append(kw),
                       checkpoint=lambda p: seen.append(p))
    reader = distributed._EventReader(tmp_path / "events.jsonl", ctx)
    reader.forward()  # no file yet
    with (tmp_path / "events.jsonl").open("w") as fh:
        fh.write(json.dumps({"kind": "progress", "done": 1, "total": 4}) + "\n")
        fh.write(json.dumps({"kind": "checkpoint", "path": "/x/checkpoint-1"}) + "\n")
        fh.write('{"kind": "progress", "do')  # still being written
    reader.forward()
    assert seen == [{"done": 1, "total": 4}, Path("/x/checkpoint-1")]
    with (tmp_path / "events.jsonl").open("a") as fh:
        fh.write('ne": 2}\n')
    reader.forward()
    assert seen[-1] == {"done": 2}


# --- memory fit per strategy ------------------------------------------------------------------

def test_sharding_fits_a_student_no_single_gpu_holds() -> None:
    from plugins.students.candidates import dims_from_count
    from plugins.students.strategy import best_fit, strategy_fits, strategy_memory

    dims = dims_from_count(13_000_000_000)
    box = ServerOffer(id="box", gpu_model="A100 80GB", gpu_count=8, gpu_mem_mib=81920,
                      ram_mib=1_000_000)
    fits = {f.strategy: f for f in strategy_fits(dims, box, trainer="full-sft", batch=8,
                                                 gradient_checkpointing=True)}
    assert not fits["single"].fits and not fits["ddp"].fits
    assert fits["fsdp"].fits
    assert fits["fsdp"].per_device_mib < fits["single"].per_device_mib / 4
    assert best_fit(fits.values()) == fits["fsdp"]
    # a small student: every device holds a replica, ddp is what the trainer runs
    small = dims_from_count(100_000_000)
    assert best_fit(strategy_fits(small, box, trainer="full-sft")).strategy == "ddp"  # type: ignore[union-attr]
    # more ranks: less memory per device for the sharded state
    assert strategy_memory(dims, "fsdp", 8, trainer="full-sft") < \
        strategy_memory(dims, "fsdp", 2, trainer="full-sft")
    cpu = ServerOffer(id="cpu", ram_mib=64_000)
    assert [f.strategy for f in strategy_fits(small, cpu)] == ["single"]


@pytest.mark.slow
def test_fit_students_says_how_each_student_trains() -> None:
    from plugins.students.strategy import fit_students

    box = ServerOffer(id="box", gpu_model="T4", gpu_count=2, gpu_mem_mib=16384, ram_mib=64_000)
    [c] = fit_students(["config:tiny"], box, trainer="full-sft")
    assert c.fits and c.reason.startswith("fits with ddp over 2 devices")


# --- real ranks (gloo) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run on 1 rank (in-process) and one on 2 ranks (torchrun), same
    global batch 8, each checkpointing at step HALF."""
    pytest.importorskip("trl")
    from stratosd.plugins import get_plugins

    root = tmp_path_factory.mktemp("ranks")
    data = write_dataset(root / "data.jsonl")
    cls = get_plugins().trainers.get("full-sft")
    one = cls().train(make_ctx(root / "one", data))
    plan = plan_launch({"ranks": 2}, devices=0)
    uploaded: list[Path] = []
    two = distributed.launch("full-sft", make_ctx(root / "two", data, checkpoint=uploaded.append,
                                                  params={"ranks": 2}), plan, threads=1)
    return {"root": root, "data": data, "one": one, "two": two, "uploaded": uploaded}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_follow_the_one_rank_loss_curve(runs: dict[str, Any]) -> None:
    one, two = runs["one"], runs["two"]
    assert two["ranks"] == 2 and two["strategy"] == "ddp" and two["steps"] == STEPS
    assert_same_curve(curve(one), curve(two), range(1, STEPS + 1))
    assert two["train_tokens"] == one["train_tokens"]  # gathered over the ranks
    # rank 0 reported checkpoints, each records the world that wrote it
    assert [p.name for p in runs["uploaded"]] == [f"checkpoint-{HALF}", f"checkpoint-{STEPS}"]
    world = json.loads((runs["uploaded"][0] / distributed.WORLD_FILE).read_text())
    assert world == {"world_size": 2, "strategy": "ddp"}
    # the saved model loads into one process
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(runs["root"] / "two" / "out"))
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_two_rank_checkpoint_resumes_on_one_rank(runs: dict[str, Any]) -> None:
    from stratosd.plugins import get_plugins

    ckpt = runs["uploaded"][0]
    distributed.prepare_resume(ckpt, 1)  # what the train step does before an in-process run
    resumed = get_plugins().trainers.get("full-sft")().train(
        make_ctx(runs["root"] / "resumed-1", runs["data"], resume_from=ckpt))
    assert resumed["resumed_from"].endswith(f"checkpoint-{HALF}")
    assert_same_curve(curve(runs["one"]), curve(resumed), range(HALF + 1, STEPS + 1))
    assert_same_curve(curve(runs["two"]), curve(resumed), range(HALF + 1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_one_rank_checkpoint_resumes_on_two_ranks(runs: dict[str, Any]) -> None:
    ckpt = runs["root"] / "one" / "ckpt" / f"checkpoint-{HALF}"
    plan = plan_launch({"ranks": 2}, devices=0)
    resumed = distributed.launch("full-sft", make_ctx(runs["root"] / "resumed-2", runs["data"],
                                                      resume_from=ckpt), plan, threads=1)
    assert resumed["ranks"] == 2 and resumed["resumed_from"].endswith(f"checkpoint-{HALF}")
    assert_same_curve(curve(runs["one"]), curve(resumed), range(HALF + 1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_fsdp_two_ranks_train_and_the_checkpoint_loads_into_one_process(tmp_path: Path) -> None:
    """FSDP needs GPUs here (see test_fsdp_on_cpu_is_refused_with_the_reason)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("FSDP runs on GPUs only: accelerate 1.16 ignores its FSDP plugin for CPU "
                    "(gloo) process groups; this host has fewer than 2 CUDA devices")
    from transformers import AutoModelForCausalLM

    data = write_dataset(tmp_path / "data.jsonl")
    plan = plan_launch({"ranks": 2, "strategy": "fsdp"}, devices=torch.cuda.device_count())
    got = distributed.launch("full-sft", make_ctx(tmp_path, data, params={
        "ranks": 2, "strategy": "fsdp"}), plan)
    assert got["strategy"] == "fsdp" and got["steps"] == STEPS
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert sum(p.numel() for p in model.parameters()) > 0
