"""Out of memory: degrade a stage's settings before giving up, and say what was done.

The pipeline applies one rung per out-of-memory failure and records its note in the run
(`progress.degradations_{stage}`, then the stage result's `degradations`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from schemas.commands import RunInfo
from stratosd.errors import OutOfMemory

MICRO, ACCUM, CKPT = ("per_device_train_batch_size", "gradient_accumulation_steps",
                      "gradient_checkpointing")


@dataclass(frozen=True)
class Degradation:
    """One rung of the out-of-memory ladder: train params to set, or a student to switch to."""

    note: str  # what was done, in words (the stage result's `degradations`)
    train: dict[str, Any] = field(default_factory=dict)
    student: str | None = None


def next_degradation(run: RunInfo, stage: str, detail: dict[str, Any]) -> Degradation | None:
    """The next rung for a stage that ran out of memory, None when nothing is left.

    train: halve the micro-batch and raise gradient accumulation to keep the effective batch
    (down to a micro-batch of 1), then gradient checkpointing, then the next student that fits.
    detail holds the settings the child ran with; the job's own settings fill the gaps."""
    if stage != "train":
        return None
    train = run.spec.train
    micro = _as_int(detail.get(MICRO, train.get(MICRO)))
    accum = _as_int(detail.get(ACCUM, train.get(ACCUM))) or 1
    if micro is not None and micro > 1:
        new_micro = micro // 2
        new_accum = -(-micro * accum // new_micro)
        before, after = micro * accum, new_micro * new_accum
        kept = f"effective batch {before} kept" if before == after else \
            f"effective batch {before} → {after}"
        return Degradation(f"out of memory in {stage}: micro-batch {micro} → {new_micro}, "
                           f"gradient accumulation {accum} → {new_accum} ({kept})",
                           {MICRO: new_micro, ACCUM: new_accum})
    if not bool(detail.get(CKPT, train.get(CKPT, False))):
        return Degradation(f"out of memory in {stage}: gradient checkpointing on", {CKPT: True})
    chosen = run.results.get("select_student", {}).get("chosen")
    student = next_student(run)
    if student is None:
        return None
    return Degradation(f"out of memory in {stage}: student {chosen} → {student} "
                       "(the next that fits)", student=student)


def next_student(run: RunInfo) -> str | None:
    """The best kept, fitting student smaller than the current one and not tried yet."""
    sel = run.results.get("select_student", {})
    cands = [c for c in sel.get("candidates", []) if isinstance(c, dict) and c.get("model")]
    tried = {*run.progress.get("oom_students", []), sel.get("chosen")}
    current = next((c for c in cands if c["model"] == sel.get("chosen")), {})

    def smaller(c: dict[str, Any]) -> bool:
        for key in ("est_train_mem_mib", "params_m"):
            mine, theirs = float(current.get(key) or 0), float(c.get(key) or 0)
            if mine > 0 and theirs > 0:
                return theirs < mine
        return True  # sizes unknown: worth a try

    left = [c for c in cands if c.get("kept", True) and c.get("fits", True)
            and c["model"] not in tried and smaller(c)]

    def rank(c: dict[str, Any]) -> tuple[float, float, float]:  # plugins.students' order
        acc, drop = c.get("prescreen_accuracy"), c.get("probe_loss_drop")
        return (-(acc if acc is not None else -1.0), -(drop if drop is not None else -math.inf),
                float(c.get("params_m") or 0))

    return str(sorted(left, key=rank)[0]["model"]) if left else None


def nothing_left(run: RunInfo, stage: str, exc: OutOfMemory) -> OutOfMemory:
    """The run's error when the ladder is spent: what was tried, what to do."""
    done = run.progress.get(f"degradations_{stage}", [])
    tried = f" after {len(done)} degradation(s): " + "; ".join(done) if done else ""
    return OutOfMemory(f"{exc.message}; nothing left to degrade{tried}",
                       hint="pick a server with more memory, or a smaller student, then "
                       f"`stratosctl resume {run.run_id}`", detail=exc.detail)


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
