"""The default `stratos_choose_mode` (trylast): probe accuracy against the job's threshold.

The choice is measured, not configured: the probe step scores each teacher on a seeded
sample of the train split, and the best teacher's accuracy decides. At or above
`mode_threshold` (default 0.5) the teacher's own reasoning is worth keeping → `alignment`;
below it → `injection` (the teacher is given the answer). `explain_mode` gives the sentence
the report prints, so a user sees the number, the threshold and the outcome.
"""

from __future__ import annotations

from schemas.specs import TaskSpec, TeacherScore
from stratosd import hookimpl


def decide(accuracy: float, threshold: float) -> str:
    """`alignment` when accuracy >= threshold, else `injection`."""
    return "alignment" if accuracy >= threshold else "injection"


def explain_mode(teacher: TeacherScore, threshold: float) -> str:
    """One line for the report: measured accuracy, threshold, chosen mode."""
    mode = decide(teacher.accuracy, threshold)
    cmp = ">=" if mode == "alignment" else "<"
    note = f" (probe errors: {teacher.error})" if teacher.error else ""
    return (f"teacher {teacher.name} probe accuracy {teacher.accuracy:.2f} "
            f"({teacher.correct}/{teacher.n}) {cmp} threshold {threshold:.2f} -> {mode}{note}")


@hookimpl(trylast=True)
def stratos_choose_mode(task: TaskSpec, teacher: TeacherScore, threshold: float) -> str | None:
    """Built-in policy: alignment at or above the threshold, injection below it."""
    return decide(teacher.accuracy, threshold)
