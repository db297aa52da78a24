"""GRPO: SFT warm start, prompts in the student's own format, a reward that rises."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

from stratosd.api import DataRow, Example, Split, TaskPack, TrainContext
from stratosd.errors import ConfigError


class DigitsTask(TaskPack):
    """Repeat a digit. Score: half for answering in digits only, half for the right digit.

    The digits-only half is a dense signal a tiny model's policy improves on within a
    minute of CPU; the exact half is the task's real answer check.
    """

    name: ClassVar[str] = "test-digits"

    def examples(self, split: Split) -> list[Example]:
        return [Example(id=str(d), question=str(d), answer=str(d)) for d in range(10)]

    def prompt(self, question: str) -> str:
        return f"Repeat the digit: {question}"

    def format_target(self, reasoning: str, answer: str) -> str:
        return answer

    def extract(self, output: str) -> str | None:
        return output.strip() or None

    def score(self, predicted: str | None, gold: str) -> float:
        text = predicted or ""
        digits = sum(c.isdigit() for c in text) / max(len(text), 1)
        return 0.5 * digits + 0.5 * float(text == gold)

    def verify(self, question: str, reasoning: str, answer: str) -> bool | None:
        return None


def write_rows(path: Path, task: TaskPack, copies: int = 4, target: bool = True) -> Path:
    rows = [DataRow(example_id=e.id, question=e.question, answer=e.answer, reasoning="",
                    target=e.answer if target else "", teacher="reference", mode="injection",
                    verified=True)
            for e in task.examples("train")] * copies
    path.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in rows))
    return path


def ctx_for(tmp_path: Path, params: dict[str, Any], model: str = "config:qwen2-tiny",
            out: str = "out", target: bool = True, **kw: Any) -> TrainContext:
    task = DigitsTask()
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_rows(tmp_path / "data.jsonl", task, target=target)
    return TrainContext(model=model, train_file=data, out_dir=tmp_path / out,
                        checkpoint_dir=tmp_path / "ckpt", params=params, task=task, **kw)


# --- fast -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "field"), [
    ({"warm_start": ""}, "train.warm_start"),
    ({"sft_steps": 0}, "train.sft_steps"),
    ({"sft_steps": "ten"}, "train.sft_steps"),
    ({"sft_learning_rate": -1.0}, "train.sft_learning_rate"),
])
def test_warm_start_params_are_checked(tmp_path: Path, params: dict[str, Any],
                                       field: str) -> None:
    from plugins.trainers.grpo import GRPOTrainerPlugin

    with pytest.raises(ConfigError) as err:
        GRPOTrainerPlugin().train(ctx_for(tmp_path, params))
    assert err.value.field == field


def test_warm_start_params_are_listed_as_allowed() -> None:
    from plugins.trainers.grpo import GRPOTrainerPlugin

    assert {"warm_start", "sft_steps", "sft_learning_rate"} <= set(GRPOTrainerPlugin.allowed())


def test_a_missing_warm_start_path_names_the_field(tmp_path: Path) -> None:
    from plugins.trainers.grpo import GRPOTrainerPlugin

    with pytest.raises(ConfigError, match="not a directory") as err:
        GRPOTrainerPlugin().train(ctx_for(tmp_path, {"warm_start": str(tmp_path / "nope")}))
    assert err.value.field == "train.warm_start"


def test_reward_curve_and_quarter_means() -> None:
    from plugins.trainers.grpo_data import quarter_means, reward_curve

    history = [{"step": i, "reward": r, "loss": 0.0} for i, r in
               enumerate([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], 1)]
    history.append({"train_runtime": 1.0, "step": 8})  # the end-of-training summary
    curve = reward_curve(history)
    assert curve == [(i, r) for i, r in enumerate([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], 1)]
    first, last = quarter_means(curve)
    assert first == pytest.approx(0.05) and last == pytest.approx(0.65)
    assert quarter_means([]) == (None, None)


@pytest.mark.parametrize("model", ["config:llama3-tiny", "config:qwen2-tiny", "config:tiny"])
def test_grpo_prompt_ids_are_the_sft_and_served_prompt_ids(model: str) -> None:
    from plugins.models import prompting
    from plugins.models.hf import load_model
    from plugins.trainers.grpo_data import encode_prompts, grpo_records, trainer_class

    _, tok = load_model(model)
    task = DigitsTask()
    rows = [DataRow(example_id="7", question="7", answer="7", reasoning="", target="7",
                    teacher="t", mode="injection")]
    [record] = grpo_records(rows, task, tok)
    assert record["answer"] == "7" and record["question"] == "7"
    [ids] = encode_prompts(tok, [record["prompt"]])
    # What SFT trained on: the example's ids up to its completion.
    example = prompting.encode_example(tok, prompting.task_messages(task, "7"), "7")
    n_prompt = example["completion_mask"].index(1)
    assert ids == example["input_ids"][:n_prompt]
    # What the endpoint serves.
    served = prompting.render_prompt(tok, prompting.task_messages(task, "7"))
    assert ids == prompting.encode_prompt(tok, served)
    if tok.bos_token_id is not None and model != "config:tiny":
        assert ids.count(tok.bos_token_id) == 1
    # trl's rollouts start from these ids, not from the tokenizer's default encoding.
    fake = type("FakeTrainer", (), {"processing_class": tok})()
    tokenize = getattr(trainer_class(), "_tokenize_prompts")  # noqa: B009 - the override
    got, images, fields = tokenize(fake, [record["prompt"]])
    assert got == [ids] and images is None and fields == {}


# --- slow: real training ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)  # ~40 s on 2 shared cores: SFT warm start, then 120 GRPO steps
def test_grpo_reward_rises_after_an_sft_warm_start(tmp_path: Path) -> None:
    steps = 120
    progress: list[dict[str, Any]] = []
    ctx = ctx_for(tmp_path, {
        "sft_steps": 30, "sft_learning_rate": 3e-3,
        "max_steps": steps, "save_steps": 1000, "per_device_train_batch_size": 16,
        "num_generations": 8, "max_completion_length": 4, "learning_rate": 1e-3,
        "progress_interval_s": 0}, progress=lambda **kw: progress.append(kw))
    from plugins.trainers.grpo import GRPOTrainerPlugin

    metrics = GRPOTrainerPlugin().train(ctx)
    warm = metrics["warm_start"]
    assert warm["source"] == "sft" and warm["steps"] == 30
    assert warm["final_loss"] < warm["first_loss"] * 0.5
    assert metrics["prompt_format"] == "chat" and metrics["steps"] == steps
    curve = metrics["reward_curve"]
    assert len(curve) == steps and [s for s, _ in curve] == list(range(1, steps + 1))
    first, last = metrics["reward_first_quarter"], metrics["reward_last_quarter"]
    assert last > first + 0.15, (first, last, curve)
    assert metrics["final_reward"] == pytest.approx(curve[-1][1], abs=1e-5)
    # Progress: the warm start's reports say so, then GRPO's carry the reward.
    assert any(p["message"].startswith("sft warm start") for p in progress)
    assert "reward" in progress[-1] and progress[-1]["done"] == steps
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file()
    card = json.loads((out / "stratos_train.json").read_text())
    assert card["kind"] == "full" and card["metrics"]["reward_curve"]
    json.dumps(metrics)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lora_warm_start_is_continued_reused_and_given(tmp_path: Path) -> None:
    from plugins.models.hf import load_model
    from plugins.trainers.grpo import WARM_DIR, GRPOTrainerPlugin

    short = {"max_steps": 2, "save_steps": 1000, "per_device_train_batch_size": 4,
             "num_generations": 4, "max_completion_length": 3}
    lora = {**short, "lora_r": 4, "lora_alpha": 8, "sft_steps": 2}
    first = GRPOTrainerPlugin().train(ctx_for(tmp_path, lora))
    assert first["warm_start"]["source"] == "sft" and "reused" not in first["warm_start"]
    out = tmp_path / "out"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "config:qwen2-tiny" and cfg["r"] == 4
    assert not (out / "ref").exists()  # only the trained adapter
    model, _ = load_model(str(out))
    assert type(model).__name__.startswith("Peft")

    # A retry in the same checkpoint dir reuses the finished warm start.
    again = GRPOTrainerPlugin().train(ctx_for(tmp_path, lora, out="out2"))
    assert again["warm_start"]["reused"] is True

    # A given SFT adapter, GRPO on all weights: merged, saved as a full model.
    warm = tmp_path / "ckpt" / WARM_DIR / "model"
    given = GRPOTrainerPlugin().train(ctx_for(tmp_path, {**short, "warm_start": str(warm)},
                                              out="out3"))
    assert given["warm_start"]["source"] == "adapter"
    assert (tmp_path / "out3" / "model.safetensors").is_file()

    # A model that is itself an adapter is the warm start; rows without targets: no SFT.
    from_model = GRPOTrainerPlugin().train(ctx_for(tmp_path / "m", {**short, "lora_r": 4},
                                                   model=str(out), target=False))
    assert from_model["warm_start"]["source"] == "adapter"
    cfg = json.loads((tmp_path / "m" / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "config:qwen2-tiny"
    none = GRPOTrainerPlugin().train(ctx_for(tmp_path / "n", short, target=False))
    assert none["warm_start"]["source"] == "none"
