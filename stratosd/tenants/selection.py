"""Per-tenant student choice under hard limits (ACME step 1, measured where it can be).

Each candidate is a point (quality ↑, latency ↓, size ↓); size (params) is also the proxy for
compute and energy per token, and on one agent the cost per answer is latency × its price, so
it orders like latency. Some candidates are measured on the tenant's agent (a short LoRA fit
on its probe data, then evaluation); the rest are predicted from the measured ones: every
quality figure by a polynomial in log10(params) of degree min(2, measured − 1) (ACME fits
degree 2 in depth and width), latency linearly in params; a predicted point says so and
`basis` says from which points and whether it is extrapolated.

**The quality axis** is chosen from the measured points, in this order, and named in the pick
(`quality_metric`, `quality_note`, the formula): exact accuracy when it separates the measured
candidates (best − worst > 2 binomial standard errors at the probe size); else the task's
partial credit when it has one and that separates them; else the target likelihood
exp(−NLL per target token), teacher-forced on the probe rows' gold targets, when the NLLs
differ by more than 2 standard errors; else none (every candidate's quality counts equal and
the pick is by latency and size). Exact accuracy stays on every point either way.

Size (params, memory) and latency limits are hard filters, never objectives. Among what fits,
the Pareto front is kept and the pick is the front's best trade-off score

    score = w_q·q' − w_l·lat' − w_s·size'   (x' = min-max normalised over fitting points)

which is the best score of all fitting points (a dominated point never scores higher).
Baselines: highest quality (`highest-accuracy`, on the same axis), largest that fits, and a
seeded random pick.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import msgspec
import numpy as np

from schemas.tenants import CandidatePoint, StudentPick, TenantLimits, TradeoffWeights
from stratosd.errors import Infeasible

MEMORY_OVERHEAD = 1.2  # fp32 weights plus activations and runtime, for serving
Z = 2.0  # standard errors a difference must exceed to separate candidates
QUALITY = {
    "accuracy": "exact accuracy on the probe rows",
    "partial": "the task's partial credit on the probe rows",
    "target_prob": "target likelihood exp(−NLL per target token), teacher-forced on the probe "
                   "rows' gold targets",
    "none": "none (no measure separated the measured candidates: quality counts equal)",
}


def memory_mib(params: int) -> float:
    """The serving memory estimate of a model with params parameters (fp32 + 20 %)."""
    return params * 4 * MEMORY_OVERHEAD / 2**20


def _trend(xs: np.ndarray, ys: Sequence[float], x: float, deg: int) -> float:
    if deg <= 0:
        return float(np.mean(ys))
    return float(np.polyval(np.polyfit(xs, np.array(ys), deg), x))


def _clamp01(v: float) -> float:
    return min(1.0, max(0.0, v))


def predict(measured: Sequence[CandidatePoint], model: str, params: int) -> CandidatePoint:
    """A predicted point for an unmeasured candidate, from the measured ones (labelled so)."""
    if not measured:
        raise Infeasible("no candidate was measured, nothing to predict from",
                         hint="measure at least one candidate (students.measure)",
                         field="students.measure")
    xs = np.array([math.log10(max(p.params, 1)) for p in measured])
    ps = np.array([float(p.params) for p in measured])
    x = math.log10(max(params, 1))
    deg = min(2, len(set(xs.tolist())) - 1)

    def graded(values: list[float | None], bound: bool) -> float | None:
        if any(v is None for v in values):
            return None
        v = _trend(xs, [float(u) for u in values if u is not None], x, deg)
        return _clamp01(v) if bound else max(0.0, v)

    lat = [p.latency_ms for p in measured]
    if len(set(ps.tolist())) > 1:
        lat_p = float(np.polyval(np.polyfit(ps, np.array(lat), 1), params))
        lat_how = "a line in params through them"
    else:
        lat_p = float(np.mean(lat) * params / max(ps.mean(), 1.0))
        lat_how = "scaled by params from it"
    lo, hi = int(ps.min()), int(ps.max())
    where = ("within the measured sizes" if lo <= params <= hi else
             f"extrapolated, {params / hi:.1f}× the largest measured" if params > hi else
             f"extrapolated, {lo / max(params, 1):.1f}× below the smallest measured")
    how = ("the mean of", "a line in log10(params) through",
           "a parabola in log10(params) through")[max(deg, 0)]
    names = ", ".join(p.model for p in measured)
    basis = (f"predicted: quality {how} {names} (measured; {where}); latency {lat_how}; "
             "params counted, memory from params")
    return CandidatePoint(
        model=model, params=params, accuracy=_clamp01(_trend(xs, [p.accuracy for p in measured],
                                                              x, deg)),
        latency_ms=max(0.0, lat_p), memory_mib=memory_mib(params), predicted=True,
        partial=graded([p.partial for p in measured], True),
        token_accuracy=graded([p.token_accuracy for p in measured], True),
        target_nll=graded([p.target_nll for p in measured], False), basis=basis)


def _share_separates(values: Sequence[tuple[float, int]]) -> bool:
    """Do the highest and lowest shares differ by more than Z binomial standard errors? (A
    point without a probe size: any difference counts.)"""
    hi, n_hi = max(values)
    lo, n_lo = min(values)
    if hi - lo <= 1e-12:
        return False
    if n_hi <= 0 or n_lo <= 0:
        return True
    p = (hi * n_hi + lo * n_lo) / (n_hi + n_lo)
    return hi - lo > Z * math.sqrt(p * (1 - p) * (1 / n_hi + 1 / n_lo))


def quality_axis(points: Sequence[CandidatePoint]) -> tuple[str, str]:
    """(metric, why) of the quality axis, decided on the measured points (module docstring)."""
    measured = [p for p in points if not p.predicted]
    if len(measured) < 2:
        return "accuracy", (f"{len(measured)} candidate measured: exact accuracy, with nothing "
                            "measured to compare it with")
    n = max(p.n_probe for p in measured)
    acc = [(p.accuracy, p.n_probe) for p in measured]
    span = (f"exact accuracy {min(acc)[0]:.3f}–{max(acc)[0]:.3f}"
            + (f" on {n} probe rows" if n else ""))
    if _share_separates(acc):
        return "accuracy", f"{span} separates the measured candidates (> {Z:g} SE)"
    why = f"{span} does not separate the measured candidates (≤ {Z:g} SE)"
    part = [(p.partial, p.n_probe) for p in measured if p.partial is not None]
    if (len(part) == len(measured) and any(abs(v - p.accuracy) > 1e-12
                                           for (v, _), p in zip(part, measured, strict=True))
            and _share_separates(part)):
        return "partial", (f"{why}; the task's partial credit {min(part)[0]:.3f}–"
                           f"{max(part)[0]:.3f} does")
    nll = [(p.target_nll, p.target_nll_se or 0.0) for p in measured if p.target_nll is not None]
    if len(nll) == len(measured):
        (lo, se_lo), (hi, se_hi) = min(nll), max(nll)
        if hi - lo > Z * math.hypot(se_lo, se_hi) and hi - lo > 1e-12:
            return "target_prob", (f"{why}; the target NLL per token {lo:.3f}–{hi:.3f} "
                                   f"(SE {se_lo:.3f}, {se_hi:.3f}) does")
        why += f"; nor does the target NLL per token ({lo:.3f}–{hi:.3f})"
    return "none", f"{why}: quality counts equal, the pick is by latency and size"


def quality_of(point: CandidatePoint, metric: str) -> float:
    """The point's value on the quality axis (0 where it has no such figure)."""
    if metric == "accuracy":
        return point.accuracy
    if metric == "partial":
        return point.partial if point.partial is not None else 0.0
    if metric == "target_prob":
        return math.exp(-point.target_nll) if point.target_nll is not None else 0.0
    return 0.0


