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

The comparison (`compare_selectors`): the run's own pick and each built-in baseline selector's
pick from the same offers under the same constraints. Only the run's server was measured; the
others' metrics are derived from those measurements (`derive_metrics`):
accuracy = the measured student accuracy (infeasible when select_student's memory estimate
does not fit the server), train_time = measured s x H(run) / H(server), latency = measured
serving p50 x H(run) / H(server) + the server's network latency_ms, cost = train hours x $/h
+ synthesis cost; H is `plugins.selectors.objectives.hardware_scores`.
Only NumPy and msgspec are imported here; the selector plugins are imported inside functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import structlog

from schemas.specs import ServerOffer
from stratosd.errors import ConfigError, StratosError

if TYPE_CHECKING:
    from schemas.commands import RunInfo
    from stratosd.plugins import Plugins

log = structlog.stdlib.get_logger(__name__)

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


# --- the same-fleet comparison ------------------------------------------------------------


def stage_result(run: RunInfo, stage: str) -> dict[str, Any]:
    """A stage's result as a dict ({} when missing or malformed)."""
    value = run.results.get(stage)
    return dict(value) if isinstance(value, dict) else {}


def sub_dict(data: dict[str, Any], key: str) -> dict[str, Any]:
    """data[key] when it is a dict, else {} (stage results are plain JSON data)."""
    value = data.get(key)
    return dict(value) if isinstance(value, dict) else {}


