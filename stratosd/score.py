"""The multi-objective deployment score (PAPER.md) and the same-fleet comparison it scores.

For the candidates compared on the same fleet, each metric is min-max normalised over those
candidates into a "goodness" in [0, 1], 1 = best::

    accuracy (higher is better):  n_acc(i) = (acc(i) - min acc) / (max acc - min acc)
    latency, train_time, cost     n_m(i)   = (max m - m(i)) / (max m - min m)
    (lower is better):

    score(i) = (w_acc * n_acc(i) + w_lat * n_lat(i) + w_time * n_time(i) + w_cost * n_cost(i))
               / (w_acc + w_lat + w_time + w_cost)

so score(i) is in [0, 1]. Weights come from the job (`RunSpec.score`), 1.0 each by default.

Degenerate case: when every candidate has the same value of a metric (max = min, e.g. the
same student accuracy everywhere, or $0/h on every local host), nothing separates them on it
and the term counts as 1 for all of them; the weight stays in the denominator, so such a metric
lifts every score by the same amount and never changes the ranking.

A metric no candidate has a value for (e.g. no serving latency because deployment was
skipped) is left out: its weight leaves the sum, and the result says so in `dropped`.
Infeasible candidates (e.g. the student does not fit the server) get no score and do not take
part in the normalisation; with no metric left to compare, no candidate gets a score.

The same-fleet comparison it scores is `stratosd.comparison`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import structlog

from stratosd.errors import ConfigError

if TYPE_CHECKING:
    pass

log = structlog.stdlib.get_logger(__name__)
T = TypeVar("T")

METRICS: tuple[str, ...] = ("accuracy", "latency", "train_time", "cost")
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True, "latency": False, "train_time": False, "cost": False,
}
UNITS: dict[str, str] = {
    "accuracy": "fraction", "latency": "ms", "train_time": "s", "cost": "USD",
}
BASELINE_SELECTORS: tuple[str, ...] = (
    "hardware-first", "cost-first", "latency-first", "random", "weighted-sum",
)
FIT_HEADROOM = 0.9  # same usable share of memory as plugins.students.candidates.fit
GPU_RUNTIME_MIB = 600.0  # CUDA context, as in plugins.students.candidates
DEGENERATE_TERM = 1.0
FORMULA = (
    "score = sum_m w_m * n_m / sum_m w_m over m in {accuracy, latency, train_time, cost}; "
    "n_accuracy = (a - min a) / (max a - min a); "
    "n_m = (max m - m) / (max m - min m) for latency, train_time, cost "
    "(min/max over the feasible candidates; n_m = 1 for all when max m = min m)"
)


@dataclass(frozen=True)
class Candidate:
    """One option compared by the score: raw metric values (None = unknown)."""

    name: str
    accuracy: float | None = None
    latency: float | None = None  # ms
    train_time: float | None = None  # s
    cost: float | None = None  # USD
    feasible: bool = True
    note: str = ""

    def value(self, metric: str) -> float | None:
        """The raw value of one metric."""
        v = getattr(self, metric)
        return None if v is None else float(v)


@dataclass(frozen=True)
class ScoredCandidate:
    """A candidate with its normalised terms and score (None when infeasible)."""

    candidate: Candidate
    terms: dict[str, float]
    score: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        c = self.candidate
        return {
            "name": c.name, "feasible": c.feasible, "note": c.note,
            "raw": {m: c.value(m) for m in METRICS},
            "terms": dict(self.terms), "score": self.score,
        }


@dataclass(frozen=True)
class ScoreTable:
    """The result: scored candidates, the weights used and the formula as text."""

    rows: list[ScoredCandidate]
    weights: dict[str, float]
    ranges: dict[str, tuple[float, float]]
    degenerate: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    formula: str = FORMULA

    def by_name(self, name: str) -> ScoredCandidate:
        """The row of one candidate."""
        for row in self.rows:
            if row.candidate.name == name:
                return row
        raise KeyError(name)

    def best(self, exclude: Sequence[str] = ()) -> ScoredCandidate | None:
        """The highest-scoring feasible row (first wins ties), ignoring names in exclude."""
        scored = [r for r in self.rows
                  if r.score is not None and r.candidate.name not in exclude]
        return max(scored, key=lambda r: r.score or 0.0) if scored else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: everything needed to recompute each score by hand."""
        return {
            "formula": self.formula,
            "weights": dict(self.weights),
            "metrics": {m: {"higher_is_better": HIGHER_IS_BETTER[m], "unit": UNITS[m]}
                        for m in METRICS},
            "ranges": {m: {"min": lo, "max": hi} for m, (lo, hi) in self.ranges.items()},
            "degenerate": list(self.degenerate),
            "degenerate_rule": f"all candidates equal on a metric: its term is "
                               f"{DEGENERATE_TERM:g} for all of them",
            "dropped": list(self.dropped),
            "rows": [r.to_dict() for r in self.rows],
        }