def apply_limits(point: CandidatePoint, limits: TenantLimits,
                 over_budget: Mapping[str, str] | None = None) -> CandidatePoint:
    """The point marked fits=False with the first limit it breaks (over_budget: model →
    the budget refusal in numbers, from stratosd.tenants.budget)."""
    why = ""
    if over_budget and point.model in over_budget:
        why = f"budget: {over_budget[point.model]}"
    elif limits.max_params is not None and point.params > limits.max_params:
        why = f"params {point.params} > max_params {limits.max_params}"
    elif limits.max_memory_mib is not None and point.memory_mib > limits.max_memory_mib:
        why = f"memory {point.memory_mib:.1f} MiB > max_memory_mib {limits.max_memory_mib}"
    elif limits.max_latency_ms is not None and point.latency_ms > limits.max_latency_ms:
        why = f"latency {point.latency_ms:.1f} ms > max_latency_ms {limits.max_latency_ms}"
    return msgspec.structs.replace(point, fits=not why, why_not=why)


def _q(p: CandidatePoint) -> float:
    return p.quality if p.quality is not None else p.accuracy


def pareto_front(points: Sequence[CandidatePoint]) -> list[CandidatePoint]:
    """Points no other point beats on quality, latency and size at once."""
    def dominates(a: CandidatePoint, b: CandidatePoint) -> bool:
        ge = _q(a) >= _q(b) and a.latency_ms <= b.latency_ms and a.params <= b.params
        gt = _q(a) > _q(b) or a.latency_ms < b.latency_ms or a.params < b.params
        return ge and gt
    return [p for p in points if not any(dominates(q, p) for q in points if q is not p)]


