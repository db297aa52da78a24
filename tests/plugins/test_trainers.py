"""Trainer plugins and the train step: params, datasets, learning, progress, outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

from agents.stepctx import StepContext
from stratosd.api import DataRow, Example, Split, TaskPack, TrainContext
from stratosd.errors import ConfigError
from stratosd.plugins import get_plugins


class AddTask(TaskPack):
    """Sums of two digits: small enough that a tiny model learns it in seconds."""

    name: ClassVar[str] = "test-add"

    def examples(self, split: Split) -> list[Example]:
        return [Example(id=f"{a}{b}", question=f"{a}+{b}", answer=str(a + b))
                for a in range(10) for b in range(10)]

    def prompt(self, question: str) -> str:
        return question + "="

    def format_target(self, reasoning: str, answer: str) -> str:
        return answer

    def extract(self, output: str) -> str | None:
        return output.strip().split("\n")[0] or None

    def score(self, predicted: str | None, gold: str) -> float:
        return float(predicted == gold)

    def verify(self, question: str, reasoning: str, answer: str) -> bool | None:
        return self.extract(reasoning) == answer


def write_rows(path: Path, task: TaskPack, examples: list[Example]) -> Path:
    rows = []
    for ex in examples:
        reasoning = task.reference_reasoning(ex.question, ex.answer) or ""
        rows.append(DataRow(example_id=ex.id, question=ex.question, answer=ex.answer,
                            reasoning=reasoning, target=task.format_target(reasoning, ex.answer),
                            teacher="reference", mode="injection", verified=True))
    path.write_bytes(b"\n".join(msgspec.json.encode(r) for r in rows) + b"\n")
    return path


def accuracy(ref: str, task: TaskPack, examples: list[Example]) -> float:
    import torch

    from plugins.models.hf import load_model
    from plugins.models.prompting import generate_chat, task_messages

    model, tok = load_model(ref)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add contention
    try:  # in the student's prompt format, as served (plain prompt for config:tiny)
        outs = generate_chat(model, tok, [task_messages(task, e.question) for e in examples],
                             max_new_tokens=4)
    finally:
        torch.set_num_threads(threads)
    return sum(task.score(task.extract(o.text), e.answer)
               for o, e in zip(outs, examples, strict=True)) / len(examples)


def ctx_for(tmp_path: Path, data: Path, task: TaskPack | None, params: dict[str, Any],
            model: str = "config:tiny", **kw: Any) -> TrainContext:
    return TrainContext(model=model, train_file=data, out_dir=tmp_path / "out",
                        checkpoint_dir=tmp_path / "ckpt", params=params, task=task, **kw)


# --- fast -------------------------------------------------------------------------------------


def test_builtin_trainers_are_registered() -> None:
    names = set(get_plugins().trainers.names())
    assert {"lora-sft", "full-sft", "grpo"} <= names


@pytest.mark.parametrize("trainer", ["lora-sft", "full-sft", "grpo"])
def test_unknown_param_names_it_and_lists_allowed(tmp_path: Path, trainer: str) -> None:
    cls = get_plugins().trainers.get(trainer)
    ctx = ctx_for(tmp_path, tmp_path / "none.jsonl", AddTask(), {"lr": 0.1})
    with pytest.raises(ConfigError) as err:
        cls().train(ctx)
    assert "'lr'" in err.value.message and trainer in err.value.message
    assert "learning_rate" in err.value.hint and "max_steps" in err.value.hint
    assert err.value.field == "train.lr"


def test_lora_params_are_refused_by_full_sft(tmp_path: Path) -> None:
    cls = get_plugins().trainers.get("full-sft")
    with pytest.raises(ConfigError, match="lora_r"):
        cls().train(ctx_for(tmp_path, tmp_path / "x.jsonl", None, {"lora_r": 4}))


def test_param_types_are_checked() -> None:
    from plugins.trainers.hparams import COMMON_PARAMS, resolve_params

    with pytest.raises(ConfigError) as err:
        resolve_params("full-sft", 10_000, {"max_steps": "ten"}, COMMON_PARAMS)
    assert err.value.field == "train.max_steps"


def test_defaults_follow_model_size_and_overrides_win() -> None:
    from plugins.trainers.hparams import LORA_PARAMS, allowed_params, resolve_params

    allowed = allowed_params(LORA_PARAMS)
    tiny = resolve_params("lora-sft", 100_000, {}, allowed)
    mid = resolve_params("lora-sft", 500_000_000, {}, allowed)
    big = resolve_params("lora-sft", 7_000_000_000, {"learning_rate": 5e-5}, allowed)
    assert tiny["learning_rate"] > mid["learning_rate"]
    assert big["learning_rate"] == 5e-5
    assert big["gradient_checkpointing"] and not tiny["gradient_checkpointing"]
    assert big["per_device_train_batch_size"] <= mid["per_device_train_batch_size"]
    full = resolve_params("full-sft", 500_000_000, {}, allowed_params())
    assert full["learning_rate"] < mid["learning_rate"] and "lora_r" not in full


def test_dataset_errors_name_the_line(tmp_path: Path) -> None:
    from plugins.trainers.corpus import read_rows

    with pytest.raises(ConfigError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"example_id": "a"}\n')
    with pytest.raises(ConfigError, match="line 1"):
        read_rows(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_rows(tmp_path / "empty.jsonl")


def test_sft_records_are_prompt_and_target_plus_eos() -> None:
    from plugins.trainers.corpus import sft_records

    task = AddTask()
    row = DataRow(example_id="1", question="1+2", answer="3", reasoning="", target="3",
                  teacher="t", mode="alignment")
    assert sft_records([row], task, "</s>") == [{"prompt": "1+2=", "completion": "3</s>"}]


def test_grpo_reward_scores_answer_and_adds_verify_bonus() -> None:
    from plugins.trainers.grpo import make_reward

    reward = make_reward(AddTask(), 0.5)
    got = reward(prompts=["1+2=", "1+2=", "2+2="], completions=["3", "4", ""],
                 answer=["3", "3", "4"], question=["1+2", "1+2", "2+2"])
    assert got == [1.5, 0.0, 0.0]


def test_train_step_needs_a_dataset(tmp_path: Path) -> None:
    from agents.steps import train

    ctx = StepContext(job_id="j1", run_id="r1", step="train", args={"model": "config:tiny"},
                      workdir=tmp_path, inputs={})
    with pytest.raises(ConfigError) as err:
        train.run(ctx)
    assert err.value.field == "inputs.dataset"


def test_train_step_unknown_trainer_names_the_field(tmp_path: Path) -> None:
    from agents.steps import train

    ctx = StepContext(job_id="j1", run_id="r1", step="train",
                      args={"model": "config:tiny", "trainer": "nope"}, workdir=tmp_path,
                      inputs={"dataset": tmp_path / "d.jsonl"})
    with pytest.raises(ConfigError) as err:
        train.run(ctx)
    assert err.value.field == "trainer"


# --- slow: real training ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("model", "steps"), [("config:tiny", 100), ("config:qwen2-tiny", 150)])
def test_full_sft_learns_addition(tmp_path: Path, model: str, steps: int) -> None:
    task = AddTask()
    examples = task.examples("train")
    data = write_rows(tmp_path / "data.jsonl", task, examples)
    before = accuracy(model, task, examples)
    cls = get_plugins().trainers.get("full-sft")
    metrics = cls().train(ctx_for(tmp_path, data, task, {
        "max_steps": steps, "learning_rate": 3e-3, "per_device_train_batch_size": 16,
        "save_steps": 1000}, model=model, seed=0))
    assert metrics["prompt_format"] == "chat"  # config:tiny's template is contents verbatim
    after = accuracy(str(tmp_path / "out"), task, examples)
    assert metrics["final_loss"] < metrics["first_loss"] * 0.5
    assert after >= before + 0.3, (before, after)
    # One wall time per step, and together they are the timed training window.
    assert len(metrics["step_times_s"]) == steps
    assert sum(metrics["step_times_s"]) == pytest.approx(metrics["train_time_s"], rel=0.01)
    assert min(metrics["step_times_s"]) <= metrics["step_time_median_s"]


@pytest.mark.slow
def test_lora_sft_loss_goes_down_and_adapter_loads_by_base_ref(tmp_path: Path) -> None:
    from plugins.models.hf import load_model

    task = AddTask()
    data = write_rows(tmp_path / "data.jsonl", task, task.examples("train"))
    progress: list[dict[str, Any]] = []
    saved: list[Path] = []
    cls = get_plugins().trainers.get("lora-sft")
    metrics = cls().train(ctx_for(
        tmp_path, data, task,
        {"max_steps": 30, "learning_rate": 1e-2, "save_steps": 10, "progress_interval_s": 0,
         "save_total_limit": 5},
        progress=lambda **kw: progress.append(kw), checkpoint=saved.append))
    assert metrics["final_loss"] < metrics["first_loss"]
    assert metrics["steps"] == 30 and metrics["train_tokens"] > 0 and metrics["tokens_per_s"] > 0
    assert [p.name for p in saved] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    # The checkpoint holds the adapter only, plus what resume needs.
    names = {p.name for p in saved[0].iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert "model.safetensors" not in names
    last = progress[-1]
    assert last["done"] == last["total"] == 30 and last["unit"] == "step"
    assert {"loss", "learning_rate", "tokens_per_s", "eta_s"} <= set(last)
    out = tmp_path / "out"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "config:tiny"
    assert not (out / "model.safetensors").exists()
    model, _ = load_model(str(out))
    assert type(model).__name__.startswith("Peft")


@pytest.mark.slow
def test_grpo_trains_with_task_reward(tmp_path: Path) -> None:
    task = AddTask()
    data = write_rows(tmp_path / "data.jsonl", task, task.examples("train")[:16])
    cls = get_plugins().trainers.get("grpo")
    metrics = cls().train(ctx_for(tmp_path, data, task, {
        "max_steps": 4, "save_steps": 2, "max_completion_length": 4,
        "per_device_train_batch_size": 8, "num_generations": 4}))
    assert metrics["steps"] == 4 and metrics["final_reward"] is not None
    # The synthesised rows have targets: a short SFT warm start ran first (one pass).
    assert metrics["warm_start"]["source"] == "sft" and metrics["warm_start"]["steps"] == 2
    assert len(metrics["reward_curve"]) == 4
    assert metrics["train_tokens"] > 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "ckpt" / "checkpoint-4" / "optimizer.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["config:tiny", "config:llama3-tiny-tied"])
def test_train_step_on_mahjong_writes_model_and_events(tmp_path: Path, model: str) -> None:
    from agents.steps import train

    spec = {"name": "mahjong-winning-tiles", "params": {"difficulty": 1, "n_train": 24,
                                                         "n_test": 4}}
    task = get_plugins().task(spec["name"], spec["params"])
    data = write_rows(tmp_path / "dataset.jsonl", task, task.examples("train"))
    ctx = StepContext(job_id="j1", run_id="r1", step="train", workdir=tmp_path / "w",
                      inputs={"dataset": data}, min_interval_s=0.0,
                      args={"model": model, "trainer": "lora-sft", "task": spec,
                            "params": {"max_steps": 6, "save_steps": 3}, "seed": 1})
    result = train.run(ctx)
    for key in ("final_loss", "first_loss", "steps", "train_time_s", "tokens_per_s",
                "train_tokens", "peak_rss_mib", "trainer"):
        assert result[key] is not None, key
    assert result["steps"] == 6 and result["trainer"] == "lora-sft"
    assert result["final_loss"] < result["first_loss"]
    json.dumps(result)
    kinds = [m["kind"] for m in ctx.messages]
    assert kinds.count("checkpoint") == 2 and "progress" in kinds
    assert (ctx.output("model") / "adapter_config.json").is_file()
    card = json.loads((ctx.output("model") / "stratos_train.json").read_text())
    assert card["base_model"] == model and card["kind"] == "adapter"
