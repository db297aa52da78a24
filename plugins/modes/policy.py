"""The default `stratos_choose_mode` (trylast): the teacher's probe accuracy, with its
uncertainty, against the job's threshold.

The choice is measured, not configured: the probe step scores each teacher on a seeded
sample of the train split, and the best teacher's accuracy decides. A probe of n questions
only pins the accuracy down to its Wilson 95% interval, so:

- interval wholly at or above `mode_threshold` (default 0.5) → `alignment`: the teacher's
  own reasoning is worth keeping;
- interval wholly below it → `injection`: the teacher is given the answer;
- interval straddling it → `hybrid` (beyond the paper): per question, keep the teacher's
  forward reasoning where it is right and inject where it failed. Picking one side on a
  point estimate that the probe cannot separate from the threshold would be a coin toss.

A probe without questions (n = 0) falls back to the point estimate. `explain_mode` gives
the sentence the report prints: the number, its interval, the threshold and the outcome.
"""

from __future__ import annotations

from plugins.models.evaluate import wilson_interval
from schemas.specs import TaskSpec, TeacherScore
from stratosd import hookimpl


def decide(accuracy: float, threshold: float) -> str:
    """Point rule: `alignment` when accuracy >= threshold, else `injection`."""
    return "alignment" if accuracy >= threshold else "injection"


def teacher_interval(teacher: TeacherScore) -> tuple[float, float]:
    """Wilson 95% interval of the teacher's probe accuracy ((0, 1) without a probe)."""
    return wilson_interval(teacher.correct, teacher.n)


def straddles(teacher: TeacherScore, threshold: float) -> bool:
    """True when the probe's 95% interval has the threshold strictly inside it."""
    if teacher.n <= 0:
        return False
    low, high = teacher_interval(teacher)
    return low < threshold < high


def decide_with_interval(teacher: TeacherScore, threshold: float) -> str:
    """`hybrid` when the probe interval straddles the threshold, else the point rule."""
    return "hybrid" if straddles(teacher, threshold) else decide(teacher.accuracy, threshold)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def explain_mode(teacher: TeacherScore, threshold: float, mode: str | None = None) -> str:
    """One line for the report: accuracy [95% CI, n], threshold, chosen mode.

    `mode` is what was actually chosen (a plugin may override the built-in policy); the
    line says so when it differs from what this policy would have chosen.
    """
    ours = decide_with_interval(teacher, threshold)
    chosen = mode or ours
    if teacher.n > 0:
        low, high = teacher_interval(teacher)
        measured = (f"teacher {teacher.name} probe accuracy {_pct(teacher.accuracy)} "
                    f"[95% CI {100 * low:.0f}–{100 * high:.0f}%, n={teacher.n}]")
    else:
        measured = f"teacher {teacher.name} probe accuracy {_pct(teacher.accuracy)} (no probe)"
    if ours == "hybrid":
        line = f"{measured} straddles the threshold {_pct(threshold)}: {chosen}"
    else:
        cmp = ">=" if ours == "alignment" else "<"
        line = f"{measured} {cmp} threshold {_pct(threshold)}: {chosen}"
    if chosen != ours:
        line += f" (chosen by a plugin; the built-in policy says {ours})"
    if teacher.error:
        line += f" (probe errors: {teacher.error})"
    return line


@hookimpl(trylast=True)
def stratos_choose_mode(task: TaskSpec, teacher: TeacherScore, threshold: float) -> str | None:
    """Built-in policy: hybrid when the probe interval straddles the threshold, else
    alignment at or above it and injection below it."""
    return decide_with_interval(teacher, threshold)
