"""The pre-screen's trial fine-tune and the rule that keeps or drops a student.

A few-shot score (the paper's capacity pre-screen) says what a student does before any
training; it cannot say whether the student can *learn* the task's answer format, and it is
always zero for a random-init model. So, per student, after the few-shot screen:

1. **Trial fine-tune**: `steps` optimizer steps with the job's SFT trainer on reference (or
   synthesised) rows, time-bounded;
2. **Held-out answers**: the trial model answers `n` train examples it did not train on,
   in the exact prompt format of the final evaluation; `parsed` counts the answers the task
   can extract (format compliance), `correct` the right ones.

`verdict` drops a student that cannot learn the format:

- the trial's training loss does not drop (relative drop of the mean of the first few logged
  losses to the mean of the last few below `min_loss_drop`), decided once the trial logged
  at least `MIN_DECIDE_STEPS` steps;
- or its held-out answers (almost) never parse: the Wilson 95% upper bound of the format
  rate is below `min_format_rate`. With the default 0.2 this needs 0 parsed of at least 16
  (0/16: upper bound 19%); with fewer examples the pre-screen cannot rule the student out
  and says it is undecided instead of guessing;
- or its estimate is below `min_accuracy` (0 by default: the pre-screen predicts, the user
  decides how much to demand).

The estimate is the held-out accuracy after the trial with its Wilson interval (few-shot
when no trial ran). The trial is a capacity screen, not the training: where the job asks for a
4-bit (QLoRA) base and this host cannot load one (no CUDA, no bitsandbytes), the trial trains
the same adapters on the full-precision base and says so (`trial_train_params`); the memory
fit still sizes the 4-bit base for the target server, and training 4-bit on such a host is
still refused. Heavy imports happen inside functions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from plugins.models.evaluate import wilson_interval
from schemas.specs import AccuracyEstimate, TrialFit
from stratosd.errors import OutOfMemory

log = structlog.stdlib.get_logger(__name__)

MIN_DECIDE_STEPS = 8  # fewer logged trial steps: the loss trend is noise, no loss verdict
LOSS_WINDOW = 3  # logged losses averaged at each end of the trial
SFT_TRAINERS = ("lora-sft", "full-sft")
TINY_PARAMS = 50_000_000  # below: one CPU thread generates fastest


@dataclass(frozen=True)
class Thresholds:
    """What the pre-screen demands of a student (the prescreen step's arguments)."""

    min_accuracy: float = 0.0
    min_loss_drop: float = 0.05
    min_format_rate: float = 0.2


def pct(x: float | None) -> str:
    """0.125 → '12%' (n/a for None)."""
    return "n/a" if x is None else f"{100 * x:.0f}%"


def estimate(correct: int, n: int, basis: str) -> AccuracyEstimate:
    """correct/n with its Wilson 95% interval."""
    low, high = wilson_interval(correct, n)
    return AccuracyEstimate(accuracy=correct / n if n else 0.0, n=n, correct=correct,
                            ci_low=low, ci_high=high, basis=basis)


def span(low: float, high: float) -> str:
    """(0.12, 0.45) → '12–45%'."""
    return f"{100 * low:.0f}–{100 * high:.0f}%"


def describe(est: AccuracyEstimate) -> str:
    """'25% [95% CI 12–45%, n=24]'."""
    return f"{pct(est.accuracy)} [95% CI {span(est.ci_low, est.ci_high)}, n={est.n}]"


def trial_estimate(trial: TrialFit) -> AccuracyEstimate:
    """The trial's held-out accuracy as an estimate."""
    return estimate(trial.correct, trial.n,
                    f"trial fine-tune ({trial.steps} steps), held-out train examples")


def loss_trend(curve: Sequence[Any]) -> tuple[float | None, float | None, float | None]:
    """(first, last, relative drop) from logged (step, loss) pairs, ends averaged."""
    losses = [float(x[1] if isinstance(x, (list, tuple)) else x) for x in curve]
    losses = [x for x in losses if math.isfinite(x)]
    if not losses:
        return None, None, None
    k = max(1, min(LOSS_WINDOW, len(losses) // 2))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return first, last, (first - last) / first if first > 0 else None


def trial_trainer(job_trainer: str, override: str | None = None) -> str:
    """The trainer of the trial: the override, else the job's when it is SFT, else LoRA-SFT."""
    if override:
        return override
    return job_trainer if job_trainer in SFT_TRAINERS else "lora-sft"


def trial_params(trainer_cls: Any, train: dict[str, Any]) -> dict[str, Any]:
    """The job's training params that the trial trainer accepts (not its length or saving)."""
    from plugins.trainers.hparams import COMMON_PARAMS

    keep = set(COMMON_PARAMS) | set(getattr(trainer_cls, "extra_params", {}) or {})
    skip = {"save_steps", "max_steps", "num_train_epochs", "save_total_limit"}
    return {k: v for k, v in train.items() if k in keep and k not in skip}


def trial_train_params(train: dict[str, Any], *, cuda: bool) -> tuple[dict[str, Any], str]:
    """The job's params for the trial on this host, and what the trial changed ('' when
    nothing): a 4-bit base this host cannot load becomes the full-precision one (same LoRA
    rank and targets), since the trial measures what the student can learn, not the kernels."""
    from plugins.trainers.precision import qlora_unavailable

    if train.get("quantization") != "4bit":
        return dict(train), ""
    why = qlora_unavailable(cuda=cuda)
    if why is None:
        return dict(train), ""
    return {**train, "quantization": "none"}, f"trial ran without 4-bit quantization: {why}"


@contextmanager
def cpu_threads(n_params: float) -> Iterator[None]:
    """One torch thread for a test-size model on CPU (tiny matrices: threads only contend)."""
    import torch

    before = torch.get_num_threads()
    if n_params < TINY_PARAMS and not torch.cuda.is_available():
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def answer_held_out(
    model_ref: str, task: Any, examples: Sequence[Any], *, max_new_tokens: int,
    deadline: float, seed: int = 0, batch_size: int = 8, n_params: float = 0.0,
) -> tuple[int, int, int, bool]:
    """(n answered, parsed, correct, cut by the deadline): the final evaluation's format.

    At least one batch is answered; later batches only while time is left.
    """
    from plugins.models.evaluate import local_generator
    from plugins.models.prompting import user_content

    generate = local_generator(model_ref, seed=seed, max_new_tokens=max_new_tokens)
    n = parsed = correct = 0
    with cpu_threads(n_params):
        for start in range(0, len(examples), batch_size):
            if start and time.monotonic() > deadline:
                return n, parsed, correct, True
            chunk = examples[start:start + batch_size]
            outs = generate([user_content(task, ex.question) for ex in chunk])
            for ex, out in zip(chunk, outs, strict=True):
                predicted = task.extract(out.text)
                n += 1
                parsed += predicted is not None
                correct += task.score(predicted, ex.answer) >= 1.0
    return n, parsed, correct, False


def run_trial(
    ref: str,
    task: Any,
    rows_file: Path,
    held_out: Sequence[Any],
    workdir: Path,
    *,
    steps: int,
    trainer: str,
    train: dict[str, Any],
    max_new_tokens: int,
    train_deadline: float,
    eval_deadline: float,
    seed: int = 0,
    n_params: float = 0.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrialFit:
    """Trial fine-tune `ref`, then answer the held-out examples with the trial model."""
    from stratosd.api import TrainContext
    from stratosd.plugins import get_plugins

    cls = get_plugins().trainers.get(trainer)
    params = trial_params(cls, train)
    params.update(max_steps=steps, save_steps=max(steps * 10, 1000), logging_steps=1)
    cut = {"time": False}

    def stop() -> bool:
        if time.monotonic() > train_deadline:
            cut["time"] = True
            return True
        return should_stop()

    ctx = TrainContext(model=ref, train_file=rows_file, out_dir=workdir / "out",
                       checkpoint_dir=workdir / "ckpt", params=params, task=task, seed=seed,
                       should_stop=stop)
    t0 = time.monotonic()
    try:
        metrics = cls().train(ctx)
    except OutOfMemory as exc:
        log.warning("prescreen_trial_failed", model=ref, error=exc.message)
        return TrialFit(trainer=trainer, error=f"out of memory in the trial: {exc.message}")
    train_s = time.monotonic() - t0
    _free_memory()  # the trial model goes before the held-out answers load it from disk
    first, last, drop = loss_trend(metrics.get("loss_curve") or [])
    t1 = time.monotonic()
    n, parsed, correct, late = answer_held_out(
        str(workdir / "out"), task, held_out, max_new_tokens=max_new_tokens,
        deadline=eval_deadline, seed=seed, n_params=n_params)
    low, high = wilson_interval(parsed, n)
    trial = TrialFit(
        trainer=trainer, steps=int(metrics.get("steps") or 0), loss_first=first,
        loss_last=last, loss_drop=drop, n=n, parsed=parsed,
        format_rate=parsed / n if n else 0.0, format_ci_low=low, format_ci_high=high,
        correct=correct, train_time_s=round(train_s, 2),
        eval_time_s=round(time.monotonic() - t1, 2), stopped_by_time=cut["time"] or late)
    log.info("prescreen_trial_done", model=ref, steps=trial.steps, loss_drop=drop, n=n,
             parsed=parsed, correct=correct)
    return trial


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def verdict(est: AccuracyEstimate | None, trial: TrialFit | None,
            limits: Thresholds) -> tuple[bool, str]:
    """(kept, why): the rules in the module docstring, first failing rule named."""
    notes: list[str] = []
    if trial is not None:
        if trial.error:
            return False, f"the trial fine-tune failed: {trial.error}"
        if trial.loss_drop is not None and trial.steps >= MIN_DECIDE_STEPS:
            if trial.loss_drop < limits.min_loss_drop:
                return False, (f"cannot learn the format: the trial's training loss did not "
                               f"drop ({trial.loss_drop:.1%} over {trial.steps} steps < "
                               f"min_loss_drop {limits.min_loss_drop:.0%})")
        elif trial.loss_drop is not None:
            notes.append(f"loss trend undecided ({trial.steps} < {MIN_DECIDE_STEPS} steps)")
        ci = span(trial.format_ci_low, trial.format_ci_high)
        fmt = (f"{trial.parsed}/{trial.n} held-out answers parse after the "
               f"{trial.steps}-step trial (95% CI {ci})")
        if trial.format_ci_high < limits.min_format_rate:
            return False, (f"cannot learn the format: {fmt}, below min_format_rate "
                           f"{pct(limits.min_format_rate)}")
        if limits.min_format_rate <= 0:
            notes.append(f"{fmt}; format not required (min_format_rate 0)")
        elif trial.format_rate < limits.min_format_rate:
            notes.append(f"format undecided: {fmt}; too few examples to rule out "
                         f"min_format_rate {pct(limits.min_format_rate)}")
        else:
            notes.append(fmt)
    if est is not None and est.accuracy < limits.min_accuracy:
        return False, (f"estimated accuracy {describe(est)} < min_accuracy "
                       f"{pct(limits.min_accuracy)}")
    return True, "; ".join(["passed the pre-screen", *notes])
