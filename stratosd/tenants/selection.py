"""Per-tenant student choice under hard limits (ACME step 1, measured where it can be).

Each candidate is a point (accuracy ↑, latency ↓, size ↓). Some are measured on the tenant's
agent (a short LoRA fit on its probe data, then evaluation); the rest are predicted from the
measured ones: accuracy by a polynomial in log10(params) of degree min(2, measured − 1) (ACME
fits degree 2 in depth and width), latency linearly in params; a predicted point says so.
Size (params, memory) and latency limits are hard filters, never objectives. Among what fits,
the Pareto front is kept and the pick is the front's best trade-off score

    score = w_q·acc' − w_l·lat' − w_s·size'   (x' = min-max normalised over fitting points)

Baselines: highest accuracy, largest that fits, and a seeded random pick.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import numpy as np

from schemas.tenants import CandidatePoint, StudentPick, TenantLimits, TradeoffWeights
from stratosd.errors import Infeasible

MEMORY_OVERHEAD = 1.2  # fp32 weights plus activations and runtime, for serving


def memory_mib(params: int) -> float:
    """The serving memory estimate of a model with params parameters (fp32 + 20 %)."""
    return params * 4 * MEMORY_OVERHEAD / 2**20


def predict(measured: Sequence[CandidatePoint], model: str, params: int) -> CandidatePoint:
    """A predicted point for an unmeasured candidate, from the measured ones."""
    if not measured:
        raise Infeasible("no candidate was measured, nothing to predict from",
                         hint="measure at least one candidate (students.measure)",
                         field="students.measure")
    xs = np.array([math.log10(max(p.params, 1)) for p in measured])
    ps = np.array([float(p.params) for p in measured])
    acc = np.array([p.accuracy for p in measured])
    lat = np.array([p.latency_ms for p in measured])
    x = math.log10(max(params, 1))
    deg = min(2, len(set(xs.tolist())) - 1)
    a = float(np.polyval(np.polyfit(xs, acc, deg), x)) if deg > 0 else float(acc.mean())
    if len(set(ps.tolist())) > 1:
        lat_p = float(np.polyval(np.polyfit(ps, lat, 1), params))
    else:
        lat_p = float(lat.mean() * params / max(ps.mean(), 1.0))
    return CandidatePoint(model=model, params=params, accuracy=min(1.0, max(0.0, a)),
                          latency_ms=max(0.0, lat_p), memory_mib=memory_mib(params),
                          predicted=True)


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
    return CandidatePoint(model=point.model, params=point.params, accuracy=point.accuracy,
                          latency_ms=point.latency_ms, memory_mib=point.memory_mib,
                          predicted=point.predicted, fits=not why, why_not=why)


def pareto_front(points: Sequence[CandidatePoint]) -> list[CandidatePoint]:
    """Points no other point beats on accuracy, latency and size at once."""
    def dominates(a: CandidatePoint, b: CandidatePoint) -> bool:
        ge = (a.accuracy >= b.accuracy and a.latency_ms <= b.latency_ms
              and a.params <= b.params)
        gt = a.accuracy > b.accuracy or a.latency_ms < b.latency_ms or a.params < b.params
        return ge and gt
    return [p for p in points if not any(dominates(q, p) for q in points if q is not p)]


def formula(w: TradeoffWeights) -> str:
    """The trade-off score as printed in reports."""
    return (f"score = {w.quality:g}·acc' − {w.latency:g}·latency' − {w.size:g}·size'  "
            "(x' min-max normalised over the candidates that fit)")


def _norm(values: Sequence[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in values]


def tradeoff_scores(points: Sequence[CandidatePoint], w: TradeoffWeights) -> dict[str, float]:
    """model → trade-off score over these points."""
    acc = _norm([p.accuracy for p in points])
    lat = _norm([p.latency_ms for p in points])
    size = _norm([float(p.params) for p in points])
    return {p.model: round(w.quality * a - w.latency * la - w.size * s, 6)
            for p, a, la, s in zip(points, acc, lat, size, strict=True)}


def choose(tenant: str, points: Sequence[CandidatePoint], limits: TenantLimits,
           weights: TradeoffWeights, rule: str = "pareto", seed: int = 0,
           over_budget: Mapping[str, str] | None = None) -> StudentPick:
    """The tenant's student by rule, with every baseline and score; Infeasible if none fits."""
    limited = [apply_limits(p, limits, over_budget) for p in points]
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
    best_acc = max(fitting, key=lambda p: (p.accuracy, -p.params))
    largest = max(fitting, key=lambda p: p.params)
    rnd = random.Random(f"{seed}:{tenant}").choice(sorted(fitting, key=lambda p: p.model))
    pareto = max(front, key=lambda p: (scores[p.model], -p.params))
    baselines = {"highest-accuracy": best_acc.model, "largest": largest.model,
                 "random": rnd.model, "pareto": pareto.model}
    return StudentPick(tenant=tenant, chosen=baselines[rule], rule=rule,
                       formula=formula(weights), points=limited,
                       pareto=[p.model for p in front], scores=scores, baselines=baselines)