def weights_dict(weights: Mapping[str, float] | Any | None) -> dict[str, float]:
    """Weights from a mapping or a ScoreWeights struct; missing ones are 1.0."""
    if weights is None:
        return dict.fromkeys(METRICS, 1.0)
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(METRICS)
        if unknown:
            raise ConfigError(f"unknown score weight(s): {', '.join(sorted(unknown))}",
                              hint=f"weights are {', '.join(METRICS)}", field="score")
        raw = {m: weights.get(m, 1.0) for m in METRICS}
    else:
        raw = {m: getattr(weights, m, 1.0) for m in METRICS}
    out = {}
    for m, w in raw.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"score weight {m} must be a finite number >= 0, got {w!r}",
                              hint="e.g. [score] accuracy = 2.0", field=f"score.{m}")
        out[m] = float(w)
    return out


def normalised_terms(values: Sequence[float], higher_is_better: bool) -> tuple[np.ndarray, bool]:
    """Min-max goodness in [0, 1] (1 = best) and whether the metric was degenerate."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:  # exact: min-max of values that differ at all is well defined
        return np.full(len(v), DEGENERATE_TERM), True
    n = (v - lo) / (hi - lo) if higher_is_better else (hi - v) / (hi - lo)
    return np.clip(n, 0.0, 1.0), False


def score_candidates(
    candidates: Sequence[Candidate], weights: Mapping[str, float] | Any | None = None
) -> ScoreTable:
    """Score the candidates against each other (see the module docstring for the formula)."""
    w = weights_dict(weights)
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    feasible = [c for c in candidates if c.feasible]
    used, dropped, degenerate = [], [], []
    ranges: dict[str, tuple[float, float]] = {}
    columns: dict[str, np.ndarray] = {}
    for m in METRICS:
        vals = [c.value(m) for c in feasible]
        known = [v for v in vals if v is not None and math.isfinite(v)]
        if not feasible or len(known) < len(vals):
            if feasible:
                dropped.append(m)  # a term some candidate lacks cannot be compared fairly
            continue
        col, flat = normalised_terms(known, HIGHER_IS_BETTER[m])
        columns[m] = col
        ranges[m] = (min(known), max(known))
        used.append(m)
        if flat:
            degenerate.append(m)
    total = sum(w[m] for m in used)
    if used and total <= 0:
        raise ConfigError(
            "the score weights of the metrics that can be compared sum to 0 "
            f"(weights {w}, metrics {used})",
            hint="give at least one of accuracy, latency, train_time, cost a weight > 0",
            field="score",
        )
    rows: list[ScoredCandidate] = []
    j = 0
    for c in candidates:
        if not c.feasible:
            rows.append(ScoredCandidate(candidate=c, terms={}, score=None))
            continue
        terms = {m: float(columns[m][j]) for m in used}
        s = sum(w[m] * terms[m] for m in used) / total if used else None
        rows.append(ScoredCandidate(candidate=c, terms=terms,
                                    score=None if s is None else float(min(max(s, 0.0), 1.0))))
        j += 1
    return ScoreTable(rows=rows, weights=w, ranges=ranges, degenerate=degenerate,
                      dropped=dropped)


def improvement_pct(score: float | None, baseline: float | None) -> float | None:
    """Relative gain of score over baseline in %; None when either is unknown or baseline is 0."""
    if score is None or baseline is None or baseline <= 0:
        return None
    return (score - baseline) / baseline * 100.0


def finite(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
