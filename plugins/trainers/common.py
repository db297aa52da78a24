"""Shared trainer machinery: params per model size, datasets, seeding, the progress callback.

Every built-in trainer drives a transformers/trl `Trainer`; this module keeps what they share:
hyper-parameter defaults by parameter count (overridable, unknown names refused), the
prompt/completion dataset built from a synthesis JSONL, and `StratosCallback`, which turns the
Trainer's loop into `ctx.progress(...)`, `ctx.checkpoint(path)` and a graceful stop.
Heavy imports (torch, transformers, datasets) happen inside functions.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from stratosd.api import DataRow, TaskPack, TrainContext
from stratosd.errors import ConfigError

if TYPE_CHECKING:
    from transformers import Trainer as HFTrainer

log = structlog.stdlib.get_logger(__name__)

# Params every trainer understands, with what they mean (shown in errors).
COMMON_PARAMS: dict[str, str] = {
    "max_steps": "optimizer steps (-1: use num_train_epochs)",
    "num_train_epochs": "passes over the dataset when max_steps is -1",
    "learning_rate": "peak learning rate",
    "per_device_train_batch_size": "examples per device per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "max_length": "truncate prompt+completion to this many tokens",
    "save_steps": "checkpoint every N optimizer steps",
    "save_total_limit": "checkpoints kept on disk",
    "logging_steps": "log loss every N steps",
    "warmup_steps": "warm-up steps (a float below 1 is a fraction of all steps)",
    "weight_decay": "AdamW weight decay",
    "lr_scheduler_type": "transformers scheduler name (linear, cosine, constant, ...)",
    "max_grad_norm": "gradient clipping norm",
    "gradient_checkpointing": "recompute activations to save memory",
    "bf16": "bfloat16 mixed precision (GPU)",
    "progress_interval_s": "seconds between progress reports",
    "cpu_threads": "torch CPU threads while training (0: torch's default)",
}
LORA_PARAMS: dict[str, str] = {
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling alpha",
    "lora_dropout": "LoRA dropout",
    "lora_target_modules": "modules that get adapters ('all-linear' or a list of names)",
}
GRPO_PARAMS: dict[str, str] = {
    "num_generations": "completions sampled per prompt",
    "max_completion_length": "tokens generated per completion",
    "temperature": "sampling temperature for the rollouts",
    "beta": "KL coefficient against the reference model (0: no reference model)",
    "verify_bonus": "extra reward when the task's verifier accepts the reasoning",
    "lora_r": LORA_PARAMS["lora_r"] + " (0: train full weights)",
    "lora_alpha": LORA_PARAMS["lora_alpha"],
    "lora_dropout": LORA_PARAMS["lora_dropout"],
    "lora_target_modules": LORA_PARAMS["lora_target_modules"],
}

MAX_STEP_TIMES = 1000  # per-step durations kept in the metrics (bounded: they travel on the bus)
TINY_MAX_PARAMS = 50_000_000  # below: test-size models trained on CPU in seconds
LARGE_MIN_PARAMS = 2_000_000_000  # from here: smaller batches, gradient checkpointing


def size_defaults(n_params: int, trainer: str, *, cuda: bool = False) -> dict[str, Any]:
    """Default hyper-parameters for a model of n_params parameters and a trainer name."""
    full = trainer != "lora-sft"
    if n_params < TINY_MAX_PARAMS:
        d: dict[str, Any] = {
            "learning_rate": 1e-3 if full else 3e-3, "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1, "lora_r": 8, "lora_alpha": 16,
            "logging_steps": 1, "save_steps": 50, "warmup_steps": 0, "max_length": 512,
            "gradient_checkpointing": False,
        }
    elif n_params < LARGE_MIN_PARAMS:
        d = {
            "learning_rate": 2e-5 if full else 2e-4, "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2, "lora_r": 16, "lora_alpha": 32,
            "logging_steps": 5, "save_steps": 100, "warmup_steps": 0.03, "max_length": 1024,
            "gradient_checkpointing": False,
        }
    else:
        d = {
            "learning_rate": 1e-5 if full else 1e-4, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 4, "lora_r": 16, "lora_alpha": 32,
            "logging_steps": 10, "save_steps": 100, "warmup_steps": 0.03, "max_length": 1024,
            "gradient_checkpointing": True,
        }
    d.update(
        max_steps=-1, num_train_epochs=3, save_total_limit=2, weight_decay=0.0,
        lr_scheduler_type="linear", max_grad_norm=1.0, lora_dropout=0.0,
        lora_target_modules="all-linear", bf16=cuda and n_params >= TINY_MAX_PARAMS,
        progress_interval_s=2.0,
        # Tiny matrices gain nothing from intra-op threads, and lose a lot when cores are shared.
        cpu_threads=1 if n_params < TINY_MAX_PARAMS and not cuda else 0,
    )
    if trainer == "grpo":
        d.update(
            learning_rate=1e-5 if n_params >= TINY_MAX_PARAMS else 1e-3,
            num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=1,
            max_completion_length=32 if n_params < TINY_MAX_PARAMS else 256,
            temperature=1.0, beta=0.0, verify_bonus=0.5,
            lora_r=0 if n_params < TINY_MAX_PARAMS else 16,
        )
    return d


def check_param_names(trainer: str, overrides: Mapping[str, Any],
                      allowed: Mapping[str, str]) -> None:
    """Raise ConfigError naming the first unknown param and listing the allowed ones."""
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        listing = ", ".join(sorted(allowed))
        raise ConfigError(
            f"unknown training param {unknown[0]!r} for trainer {trainer!r}",
            hint=f"allowed params: {listing}",
            field=f"train.{unknown[0]}",
        )


def resolve_params(
    trainer: str,
    n_params: int,
    overrides: Mapping[str, Any],
    allowed: Mapping[str, str],
    *,
    cuda: bool = False,
) -> dict[str, Any]:
    """Size defaults for the allowed names, then overrides; an unknown name is a ConfigError."""
    check_param_names(trainer, overrides, allowed)
    defaults = size_defaults(n_params, trainer, cuda=cuda)
    params = {k: v for k, v in defaults.items() if k in allowed}
    params.update(overrides)
    for key in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                "save_steps", "logging_steps", "max_length"):
        if key in params and not isinstance(params[key], int):
            raise ConfigError(f"training param {key!r} must be an integer, got {params[key]!r}",
                              hint="pass a whole number", field=f"train.{key}")
    return params


def allowed_params(*extra: Mapping[str, str]) -> dict[str, str]:
    """COMMON_PARAMS merged with trainer-specific ones."""
    out = dict(COMMON_PARAMS)
    for more in extra:
        out.update(more)
    return out


# --- data ---------------------------------------------------------------------------------

_ROW_DECODER = msgspec.json.Decoder(DataRow)


def read_rows(path: Path) -> list[DataRow]:
    """DataRows from a synthesis JSONL file (one per line); a bad line names its number."""
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ConfigError(f"dataset directory {str(path)!r} holds no .jsonl file",
                              hint="pass the synthesis step's `dataset` artifact",
                              field="inputs.dataset")
        path = files[0]
    if not path.is_file():
        raise ConfigError(f"dataset file {str(path)!r} does not exist",
                          hint="pass the synthesis step's `dataset` artifact",
                          field="inputs.dataset")
    rows: list[DataRow] = []
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(_ROW_DECODER.decode(line))
            except msgspec.ValidationError as exc:
                raise ConfigError(f"dataset {path.name} line {lineno}: {exc}",
                                  hint="each line must be one DataRow (see stratosd.api)",
                                  field="inputs.dataset") from exc
            except msgspec.DecodeError as exc:
                raise ConfigError(f"dataset {path.name} line {lineno} is not JSON: {exc}",
                                  hint="each line must be one JSON object",
                                  field="inputs.dataset") from exc
    if not rows:
        raise ConfigError(f"dataset {path.name} is empty", field="inputs.dataset",
                          hint="synthesis produced no rows; check the teacher and the mode")
    return rows


def prompt_for(task: TaskPack | None, question: str) -> str:
    """The prompt the student sees (the task's forward prompt; the raw question without one)."""
    return task.prompt(question) if task is not None else question


def sft_records(
    rows: list[DataRow], task: TaskPack | None, eos_token: str
) -> list[dict[str, str]]:
    """Prompt/completion pairs: prompt = task.prompt(question), completion = target + eos."""
    out = []
    for row in rows:
        completion = row.target if row.target.endswith(eos_token) else row.target + eos_token
        out.append({"prompt": prompt_for(task, row.question), "completion": completion})
    return out


def hf_dataset(records: list[dict[str, Any]]) -> Any:
    """A datasets.Dataset from records, with the library's progress bars off."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets.Dataset.from_list(records)


# --- runtime ------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) before any random init (LoRA, data order)."""
    from transformers import set_seed

    set_seed(seed)


def cuda_available() -> bool:
    """True when training will run on a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


def param_count_of(model: Any) -> int:
    """Parameters of a loaded model (all, not only trainable)."""
    return int(sum(p.numel() for p in model.parameters()))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def quiet_libraries() -> None:
    """No progress bars or info chatter: stderr lines become job logs in the agent."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]


def training_kwargs(params: Mapping[str, Any], ctx: TrainContext, *, cuda: bool) -> dict[str, Any]:
    """TrainingArguments keywords shared by SFTConfig and GRPOConfig."""
    return {
        "output_dir": str(ctx.checkpoint_dir),
        "max_steps": params["max_steps"],
        "num_train_epochs": params["num_train_epochs"],
        "learning_rate": params["learning_rate"],
        "per_device_train_batch_size": params["per_device_train_batch_size"],
        "gradient_accumulation_steps": params["gradient_accumulation_steps"],
        "save_strategy": "steps",
        "save_steps": params["save_steps"],
        "save_total_limit": params["save_total_limit"],
        "logging_steps": params["logging_steps"],
        "warmup_steps": params["warmup_steps"],
        "weight_decay": params["weight_decay"],
        "lr_scheduler_type": params["lr_scheduler_type"],
        "max_grad_norm": params["max_grad_norm"],
        "activation_checkpointing": bool(params["gradient_checkpointing"]),
        "bf16": bool(params["bf16"]) and cuda,
        "fp16": False,
        "use_cpu": not cuda,
        "seed": ctx.seed,
        "data_seed": ctx.seed,
        "report_to": "none",
        "disable_tqdm": True,
        "save_only_model": False,  # optimizer, scheduler and RNG state make resume exact
        "dataloader_num_workers": 0,
    }


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


def _transformers_callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


def make_callback(ctx: TrainContext, *, interval_s: float = 2.0) -> Any:
    """A transformers TrainerCallback reporting to ctx (built lazily: no import at module top)."""
    base = _transformers_callback_base()

    class StratosCallback(base):  # type: ignore[misc, valid-type]
        """Progress every interval_s, ctx.checkpoint after each save, stop on ctx.should_stop()."""

        def __init__(self) -> None:
            self.first_loss: float | None = None
            self.last_loss: float | None = None
            self.learning_rate: float | None = None
            self.first_reward: float | None = None
            self.last_reward: float | None = None
            self.logged_tokens = 0
            self.losses: list[tuple[int, float]] = []
            self.stopped = False
            self.checkpoints: list[str] = []
            self._t0 = time.monotonic()
            self._last_report = 0.0
            self._start_step = 0
            self._start_tokens = 0
            self._last_step_end = self._t0
            self.train_time_s = 0.0
            self.step_times: list[float] = []

        def tokens(self, state: Any) -> int:
            return max(int(state.num_input_tokens_seen or 0), self.logged_tokens)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t0 = self._last_step_end = time.monotonic()
            self._start_step = state.global_step
            self._start_tokens = self.tokens(state)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kw: Any) -> None:
            logs = logs or {}
            if "num_tokens" in logs:
                self.logged_tokens = int(logs["num_tokens"])
            if "reward" in logs:
                self.last_reward = float(logs["reward"])
                if self.first_reward is None:
                    self.first_reward = self.last_reward
            if "learning_rate" in logs:
                self.learning_rate = float(logs["learning_rate"])
            if "loss" in logs and math.isfinite(float(logs["loss"])):
                loss = float(logs["loss"])
                if self.first_loss is None:
                    self.first_loss = loss
                self.last_loss = loss
                self.losses.append((int(state.global_step), loss))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.monotonic()
            self.train_time_s = now - self._t0
            if len(self.step_times) < MAX_STEP_TIMES:
                self.step_times.append(now - self._last_step_end)
            self._last_step_end = now
            if ctx.should_stop():
                # Save at this step, then leave the loop: the resume continues from here.
                self.stopped = True
                control.should_save = True
                control.should_training_stop = True
            # The final report comes from run_hf_trainer, after the last loss is logged.
            if now - self._last_report >= interval_s and state.global_step < state.max_steps:
                self._last_report = now
                self.report(state)

        def report(self, state: Any, *, force: bool = False) -> None:
            done_steps = state.global_step - self._start_step
            elapsed = max(time.monotonic() - self._t0, 1e-9)
            tokens = self.tokens(state) - self._start_tokens
            eta = (state.max_steps - state.global_step) * elapsed / done_steps if done_steps else 0
            metrics: dict[str, float] = {"tokens_per_s": tokens / elapsed, "eta_s": eta,
                                         "elapsed_s": elapsed}
            if self.last_loss is not None:
                metrics["loss"] = self.last_loss
            if self.learning_rate is not None:
                metrics["learning_rate"] = self.learning_rate
            if self.last_reward is not None:
                metrics["reward"] = self.last_reward
            ctx.progress(done=state.global_step, total=state.max_steps, unit="step",
                         message=f"step {state.global_step}/{state.max_steps}",
                         force=force, **metrics)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                self.checkpoints.append(str(path))
                ctx.checkpoint(path)

    return StratosCallback()


def drop_printer(trainer: HFTrainer) -> None:
    """Remove transformers' PrinterCallback: logs travel as progress events, not stdout."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


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
        # Wall time of each step (loop overhead included), the first MAX_STEP_TIMES of this run.
        "step_times_s": [round(t, 5) for t in callback.step_times],
        "step_time_median_s": (round(statistics.median(callback.step_times), 5)
                               if callback.step_times else None),
    }


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
