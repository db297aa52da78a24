"""Pipeline step `prescreen`: which students fit the server, and which can learn the task.

Args (defaults in `DEFAULTS`): `{task, students: [StudentSpec], offer: ServerOffer, trainer,
train: params, seed, sample_size: 24, n_shots: 3, probe_steps: 32, trial_trainer: None,
min_accuracy: 0.0, min_loss_drop: 0.05, min_format_rate: 0.2, time_budget_s: 300,
max_new_tokens: None}`. Optional input `dataset` (synthesised rows): their teacher reasoning
becomes the few-shot examples and the trial data; without it the task's reference reasoning
is used (answer-only targets when the task has none).

Per student: memory fit on the offer → few-shot accuracy (the paper's capacity pre-screen)
→ a `probe_steps` trial fine-tune with the job's SFT trainer → the trial model answers
`sample_size` held-out train examples in the final evaluation's format. The rule in
`plugins.students.screen` drops a student that cannot learn the format (its loss does not
drop, or its answers confidently never parse); the estimate it reports is the held-out
accuracy after the trial with a Wilson 95% interval. Keeping one anyway is the daemon's call.
A job's `quantization = "4bit"` is sized 4-bit on the offer (the server that will train); on a
host that cannot load a 4-bit base the trial trains the same adapters unquantized, and the
candidate's reason and `settings.trial_quantization` say so.

Why these defaults: 24 held-out examples are enough to rule a student out (0/24 parsed has
a 95% upper bound of 14%, below min_format_rate 20%; 16 is the least that can) and give an
estimate within about ±20 points; a 32-step trial is where a student that can use the
data has clearly started to (its loss falls by far more than 5%) and costs seconds for a
test-size model. Everything per student is bounded by `time_budget_s`: the few-shot screen
gets a quarter of it, the trial stops at three quarters, the held-out answers at the end,
each always doing at least one batch or step (n shrinks and the interval widens instead).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import structlog

from agents.stepctx import StepContext
from schemas.specs import AccuracyEstimate, ServerOffer, StudentCandidate, StudentSpec, TaskSpec
from stratosd.api import DataRow
from stratosd.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)

DEFAULTS: dict[str, Any] = {
    "task": None, "students": None, "offer": None, "trainer": "lora-sft", "train": {},
    "seed": 0, "sample_size": 24, "n_shots": 3, "probe_steps": 32, "trial_trainer": None,
    "min_accuracy": 0.0, "min_loss_drop": 0.05, "min_format_rate": 0.2,
    "time_budget_s": 300.0, "max_new_tokens": None,
}
MAX_TRIAL_ROWS = 64


def _convert(value: Any, typ: Any, field: str) -> Any:
    try:
        return msgspec.convert(value, typ)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"bad `{field}`: {exc}", field=f"args.{field}",
                          hint=f"pass a {getattr(typ, '__name__', typ)} as a dict") from exc


def _args(ctx: StepContext) -> dict[str, Any]:
    unknown = sorted(set(ctx.args) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown prescreen argument {unknown[0]!r}",
                          hint=f"allowed: {', '.join(DEFAULTS)}", field=f"args.{unknown[0]}")
    args = {**DEFAULTS, **ctx.args}
    for req in ("task", "students", "offer"):
        if not args[req]:
            raise ConfigError(f"prescreen needs `{req}`", field=f"args.{req}",
                              hint="the daemon passes task, students and the chosen offer")
    for name in ("sample_size", "probe_steps", "n_shots"):
        if not isinstance(args[name], int) or isinstance(args[name], bool) or args[name] < 0:
            raise ConfigError(f"prescreen `{name}` must be an integer >= 0, got {args[name]!r}",
                              field=f"args.{name}", hint=f"fix train.prescreen.{name}")
    if float(args["time_budget_s"]) <= 0:
        raise ConfigError("prescreen `time_budget_s` must be > 0", field="args.time_budget_s",
                          hint="seconds per student, e.g. 300")
    return args


def _split(task: Any, n: int, k: int, trial: bool) -> tuple[list[Any], list[Any]]:
    """(held-out sample from the end of the train split, the rest for shots and the trial).

    With a trial, at most half the train split is held out, so the trial has data too;
    without one, all but the k shots may be.
    """
    exs = list(task.examples("train"))
    n = min(n, len(exs) // 2 if trial else max(len(exs) - k, 0))
    return (exs[len(exs) - n:], exs[:len(exs) - n]) if n > 0 else ([], exs)


def _shots_and_rows(ctx: StepContext, task: Any, k: int, pool: list[Any],
                    held_q: set[str]) -> tuple[list[Any], Path | None]:
    """Few-shot examples and the trial dataset: teacher rows if given, else reference ones
    (answer-only targets where the task has no reference reasoning); none held out."""
    from plugins.students.candidates import Shot
    from plugins.trainers.corpus import read_rows

    dataset = ctx.inputs.get("dataset")
    if dataset is not None:
        rows = [r for r in read_rows(dataset) if r.question not in held_q]
    else:
        rows = []
        for ex in pool[:MAX_TRIAL_ROWS]:
            reasoning = task.reference_reasoning(ex.question, ex.answer) or ""
            rows.append(DataRow(example_id=ex.id, question=ex.question, answer=ex.answer,
                                reasoning=reasoning,
                                target=task.format_target(reasoning, ex.answer),
                                teacher="reference", mode="injection", verified=True))
    shots = [Shot(r.question, r.reasoning, r.answer) for r in rows[:k]]
    if not rows:
        return shots, None
    path = ctx.state_dir / "probe_rows.jsonl"
    path.write_bytes(b"\n".join(msgspec.json.encode(r) for r in rows) + b"\n")
    return shots, path


def run(ctx: StepContext) -> dict[str, Any]:
    """Fit, pre-screen and trial every student; pick the best kept one."""
    from plugins.students import candidates as cand
    from plugins.students import screen

    args = _args(ctx)
    spec = _convert(args["task"], TaskSpec, "task")
    students = _convert(args["students"], list[StudentSpec], "students")
    offer = _convert(args["offer"], ServerOffer, "offer")
    task = ctx.plugins.task(spec.name, spec.params)
    train = dict(args["train"] or {})
    k, steps = int(args["n_shots"]), int(args["probe_steps"])
    limits = screen.Thresholds(min_accuracy=float(args["min_accuracy"]),
                               min_loss_drop=float(args["min_loss_drop"]),
                               min_format_rate=float(args["min_format_rate"]))
    trainer = screen.trial_trainer(str(args["trainer"]), args["trial_trainer"])

    fitted = cand.fit(  # the target server's memory, as the job will train there
        students, offer, trainer=args["trainer"],
        seq_len=int(train.get("max_length", 512)),
        batch_size=int(train.get("per_device_train_batch_size", 8)),
        lora_r=int(train.get("lora_r", 16)),
        gradient_checkpointing=bool(train.get("gradient_checkpointing", False)),
        quantization=str(train.get("quantization", "none")),
    )
    trial_train, trial_note = screen.trial_train_params(train, cuda=_cuda())
    if trial_note and steps > 0:
        log.info("prescreen_trial_changed", note=trial_note)
    sample, pool = _split(task, int(args["sample_size"]), k, steps > 0)
    shots, rows = _shots_and_rows(ctx, task, k, pool, {ex.question for ex in sample})
    max_new = int(args["max_new_tokens"] or _max_new_tokens(task, shots))
    budget = float(args["time_budget_s"])

    out: list[StudentCandidate] = []
    for i, c in enumerate(fitted):
        ctx.progress(i, len(fitted), unit="student", message=f"pre-screening {c.model}")
        if ctx.should_stop():
            break
        if not c.fits:
            out.append(c)
            continue
        t0 = time.monotonic()
        few = cand.prescreen_accuracy(c.model, task, shots, sample, max_new_tokens=max_new,
                                      deadline=t0 + budget / 4)
        few_est = screen.estimate(int(few["correct"]), int(few["n"]),
                                  f"few-shot ({len(shots)} shots), held-out train examples")
        trial = None
        note = "; few-shot cut short by time_budget_s" if few["stopped_by_time"] else ""
        if steps > 0 and rows is not None and sample:
            trial = screen.run_trial(
                c.model, task, rows, sample, ctx.state_dir / f"probe-{i}", steps=steps,
                trainer=trainer, train=trial_train, max_new_tokens=max_new,
                seed=int(args["seed"]),
                train_deadline=t0 + budget * 3 / 4, eval_deadline=t0 + budget,
                n_params=c.params_m * 1e6, should_stop=ctx.should_stop)
            note += f"; {trial_note}" if trial_note else ""
        elif steps > 0:
            note += "; no trial: no held-out examples or no trial data"
        est = screen.trial_estimate(trial) if trial is not None and trial.n else few_est
        kept, why = screen.verdict(est, trial, limits)
        out.append(msgspec.structs.replace(
            c, prescreen_accuracy=few_est.accuracy, prescreen_n=few_est.n,
            prescreen_ci_low=few_est.ci_low, prescreen_ci_high=few_est.ci_high,
            probe_loss_drop=None if trial is None else trial.loss_drop, trial=trial,
            estimate=est, kept=kept,
            reason=_reason(kept, why, c.reason, few_est, trial, est) + note))
    ctx.progress(len(fitted), len(fitted), unit="student", message="pre-screen done")

    best = cand.choose(out)
    if best is not None and best.estimate is not None:
        reason = (f"chose {best.model}: highest pre-screen estimate "
                  f"({screen.describe(best.estimate)}, {best.estimate.basis}), then trial loss "
                  "drop, then fewest parameters")
    else:
        reason = "no student kept: " + " | ".join(f"{c.model}: {c.reason}" for c in out)
    prediction: AccuracyEstimate | None = None if best is None else best.estimate
    return {"candidates": [msgspec.to_builtins(c) for c in out],
            "chosen": best.model if best else None, "reason": reason,
            "shots": len(shots), "sample_size": len(sample),
            "prediction": None if prediction is None else msgspec.to_builtins(prediction),
            "settings": {"sample_size": len(sample), "probe_steps": steps,
                         "trial_trainer": trainer,
                         "trial_quantization": str(trial_train.get("quantization", "none")),
                         "min_accuracy": limits.min_accuracy,
                         "min_loss_drop": limits.min_loss_drop,
                         "min_format_rate": limits.min_format_rate,
                         "time_budget_s": budget}}


def _reason(kept: bool, why: str, fit_reason: str, few: AccuracyEstimate, trial: Any,
            est: AccuracyEstimate) -> str:
    from plugins.students.screen import describe

    parts = [f"{'kept' if kept else 'dropped'}: {why}", fit_reason,
             f"few-shot pre-screen {describe(few)}"]
    if trial is not None and trial.error is None:
        drop = "n/a" if trial.loss_drop is None else f"{trial.loss_drop:.1%}"
        parts.append(f"trial fine-tune {trial.steps} steps ({trial.trainer}), probe loss drop "
                     f"{drop}, held-out accuracy {describe(est)}"
                     + ("; cut short by time_budget_s" if trial.stopped_by_time else ""))
    return "; ".join(parts)


def _cuda() -> bool:
    from plugins.trainers.common import cuda_available

    return cuda_available()


def _max_new_tokens(task: Any, shots: list[Any]) -> int:
    """Room for the longest shot's target, plus slack; at least 16, at most 256."""
    longest = max((len(task.format_target(s.reasoning, s.answer)) for s in shots), default=64)
    return max(16, min(256, int(longest * 1.5)))
