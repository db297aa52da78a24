"""GPU tests: skipped (with the reason) where torch sees no CUDA GPU; scripts/gpu-check.sh runs
them. Every test uses a `config:` model built here (no downloads) with 64-wide attention heads,
a size vLLM's attention kernels accept. Measurements go to $STRATOS_GPU_METRICS (JSON lines)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Qwen2, byte-level BPE + ChatML template; hidden 128 / 2 heads = head_dim 64
MODEL = "config:qwen2-small?num_attention_heads=2&num_key_value_heads=1"
Record = Callable[[str, float, str], None]


@functools.cache
def cuda_missing() -> str | None:
    """Why these tests cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "needs torch with CUDA: install stratos[train] with a CUDA build of torch"
    if not torch.cuda.is_available():
        return (f"needs a CUDA GPU: torch {torch.__version__} sees none "
                "(run scripts/gpu-check.sh on a GPU host)")
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip gpu-marked tests before their (GPU-using) fixtures run."""
    if item.get_closest_marker("gpu") is not None:
        reason = cuda_missing()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Record:
    """record(what, value, unit): one measurement for gpu-check.sh's summary."""

    def write(what: str, value: float, unit: str) -> None:
        path = os.environ.get("STRATOS_GPU_METRICS")
        line = {"test": request.node.name, "what": what, "value": round(value, 2),
                "unit": unit}
        if path:
            with open(path, "a") as fh:
                fh.write(json.dumps(line) + "\n")

    return write


@contextlib.contextmanager
def isolated_env(tmp: Path) -> Iterator[None]:
    """tests/conftest.py's per-test environment, for session fixtures (set up before it runs):
    a private STRATOS_HOME (config: models are built there, not in ~/.cache), the tests'
    shared tokenizer cache, no hub."""
    from tests.conftest import ROOT

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRATOS_HOME", str(tmp / "home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("STRATOS_MODEL_CACHE", str(ROOT / ".stratos" / "test-models"))
        yield


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A LoRA adapter trained on the GPU by the lora-sft plugin on the addition task (its
    training metrics beside it, in ../train_metrics.json)."""
    from stratosd.plugins import get_plugins
    from tests.plugins.test_trainers import AddTask, ctx_for, write_rows

    tmp = tmp_path_factory.mktemp("lora")
    task = AddTask()
    data = write_rows(tmp / "data.jsonl", task, task.examples("train"))
    trainer = get_plugins().trainers.get("lora-sft")()
    with isolated_env(tmp):
        metrics = trainer.train(ctx_for(tmp, data, task, {
            "max_steps": 60, "learning_rate": 1e-2, "per_device_train_batch_size": 16,
            "save_steps": 1000}, model=MODEL))
    (tmp / "train_metrics.json").write_text(json.dumps(
        {"tokens_per_s": metrics.get("tokens_per_s"), "first_loss": metrics.get("first_loss"),
         "final_loss": metrics.get("final_loss")}))
    yield tmp / "out"


@pytest.fixture(scope="session")
def exported(lora_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`export_model` of the GPU-trained adapter: adapter/ and the merged model/."""
    from plugins.models.export import export_model

    dest = tmp_path_factory.mktemp("export") / "student"
    with isolated_env(dest.parent):
        export_model(lora_adapter, dest, run_id="gpu-check", trainer="lora-sft")
    return dest