def finite(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def as_offer(value: Any) -> ServerOffer | None:
    """A ServerOffer from plain data, or None when it does not decode."""
    try:
        return msgspec.convert(value, ServerOffer)
    except (msgspec.ValidationError, TypeError):
        return None


def measured_metrics(run: RunInfo) -> dict[str, Any]:
    """The run's measured numbers the score needs, each with where it came from."""
    ev, tr, dep, syn = (stage_result(run, s)
                        for s in ("evaluate", "train", "deploy", "synthesize"))
    after = sub_dict(ev, "after")
    metrics = sub_dict(dep, "metrics")
    p50, p50_src = finite(metrics.get("latency_ms_p50")), "deploy: endpoint p50"
    if p50 is None:
        p50 = finite(after.get("latency_ms_mean"))
        p50_src = "evaluate: mean latency after training"
    return {
        "accuracy": finite(after.get("accuracy")),
        "train_time_s": finite(tr.get("train_time_s")),
        "serve_latency_ms": p50,
        "serve_latency_source": p50_src if p50 is not None else "missing",
        "synthesis_cost_usd": finite(syn.get("cost_usd")) or 0.0,
    }


def student_fit(run: RunInfo, trained_on: ServerOffer, offer: ServerOffer) -> tuple[bool, str]:
    """Whether the chosen student trains and serves on offer, from select_student's estimates."""
    from plugins.students.candidates import capacity_mib

    stu = stage_result(run, "select_student")
    chosen = stu.get("chosen")
    cand = next((c for c in stu.get("candidates", []) or []
                 if isinstance(c, dict) and c.get("model") == chosen), None)
    if cand is None:
        return True, "no memory estimate for the student: assumed to fit"
    need = max(finite(cand.get("est_train_mem_mib")) or 0.0,
               finite(cand.get("est_serve_mem_mib")) or 0.0)
    src_gpu, dst_gpu = trained_on.gpu_count > 0, offer.gpu_count > 0
    # the estimate was made for the run's server: bf16 + CUDA runtime on GPUs, fp32 on CPU
    if src_gpu and not dst_gpu:
        need = max(need - GPU_RUNTIME_MIB, 0.0) * 2
    elif dst_gpu and not src_gpu:
        need = need / 2 + GPU_RUNTIME_MIB
    cap, what = capacity_mib(offer)
    if need > cap * FIT_HEADROOM:
        return False, (f"student needs ~{need:,.0f} MiB, server has {cap:,.0f} MiB {what} "
                       f"({FIT_HEADROOM:.0%} usable)")
    return True, f"student fits: ~{need:,.0f} MiB of {cap:,.0f} MiB {what}"


def derive_metrics(
    run: RunInfo, measured: dict[str, Any], trained_on: ServerOffer, offer: ServerOffer,
    h_run: float, h_offer: float,
) -> dict[str, Any]:
    """Score metrics of offer, derived from those measured on trained_on (see module docs)."""
    ratio = h_run / h_offer if h_offer > 0 else math.inf
    same = offer.id == trained_on.id
    train_s = measured["train_time_s"]
    t = None if train_s is None else (train_s if same else train_s * ratio)
    p50 = measured["serve_latency_ms"]
    lat = None if p50 is None else (p50 if same else p50 * ratio) + offer.latency_ms
    cost = None if t is None else t / 3600.0 * offer.price_usd_per_hour \
        + measured["synthesis_cost_usd"]
    fits, fit_note = student_fit(run, trained_on, offer)
    return {"accuracy": measured["accuracy"], "train_time_s": t, "latency_ms": lat,
            "cost_usd": cost, "feasible": fits, "fit": fit_note,
            "measured": same, "hardware_ratio": ratio}


def compare_selectors(run: RunInfo, plugins: Plugins) -> dict[str, Any]:
    """The run's pick and each baseline's pick on the same fleet, scored together."""
    sel = stage_result(run, "select_server")
    offers = [o for o in (as_offer(x) for x in sel.get("offers", []) or []) if o is not None]
    selection = sub_dict(sel, "selection")
    chosen = as_offer(selection.get("chosen"))
    if chosen is None or not offers:
        return {"available": False, "reason": "select_server stored no offers or no pick"}
    from plugins.selectors.objectives import hardware_scores

    trained_on, notes = chosen, []
    agent = run.progress.get("agent_id")
    if agent and agent != chosen.agent_id:
        moved = next((o for o in offers if o.agent_id == agent), None)
        if moved is not None:
            trained_on = moved
            notes.append(f"the run moved from {chosen.id} to {moved.id} after a failure; "
                         "measurements are from the latter")
    own = run.spec.selector
    picks: list[tuple[str, str, ServerOffer | None, str]] = [
        (own, "stratos", trained_on, selection.get("explanation", ""))]
    for name in BASELINE_SELECTORS:
        if name == own or name not in plugins.selectors:
            continue
        try:
            got = plugins.selectors.get(name)().select(
                offers, run.spec.constraints, est_train_hours=run.spec.est_train_hours,
                seed=run.spec.seed)
            picks.append((name, "baseline", got.chosen, got.explanation))
        except StratosError as exc:  # e.g. Infeasible: the baseline has no pick either
            picks.append((name, "baseline", None, f"no pick: {exc.message}"))
        except Exception as exc:  # noqa: BLE001 - a broken baseline must not lose the score
            log.warning("baseline_selector_failed", selector=name, exc_info=True)
            picks.append((name, "baseline", None, f"selector failed: {exc!r}"))
    measured = measured_metrics(run)
    servers = [o for _n, _r, o, _e in picks if o is not None]
    hs = hardware_scores([trained_on, *servers])
    h_run = float(hs[0])
    h_of = {o.id: float(h) for o, h in zip(servers, hs[1:], strict=True)}
    rows, cands = [], []
    for name, role, offer, why in picks:
        row: dict[str, Any] = {"selector": name, "role": role, "explanation": why}
        if offer is None:
            row.update(server=None, feasible=False, fit=why)
            cands.append(Candidate(name=name, feasible=False, note=why))
            rows.append(row)
            continue
        d = derive_metrics(run, measured, trained_on, offer, h_run, h_of[offer.id])
        row.update(server=offer.id, gpu_model=offer.gpu_model, gpu_count=offer.gpu_count,
                   hardware_score=h_of[offer.id], price_usd_per_hour=offer.price_usd_per_hour,
                   network_latency_ms=offer.latency_ms, **d)
        cands.append(Candidate(name=name, accuracy=d["accuracy"], latency=d["latency_ms"],
                               train_time=d["train_time_s"], cost=d["cost_usd"],
                               feasible=d["feasible"], note=d["fit"]))
        rows.append(row)
    try:
        table = score_candidates(cands, run.spec.score)
    except ConfigError as exc:
        notes.append(f"{exc.message}: equal weights used instead")
        table = score_candidates(cands, None)
    for row, scored in zip(rows, table.rows, strict=True):
        row["terms"], row["score"] = scored.terms, scored.score
    best = table.best(exclude=[own])
    mine = table.by_name(own).score
    return {
        "available": True, "selector": own, "trained_on": trained_on.id,
        "hardware_score_trained_on": h_run, "measured": measured, "rows": rows,
        "score": table.to_dict(), "stratos_score": mine,
        "best_baseline": None if best is None else best.candidate.name,
        "best_baseline_score": None if best is None else best.score,
        "improvement_pct": improvement_pct(mine, None if best is None else best.score),
        "notes": notes,
    }
