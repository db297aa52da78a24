"""Per-tenant student choice: size is a hard limit, predicted points say so, baselines differ."""

from __future__ import annotations

import pytest

from schemas.tenants import CandidatePoint, TenantLimits, TradeoffWeights
from stratosd.errors import Infeasible
from stratosd.tenants.selection import choose, memory_mib, pareto_front, predict


def _p(model: str, params: int, acc: float, lat: float) -> CandidatePoint:
    return CandidatePoint(model=model, params=params, accuracy=acc, latency_ms=lat,
                          memory_mib=memory_mib(params))


POINTS = [_p("xs", 100_000, 0.30, 5.0), _p("s", 600_000, 0.50, 8.0),
          _p("m", 3_000_000, 0.55, 20.0), _p("l", 10_000_000, 0.60, 60.0)]


def test_pick_respects_the_size_limit() -> None:
    limits = TenantLimits(max_params=1_000_000)
    pick = choose("t", POINTS, limits, TradeoffWeights())
    fitting = {p.model for p in pick.points if p.fits}
    assert fitting == {"xs", "s"}
    assert pick.chosen in fitting
    assert pick.baselines["largest"] == "s"
    assert pick.baselines["highest-accuracy"] == "s"
    assert set(pick.scores) == fitting
    assert "max_params" in next(p for p in pick.points if p.model == "l").why_not
    assert "acc'" in pick.formula
    for rule in ("largest", "highest-accuracy", "random"):
        assert choose("t", POINTS, limits, TradeoffWeights(), rule).chosen in fitting


def test_memory_and_latency_limits_are_hard_too() -> None:
    pick = choose("t", POINTS, TenantLimits(max_memory_mib=memory_mib(3_000_000),
                                            max_latency_ms=10.0), TradeoffWeights())
    assert {p.model for p in pick.points if p.fits} == {"xs", "s"}


def test_nothing_fits_is_infeasible_naming_the_closest() -> None:
    with pytest.raises(Infeasible, match="xs"):
        choose("t", POINTS, TenantLimits(max_params=10), TradeoffWeights())


def test_weights_move_the_pick() -> None:
    quality = choose("t", POINTS, TenantLimits(), TradeoffWeights(latency=0.0, size=0.0))
    frugal = choose("t", POINTS, TenantLimits(), TradeoffWeights(quality=0.0))
    assert quality.chosen == "l" and frugal.chosen == "xs"
    assert {p.model for p in pareto_front(POINTS)} == {"xs", "s", "m", "l"}


def test_unmeasured_candidates_are_predicted_and_labelled() -> None:
    measured = [POINTS[0], POINTS[2]]
    p = predict(measured, "s", 600_000)
    assert p.predicted and 0.3 <= p.accuracy <= 0.55
    assert 5.0 <= p.latency_ms <= 20.0