def formula(w: TradeoffWeights, metric: str = "accuracy") -> str:
    """The trade-off score as printed in reports, naming the quality axis."""
    return (f"score = {w.quality:g}·q' − {w.latency:g}·latency' − {w.size:g}·size'  "
            "(x' min-max normalised over the candidates that fit; size = params, the "
            f"compute/energy proxy; q = {QUALITY.get(metric, metric)})")


def _norm(values: Sequence[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in values]


def tradeoff_scores(points: Sequence[CandidatePoint], w: TradeoffWeights) -> dict[str, float]:
    """model → trade-off score over these points (quality: `quality`, else accuracy)."""
    qual = _norm([_q(p) for p in points])
    lat = _norm([p.latency_ms for p in points])
    size = _norm([float(p.params) for p in points])
    return {p.model: round(w.quality * a - w.latency * la - w.size * s, 6)
            for p, a, la, s in zip(points, qual, lat, size, strict=True)}


def choose(tenant: str, points: Sequence[CandidatePoint], limits: TenantLimits,
           weights: TradeoffWeights, rule: str = "pareto", seed: int = 0,
           over_budget: Mapping[str, str] | None = None) -> StudentPick:
    """The tenant's student by rule, with every baseline and score; Infeasible if none fits."""
    metric, note = quality_axis(points)
    limited = [apply_limits(msgspec.structs.replace(p, quality=round(quality_of(p, metric), 6)),
                            limits, over_budget) for p in points]
    fitting = [p for p in limited if p.fits]
    if not fitting:
        closest = min(limited, key=lambda p: p.params)
        raise Infeasible(f"tenant {tenant}: no student candidate fits its limits "
                         f"(closest: {closest.model}, {closest.why_not})",
                         hint="raise the tenant's limits (budget_usd, max_params, ...) or add "
                         "a smaller candidate",
                         field=f"tenants.{tenant}.limits")
    scores = tradeoff_scores(fitting, weights)
    front = pareto_front(fitting)
    best_q = max(fitting, key=lambda p: (_q(p), p.accuracy, -p.params))
    largest = max(fitting, key=lambda p: p.params)
    rnd = random.Random(f"{seed}:{tenant}").choice(sorted(fitting, key=lambda p: p.model))
    pareto = max(front, key=lambda p: (scores[p.model], -p.params))
    baselines = {"highest-accuracy": best_q.model, "largest": largest.model,
                 "random": rnd.model, "pareto": pareto.model}
    return StudentPick(tenant=tenant, chosen=baselines[rule], rule=rule,
                       formula=formula(weights, metric), points=limited,
                       pareto=[p.model for p in front], scores=scores, baselines=baselines,
                       quality_metric=metric, quality_note=note)
