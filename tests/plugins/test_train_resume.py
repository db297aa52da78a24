"""Resume from a checkpoint ends where an uninterrupted run with the same seed ends."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from stratosd.api import DataRow, TrainContext

pytest.importorskip("trl")
pytest.importorskip("peft")

STEPS = 12
HALF = STEPS // 2


def write_dataset(path: Path) -> Path:
    """Sums of two digits, written as the synthesis step writes them (one DataRow a line)."""
    rows = [
        DataRow(example_id=f"{a}-{b}", question=f"{a}+{b}=", answer=str(a + b),
                reasoning=f"{a}+{b}={a + b}", target=f"{a}+{b}={a + b}\nAnswer: {a + b}",
                teacher="reference", mode="injection", verified=True)
        for a in range(6) for b in range(6)
    ]
    path.write_bytes(b"\n".join(msgspec.json.encode(r) for r in rows) + b"\n")
    return path


def make_ctx(root: Path, data: Path, **kw: object) -> TrainContext:
    params = {"max_steps": STEPS, "save_steps": HALF, "per_device_train_batch_size": 4,
              "learning_rate": 5e-3, "save_total_limit": 5}
    return TrainContext(model="config:tiny", train_file=data, out_dir=root / "out",
                        checkpoint_dir=root / "ckpt", params=params, seed=7, **kw)  # type: ignore[arg-type]


def adapter_weights(path: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["lora-sft", "full-sft"])
def test_resume_matches_uninterrupted_run(tmp_path: Path, trainer: str) -> None:
    import torch

    from stratosd.plugins import get_plugins

    cls = get_plugins().trainers.get(trainer)
    data = write_dataset(tmp_path / "data.jsonl")

    straight = cls().train(make_ctx(tmp_path / "a", data))
    assert straight["steps"] == STEPS and not straight["stopped"]

    # Interrupt: should_stop turns true during step HALF; the trainer saves there and returns.
    calls = {"n": 0}

    def stop_at_half() -> bool:
        calls["n"] += 1
        return calls["n"] >= HALF

    uploaded: list[Path] = []
    first = cls().train(make_ctx(tmp_path / "b", data, should_stop=stop_at_half,
                                 checkpoint=uploaded.append))
    assert first["stopped"] and first["steps"] == HALF
    assert [p.name for p in uploaded] == [f"checkpoint-{HALF}"]

    # Resume in a fresh trainer from the uploaded checkpoint, into a different directory.
    resumed = cls().train(make_ctx(tmp_path / "c", data, resume_from=uploaded[-1]))
    assert resumed["steps"] == STEPS and resumed["resumed_from"].endswith(f"checkpoint-{HALF}")
    assert resumed["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-4, abs=1e-5)

    if trainer == "lora-sft":
        a = adapter_weights(tmp_path / "a" / "out")
        c = adapter_weights(tmp_path / "c" / "out")
    else:
        from safetensors.torch import load_file

        a = load_file(str(tmp_path / "a" / "out" / "model.safetensors"))
        c = load_file(str(tmp_path / "c" / "out" / "model.safetensors"))
    assert a.keys() == c.keys()
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_resume_from_missing_checkpoint_names_the_input(tmp_path: Path) -> None:
    from plugins.trainers.common import checkpoint_to_resume
    from stratosd.errors import ConfigError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as err:
        checkpoint_to_resume(tmp_path / "empty")
    assert err.value.field == "inputs.resume"


def test_resume_picks_newest_checkpoint_in_a_directory(tmp_path: Path) -> None:
    from plugins.trainers.common import checkpoint_to_resume

    for step in (5, 10, 50):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert checkpoint_to_resume(tmp_path) == str(tmp_path / "checkpoint-50")
    assert checkpoint_to_resume(None) is None
