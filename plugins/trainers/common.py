"""The trainer run: seeding, devices, resume, the training call and what it leaves behind.

Every built-in trainer drives a transformers/trl `Trainer`; this module keeps the run they
share: seed before any random init, find the checkpoint to resume from, train with the
Stratos callback (see `callbacks`), collect the metrics every trainer returns, and write the
train card and a portable adapter config. Heavy imports happen inside functions.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stratosd.api import TrainContext
from stratosd.errors import ConfigError, OutOfMemory

if TYPE_CHECKING:
    from transformers import Trainer as HFTrainer


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) before any random init (LoRA, data order)."""
    from transformers import set_seed

    set_seed(seed)


def cuda_available() -> bool:
    """True when training will run on a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


def param_count_of(model: Any) -> int:
    """Parameters of a loaded model (all, not only trainable; a 4-bit layer's packed bytes
    count as the weights they hold)."""
    if getattr(model, "is_loaded_in_4bit", False) and callable(getattr(model, "num_parameters",
                                                                       None)):
        return int(model.num_parameters())
    return int(sum(p.numel() for p in model.parameters()))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def quiet_libraries() -> None:
    """No progress bars or info chatter: stderr lines become job logs in the agent."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]


def checkpoint_to_resume(path: Path | None) -> str | None:
    """The checkpoint dir to resume from: path itself, or its newest checkpoint-N child."""
    if path is None:
        return None
    if (path / "trainer_state.json").is_file():
        return str(path)

    def step_of(p: Path) -> int:
        tail = p.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    children = sorted(
        (p for p in path.glob("checkpoint-*") if (p / "trainer_state.json").is_file()), key=step_of
    )
    if not children:
        raise ConfigError(f"resume checkpoint {str(path)!r} has no trainer_state.json",
                          hint="pass a directory written by a Stratos trainer checkpoint",
                          field="inputs.resume")
    return str(children[-1])


def run_hf_trainer(trainer: HFTrainer, ctx: TrainContext, callback: Any, name: str,
                   *, threads: int = 0) -> dict[str, Any]:
    """Train (resuming when asked) and collect the metrics every trainer returns."""
    import torch

    resume = checkpoint_to_resume(ctx.resume_from)
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    t0 = time.monotonic()
    try:
        trainer.train(resume_from_checkpoint=resume)
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) and "out of memory" not in text and \
                "can't allocate memory" not in text:  # the CPU allocator's words
            raise
        raise out_of_memory(trainer, exc) from exc
    finally:
        torch.set_num_threads(before)
    wall = time.monotonic() - t0
    state = trainer.state
    train_time = callback.train_time_s or wall
    tokens = callback.tokens(state) - callback._start_tokens
    callback.report(state, force=True)
    return {
        "trainer": name,
        "first_loss": callback.first_loss,
        "final_loss": callback.last_loss,
        "steps": int(state.global_step),
        "max_steps": int(state.max_steps),
        "train_time_s": round(train_time, 3),
        "tokens_per_s": round(tokens / train_time, 1) if train_time > 0 else 0.0,
        "train_tokens": int(tokens),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_gpu_mib": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                         if torch.cuda.is_available() else None),
        "stopped": callback.stopped,
        "resumed_from": resume,
        "checkpoints": list(callback.checkpoints),
        "loss_curve": callback.losses[-200:],
        # Wall time of each step (loop overhead included), the first callbacks.MAX_STEP_TIMES.
        "step_times_s": [round(t, 5) for t in callback.step_times],
        "step_time_median_s": (round(statistics.median(callback.step_times), 5)
                               if callback.step_times else None),
    }


def out_of_memory(trainer: HFTrainer, exc: BaseException) -> OutOfMemory:
    """OutOfMemory with the settings training ran with: the daemon degrades from them."""
    args = trainer.args
    ckpt = getattr(args, "gradient_checkpointing", False) or \
        getattr(args, "activation_checkpointing", False)
    detail = {"per_device_train_batch_size": int(args.per_device_train_batch_size),
              "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
              "gradient_checkpointing": bool(ckpt)}
    return OutOfMemory(f"out of memory while training: {type(exc).__name__}: {exc}"[:2000],
                       hint="the daemon retries with a smaller micro-batch, then gradient "
                       "checkpointing, then a smaller student", detail=detail)


def write_train_card(out_dir: Path, ctx: TrainContext, kind: str, metrics: Mapping[str, Any],
                     model_seed: int = 0) -> None:
    """stratos_train.json beside the weights: base ref, seeds and the run's metrics."""
    card = {"base_model": ctx.model, "base_seed": model_seed, "kind": kind,
            "seed": ctx.seed, "params": dict(ctx.params),
            "metrics": {k: v for k, v in metrics.items() if k != "loss_curve"}}
    (out_dir / "stratos_train.json").write_text(json.dumps(card, indent=2, default=str))


def set_adapter_base(out_dir: Path, base_ref: str) -> None:
    """Point adapter_config.json at the portable base ref (config:NAME, hub id), not a cache."""
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_ref
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
