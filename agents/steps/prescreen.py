"""Pipeline step `prescreen`: which students fit the server, and which can use the reasoning.

Args: `{task, students: [StudentSpec], offer: ServerOffer, trainer, train: params, seed,
sample_size: 8, n_shots: 3, probe_steps: 0, min_accuracy: 0.0, min_loss_drop: 0.0}`.
Optional input `dataset` (synthesised rows): their teacher reasoning becomes the few-shot
examples and the probe fine-tune data; without it the task's reference reasoning is used.

Per student: memory fit on the offer → few-shot accuracy on a small train sample (the paper's
capacity pre-screen) → optionally `probe_steps` LoRA steps and the relative loss drop. Students
below a threshold are dropped with the reason; keeping one anyway is the daemon's call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import structlog

from agents.stepctx import StepContext
from schemas.specs import ServerOffer, StudentCandidate, StudentSpec, TaskSpec
from stratosd.api import DataRow
from stratosd.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)

DEFAULTS: dict[str, Any] = {
    "task": None, "students": None, "offer": None, "trainer": "lora-sft", "train": {},
    "seed": 0, "sample_size": 8, "n_shots": 3, "probe_steps": 0, "min_accuracy": 0.0,
    "min_loss_drop": 0.0,
}


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
    return args


def _shots_and_rows(ctx: StepContext, task: Any, k: int) -> tuple[list[Any], Path | None]:
    """Few-shot examples and the probe dataset: teacher rows if given, else reference ones."""
    from plugins.students.candidates import Shot, reference_shots
    from plugins.trainers.corpus import read_rows

    dataset = ctx.inputs.get("dataset")
    if dataset is not None:
        rows = read_rows(dataset)
        shots = [Shot(r.question, r.reasoning, r.answer) for r in rows[:k]]
        return shots, dataset
    shots = reference_shots(task, k)
    rows = []
    for ex in task.examples("train")[:64]:
        reasoning = task.reference_reasoning(ex.question, ex.answer)
        if reasoning is None:
            break
        rows.append(DataRow(example_id=ex.id, question=ex.question, answer=ex.answer,
                            reasoning=reasoning, target=task.format_target(reasoning, ex.answer),
                            teacher="reference", mode="injection", verified=True))
    if not rows:
        return shots, None
    path = ctx.state_dir / "probe_rows.jsonl"
    path.write_bytes(b"\n".join(msgspec.json.encode(r) for r in rows) + b"\n")
    return shots, path


def run(ctx: StepContext) -> dict[str, Any]:
    """Fit, pre-screen and (optionally) probe every student; pick the best kept one."""
    from plugins.students import candidates as cand

    args = _args(ctx)
    spec = _convert(args["task"], TaskSpec, "task")
    students = _convert(args["students"], list[StudentSpec], "students")
    offer = _convert(args["offer"], ServerOffer, "offer")
    task = ctx.plugins.task(spec.name, spec.params)
    train = dict(args["train"] or {})
    k, n = int(args["n_shots"]), int(args["sample_size"])

    fitted = cand.fit(
        students, offer, trainer=args["trainer"],
        seq_len=int(train.get("max_length", 512)),
        batch_size=int(train.get("per_device_train_batch_size", 8)),
        lora_r=int(train.get("lora_r", 16)),
        gradient_checkpointing=bool(train.get("gradient_checkpointing", False)),
    )
    shots, probe_rows = _shots_and_rows(ctx, task, k)
    shot_ids = {getattr(s, "question", "") for s in shots}
    sample = [ex for ex in task.examples("train") if ex.question not in shot_ids][:n]
    max_new = _max_new_tokens(task, shots)

    out: list[StudentCandidate] = []
    for i, c in enumerate(fitted):
        ctx.progress(i, len(fitted), unit="student", message=f"pre-screening {c.model}")
        if ctx.should_stop():
            break
        if not c.fits:
            out.append(c)
            continue
        screen = cand.prescreen_accuracy(c.model, task, shots, sample, max_new_tokens=max_new)
        acc = float(screen["accuracy"])
        drop: float | None = None
        probe_note = ""
        if int(args["probe_steps"]) > 0:
            if probe_rows is None:
                probe_note = "; no probe data (task has no reference reasoning, no dataset)"
            else:
                probe = cand.probe_finetune(
                    c.model, task, probe_rows, ctx.state_dir / f"probe-{i}",
                    steps=int(args["probe_steps"]), trainer="lora-sft",
                    params=_probe_params(train), seed=int(args["seed"]))
                drop = float(probe["loss_drop"])
        kept, why = _verdict(acc, drop, screen["n"], args)
        reason = f"{c.reason}; pre-screen {acc:.0%} of {screen['n']}" + (
            f"; probe loss drop {drop:.1%}" if drop is not None else "") + probe_note
        out.append(msgspec.structs.replace(
            c, prescreen_accuracy=acc, probe_loss_drop=drop, kept=kept,
            reason=f"{'kept' if kept else 'dropped'}: {why}; {reason}"))
    ctx.progress(len(fitted), len(fitted), unit="student", message="pre-screen done")

    best = cand.choose(out)
    if best is not None:
        reason = (f"chose {best.model}: highest pre-screen accuracy "
                  f"({best.prescreen_accuracy or 0:.0%}), then loss drop, then fewest parameters")
    else:
        reason = "no student kept: " + " | ".join(f"{c.model}: {c.reason}" for c in out)
    return {"candidates": [msgspec.to_builtins(c) for c in out],
            "chosen": best.model if best else None, "reason": reason,
            "shots": len(shots), "sample_size": len(sample)}


def _verdict(acc: float, drop: float | None, n: int, args: dict[str, Any]) -> tuple[bool, str]:
    if acc < float(args["min_accuracy"]):
        return False, f"pre-screen accuracy {acc:.0%} < min_accuracy {args['min_accuracy']:.0%}"
    if drop is not None and drop < float(args["min_loss_drop"]):
        return False, f"probe loss drop {drop:.1%} < min_loss_drop {args['min_loss_drop']:.1%}"
    return True, "above thresholds"


def _probe_params(train: dict[str, Any]) -> dict[str, Any]:
    from plugins.trainers.hparams import COMMON_PARAMS, LORA_PARAMS

    keep = set(COMMON_PARAMS) | set(LORA_PARAMS)
    return {k: v for k, v in train.items() if k in keep and k not in ("save_steps", "max_steps")}


def _max_new_tokens(task: Any, shots: list[Any]) -> int:
    """Room for the longest shot's target, plus slack; at least 16, at most 256."""
    longest = max((len(task.format_target(s.reasoning, s.answer)) for s in shots), default=64)
    return max(16, min(256, int(longest * 1.5)))
