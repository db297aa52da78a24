"""Per-tenant student choice: size is a hard limit, predicted points say so, baselines differ,
and a graded quality separates candidates whose exact accuracy ties (e.g. all at 0)."""

from __future__ import annotations

import math

import msgspec
import pytest

from schemas.tenants import CandidatePoint, TenantLimits, TradeoffWeights
from stratosd.errors import Infeasible
from stratosd.tenants.selection import (
    choose,
    memory_mib,
    pareto_front,
    predict,
    quality_axis,
    tradeoff_scores,
)


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
    assert "q'" in pick.formula and "exact accuracy" in pick.formula
    assert pick.quality_metric == "accuracy"
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


# --- graded quality: what the probe measures on tiny students that answer nothing right ----
# Close to what the probe measured on T1 (bench data, 40-60 fit steps, config:base fitted too):
# exact accuracy 0 for all, the targets' NLL per token apart by many standard errors.
SIZES = {"tiny": 86_848, "small": 616_576, "base": 3_593_472}


def _g(model: str, nll: float | None, lat: float, acc: float = 0.0, se: float = 0.05,
       partial: float | None = None) -> CandidatePoint:
    n = SIZES[model]
    return CandidatePoint(model=model, params=n, accuracy=acc, latency_ms=lat,
                          memory_mib=memory_mib(n), n_probe=16, target_nll=nll,
                          target_nll_se=None if nll is None else se, partial=partial,
                          token_accuracy=None if nll is None else 0.9)


ZERO = [_g("tiny", 3.40, 4.0), _g("small", 2.35, 19.0), _g("base", 1.80, 45.0)]


def test_graded_quality_separates_candidates_tied_at_zero_exact_accuracy() -> None:
    pick = choose("t", ZERO, TenantLimits(), TradeoffWeights())
    assert pick.quality_metric == "target_prob"
    assert "0.000–0.000" in pick.quality_note and "does not separate" in pick.quality_note
    assert "exp(−NLL" in pick.formula
    q = {p.model: p.quality for p in pick.points}
    assert q == {m: pytest.approx(math.exp(-nll), abs=1e-6)
                 for m, nll in (("tiny", 3.40), ("small", 2.35), ("base", 1.80))}
    assert all(p.accuracy == 0.0 for p in pick.points)  # exact accuracy stays visible
    # the trade-off by hand: q' = (0, .469, 1), latency' = (0, .366, 1), size' = (0, .152, 1)
    assert pick.scores["small"] == pytest.approx(0.469 - 0.5 * 0.366 - 0.5 * 0.152, abs=2e-3)
    assert pick.scores["tiny"] == pytest.approx(0.0) and pick.scores["base"] == pytest.approx(0.0)
    assert pick.chosen == "small"
    assert pick.baselines["highest-accuracy"] == "base"  # highest on the same quality axis
    assert pick.baselines["largest"] == "base"
    assert pick.chosen != pick.baselines["highest-accuracy"]
    assert set(pick.pareto) == {"tiny", "small", "base"}


def test_without_a_graded_measure_the_tie_leaves_only_latency_and_size() -> None:
    # what the probe reported before: exact accuracy only, all 0 → the pick falls to size
    bare = [_g(p.model, None, p.latency_ms) for p in ZERO]
    pick = choose("t", bare, TenantLimits(), TradeoffWeights())
    assert pick.quality_metric == "none" and "quality counts equal" in pick.quality_note
    assert pick.chosen == "tiny" == pick.baselines["highest-accuracy"]
    assert pick.pareto == ["tiny"]


def test_weights_move_the_graded_pick_and_limits_still_bind() -> None:
    quality_only = choose("t", ZERO, TenantLimits(), TradeoffWeights(latency=0.0, size=0.0))
    assert quality_only.chosen == "base" == quality_only.baselines["highest-accuracy"]
    frugal = choose("t", ZERO, TenantLimits(), TradeoffWeights(quality=0.2))
    assert frugal.chosen == "tiny"
    capped = choose("t", ZERO, TenantLimits(max_params=1_000_000), TradeoffWeights())
    assert capped.baselines["largest"] == capped.baselines["highest-accuracy"] == "small"
    assert set(capped.scores) == {"tiny", "small"}


def test_exact_accuracy_is_the_axis_when_it_separates_beyond_noise() -> None:
    apart = [_g("tiny", 3.40, 4.0, acc=0.0), _g("small", 2.35, 19.0, acc=10 / 16)]
    assert quality_axis(apart)[0] == "accuracy"
    # one right answer of 16 against none is within noise: the graded measure decides
    close = [_g("tiny", 3.40, 4.0, acc=1 / 16), _g("small", 2.35, 19.0, acc=0.0)]
    metric, note = quality_axis(close)
    assert metric == "target_prob" and "0.000–0.062 on 16 probe rows" in note
    # NLLs within their standard errors separate nothing either
    assert quality_axis([_g("tiny", 2.40, 4.0, se=0.3), _g("small", 2.35, 19.0, se=0.3)])[0] \
        == "none"


def test_partial_credit_comes_before_the_likelihood() -> None:
    pts = [_g("tiny", 3.40, 4.0, partial=0.10), _g("small", 2.35, 19.0, partial=0.70)]
    assert quality_axis(pts)[0] == "partial"
    pick = choose("t", pts, TenantLimits(), TradeoffWeights())
    assert {p.model: p.quality for p in pick.points} == {"tiny": 0.1, "small": 0.7}


def test_predicted_points_are_labelled_with_their_basis_and_never_choose_the_axis() -> None:
    base = predict(ZERO[:2], "base", SIZES["base"])
    assert base.predicted and base.target_nll is not None
    assert base.target_nll < 2.35  # the trend in log10(params) continues
    assert "config" not in base.basis and "tiny, small (measured" in base.basis
    assert "extrapolated, 5.8× the largest measured" in base.basis
    assert base.accuracy == 0.0 and base.target_nll_se is None
    within = predict([ZERO[0], ZERO[2]], "small", SIZES["small"])
    assert "within the measured sizes" in within.basis
    # a predicted point with a high exact accuracy does not make exact accuracy the axis
    pts = [*ZERO[:2], msgspec.structs.replace(base, accuracy=0.9)]
    assert quality_axis(pts)[0] == "target_prob"
    pick = choose("t", pts, TenantLimits(), TradeoffWeights())
    assert next(p for p in pick.points if p.model == "base").predicted


def test_scores_use_the_quality_axis() -> None:
    pts = [msgspec.structs.replace(p, quality=q) for p, q in zip(ZERO, (0.1, 0.2, 0.3),
                                                                   strict=True)]
    assert tradeoff_scores(pts, TradeoffWeights(latency=0.0, size=0.0)) == {
        "tiny": 0.0, "small": 0.5, "base": 1.0}
