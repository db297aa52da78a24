"""Student sizing, memory fit, the capacity pre-screen and the prescreen step."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from agents.stepctx import StepContext
from schemas.specs import ServerOffer, StudentCandidate, StudentSpec, TaskSpec
from stratosd.plugins import get_plugins
from tests.memprobe import HAVE_PROCFS, peak_train_mib

ROOT = Path(__file__).resolve().parents[2]
BIG = "config:base?hidden_size=4096&intermediate_size=11008&num_hidden_layers=32&num_attention_heads=32&num_key_value_heads=32"  # noqa: E501 - a 7B Llama shape
SHALLOW = "config:tiny?num_hidden_layers=1"
MAHJONG = {"name": "mahjong-winning-tiles",
           "params": {"difficulty": 1, "n_train": 24, "n_test": 4}}

GPU_2G = ServerOffer(id="small-gpu", gpu_count=1, gpu_mem_mib=2048, ram_mib=16384)
CPU_ONLY = ServerOffer(id="cpu", gpu_count=0, ram_mib=8192)


def test_param_count_reads_config_without_weights() -> None:
    from plugins.models.hf import load_model
    from plugins.students.candidates import model_dims, param_count

    model, _ = load_model("config:tiny")
    assert param_count("config:tiny") == sum(p.numel() for p in model.parameters())
    big = model_dims(BIG)  # meta device: no 27 GB allocation
    assert 6.4e9 < big.n_params < 7e9 and big.layers == 32


def test_estimate_parts_behave() -> None:
    from plugins.students.candidates import estimate_memory, model_dims

    d = model_dims(BIG)
    lora = estimate_memory(d, trainer="lora-sft", seq_len=512, batch_size=4, lora_r=16,
                           dtype_bytes=2)
    full = estimate_memory(d, trainer="full-sft", seq_len=512, batch_size=4, dtype_bytes=2)
    ckpt = estimate_memory(d, trainer="lora-sft", seq_len=512, batch_size=4, dtype_bytes=2,
                           gradient_checkpointing=True)
    assert lora["weights_mib"] == pytest.approx(d.n_params * 2 / 2**20, rel=0.01)
    # full SFT keeps fp32 master weights under bf16 autocast (plugins.trainers.precision)
    assert full["weights_mib"] == pytest.approx(d.n_params * 4 / 2**20, rel=0.01)
    assert lora["optimizer_grad_mib"] < full["optimizer_grad_mib"] / 50
    assert ckpt["activations_mib"] < lora["activations_mib"] / 5
    assert lora["serve_mib"] < lora["train_mib"] < full["train_mib"]
    # A bare parameter count works too (shape guessed).
    assert estimate_memory(1_000_000_000)["train_mib"] > 0


def test_fit_explains_why_a_student_does_not_fit() -> None:
    from plugins.students.candidates import fit

    tiny, big = fit([StudentSpec(model="config:tiny"), StudentSpec(model=BIG)], GPU_2G)
    assert tiny.fits and tiny.kept and tiny.est_train_mem_mib > 0
    assert not big.fits and not big.kept
    assert "to train, server has 2,048 MiB GPU memory" in big.reason
    assert big.reason.startswith("needs ")
    (cpu_big,) = fit([BIG], CPU_ONLY, trainer="full-sft")
    assert not cpu_big.fits and "8,192 MiB RAM (no GPU)" in cpu_big.reason


def test_fit_reports_unsizable_student() -> None:
    from plugins.students.candidates import fit

    (c,) = fit(["config:nope"], CPU_ONLY)
    assert not c.fits and "cannot size config:nope" in c.reason


def test_choose_prefers_accuracy_then_loss_drop_then_size() -> None:
    from plugins.students.candidates import choose

    a = StudentCandidate(model="a", params_m=3.0, prescreen_accuracy=0.5, probe_loss_drop=0.1)
    b = StudentCandidate(model="b", params_m=1.0, prescreen_accuracy=0.5, probe_loss_drop=0.1)
    c = StudentCandidate(model="c", params_m=1.0, prescreen_accuracy=0.5, probe_loss_drop=0.3)
    d = StudentCandidate(model="d", params_m=9.0, prescreen_accuracy=0.9, kept=False)
    assert choose([a, b]).model == "b"  # type: ignore[union-attr]
    assert choose([a, b, c]).model == "c"  # type: ignore[union-attr]
    assert choose([a, b, c, d]).model == "c"  # type: ignore[union-attr]
    assert choose([d]) is None


def test_student_candidates_hook_is_empty() -> None:
    offer = CPU_ONLY
    assert get_plugins().student_candidates(TaskSpec(name="gsm8k"), offer) == []


def test_few_shot_prompt_uses_training_format() -> None:
    from plugins.students.candidates import SHOT_SEPARATOR, few_shot_prompt, reference_shots

    task = get_plugins().task(MAHJONG["name"], MAHJONG["params"])
    shots = reference_shots(task, 2)
    q = task.examples("train")[5].question
    prompt = few_shot_prompt(task, shots, q)
    parts = prompt.split(SHOT_SEPARATOR)
    assert parts[-1] == task.prompt(q)
    assert parts[0] == task.prompt(shots[0].question) + task.format_target(
        shots[0].reasoning, shots[0].answer)


# --- memory estimate against a measurement ------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not HAVE_PROCFS, reason="needs Linux procfs")
@pytest.mark.parametrize("ref", [
    "config:base",  # 3.6M params
    "config:base?hidden_size=384&intermediate_size=1024&num_hidden_layers=8",  # 12M params
])
@pytest.mark.parametrize("trainer", ["full-sft", "lora-sft"])
def test_estimate_within_30_percent_of_measured_cpu_peak(ref: str, trainer: str) -> None:
    """Measured: peak RSS delta (VmHWM) of model build + 2 training steps, fp32 on CPU."""
    from plugins.students.candidates import estimate_memory, model_dims

    seq, batch, r = 128, 8, 8
    measured = peak_train_mib(ref, trainer=trainer, seq=seq, batch=batch, r=r)
    est = estimate_memory(model_dims(ref), trainer=trainer, seq_len=seq, batch_size=batch,
                          lora_r=r, dtype_bytes=4)["train_mib"]
    assert abs(est - measured) / measured < 0.30, (est, measured)


# --- pre-screen ---------------------------------------------------------------------------------


def _rows(task: object, n: int, path: Path) -> Path:
    from stratosd.api import DataRow

    rows = []
    for ex in task.examples("train")[:n]:  # type: ignore[attr-defined]
        r = task.reference_reasoning(ex.question, ex.answer)  # type: ignore[attr-defined]
        rows.append(DataRow(example_id=ex.id, question=ex.question, answer=ex.answer,
                            reasoning=r, target=task.format_target(r, ex.answer),  # type: ignore[attr-defined]
                            teacher="reference", mode="injection", verified=True))
    path.write_bytes(b"\n".join(msgspec.json.encode(x) for x in rows) + b"\n")
    return path


@pytest.mark.slow
def test_prescreen_step_drops_what_does_not_fit_and_probes_the_rest(tmp_path: Path) -> None:
    from agents.steps import prescreen

    ctx = StepContext(
        job_id="j1", run_id="r1", step="prescreen", workdir=tmp_path / "w", inputs={},
        min_interval_s=0.0,
        args={"task": MAHJONG, "offer": msgspec.to_builtins(GPU_2G),
              "students": [{"model": "config:tiny"}, {"model": SHALLOW}, {"model": BIG}],
              "sample_size": 2, "n_shots": 1, "probe_steps": 3,
              "train": {"max_length": 256, "per_device_train_batch_size": 4}})
    result = prescreen.run(ctx)
    json.dumps(result)
    cands = {c["model"]: c for c in result["candidates"]}
    assert not cands[BIG]["fits"] and "to train, server has 2,048 MiB" in cands[BIG]["reason"]
    for ref in ("config:tiny", SHALLOW):
        c = cands[ref]
        assert c["kept"] and c["prescreen_accuracy"] is not None
        assert c["probe_loss_drop"] is not None and c["probe_loss_drop"] > 0
        assert "pre-screen" in c["reason"] and "probe loss drop" in c["reason"]
    assert result["chosen"] in ("config:tiny", SHALLOW)
    assert result["chosen"] in result["reason"]


@pytest.mark.slow
def test_prescreen_threshold_drops_everyone_and_says_why(tmp_path: Path) -> None:
    from agents.steps import prescreen

    ctx = StepContext(
        job_id="j1", run_id="r1", step="prescreen", workdir=tmp_path / "w", inputs={},
        args={"task": MAHJONG, "offer": msgspec.to_builtins(CPU_ONLY),
              "students": [{"model": "config:tiny"}], "sample_size": 2, "n_shots": 1,
              "min_accuracy": 0.5})
    result = prescreen.run(ctx)
    (c,) = result["candidates"]
    assert not c["kept"] and "min_accuracy" in c["reason"]
    assert result["chosen"] is None and result["reason"].startswith("no student kept")


@pytest.mark.slow
def test_prescreen_accuracy_rises_after_training(tmp_path: Path) -> None:
    """The pre-screen measures what a model can do: a fine-tuned student scores higher."""
    from plugins.students.candidates import prescreen_accuracy
    from plugins.trainers.sft import FullSFTTrainer
    from stratosd.api import Example, TrainContext

    from .test_trainers import AddTask, write_rows  # type: ignore[import-not-found]

    task = AddTask()
    examples = task.examples("train")
    data = write_rows(tmp_path / "d.jsonl", task, examples)
    FullSFTTrainer().train(TrainContext(
        model="config:tiny", train_file=data, out_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ck", task=task,
        params={"max_steps": 100, "learning_rate": 3e-3, "per_device_train_batch_size": 16,
                "save_steps": 1000}))
    sample: list[Example] = examples[::5]
    before = prescreen_accuracy("config:tiny", task, [], sample, max_new_tokens=3)
    after = prescreen_accuracy(str(tmp_path / "out"), task, [], sample, max_new_tokens=3)
    assert after["accuracy"] >= before["accuracy"] + 0.3


def test_prescreen_step_argument_errors(tmp_path: Path) -> None:
    from agents.steps import prescreen
    from stratosd.errors import ConfigError

    ctx = StepContext(job_id="j", run_id="r", step="prescreen", workdir=tmp_path, inputs={},
                      args={"task": MAHJONG, "students": [], "offer": {"id": "x"}, "bogus": 1})
    with pytest.raises(ConfigError) as err:
        prescreen.run(ctx)
    assert err.value.field == "args.bogus"
    ctx.args.pop("bogus")
    with pytest.raises(ConfigError) as err:
        prescreen.run(ctx)
    assert err.value.field == "args.students"
