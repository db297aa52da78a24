"""The multi-objective score: min-max terms, weighted sum in [0, 1], degenerate and edge cases;
the comparison's helpers (agreement, same class, job $)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.costs import Estimate, JobEstimate, PhaseCost, StageCost
from schemas.specs import ScoreWeights
from stratosd.comparison import agreement, job_cost, same_class, with_api_paid
from stratosd.errors import ConfigError
from stratosd.score import (
    DEGENERATE_TERM,
    METRICS,
    Candidate,
    improvement_pct,
    score_candidates,
)

# accuracy, latency ms, train s, cost $: a fast expensive box, a cheap slow one, a middle one
FLEET = [
    Candidate(name="big", accuracy=0.40, latency=80.0, train_time=600.0, cost=4.0),
    Candidate(name="cheap", accuracy=0.40, latency=200.0, train_time=5400.0, cost=0.9),
    Candidate(name="mid", accuracy=0.40, latency=120.0, train_time=1800.0, cost=1.5),
]


def recompute(cands: list[Candidate], w: dict[str, float]) -> dict[str, float]:
    """The formula from PAPER.md written out independently of stratosd.score."""
    cols = {m: [getattr(c, m) for c in cands] for m in METRICS}
    out = {}
    for i, c in enumerate(cands):
        num = 0.0
        for m in METRICS:
            lo, hi = min(cols[m]), max(cols[m])
            if hi == lo:
                term = 1.0
            elif m == "accuracy":
                term = (cols[m][i] - lo) / (hi - lo)
            else:
                term = (hi - cols[m][i]) / (hi - lo)
            num += w[m] * term
        out[c.name] = num / sum(w.values())
    return out


def test_matches_the_formula_written_out() -> None:
    w = {"accuracy": 1.0, "latency": 2.0, "train_time": 0.5, "cost": 3.0}
    table = score_candidates(FLEET, w)
    expected = recompute(FLEET, w)
    for row in table.rows:
        assert row.score == pytest.approx(expected[row.candidate.name])
        assert 0.0 <= row.score <= 1.0
    assert table.weights == w
    assert "sum_m w_m * n_m / sum_m w_m" in table.formula
    # the terms printed in the report reproduce the score
    mid = table.by_name("mid")
    assert mid.terms["latency"] == pytest.approx((200 - 120) / (200 - 80))
    assert sum(w[m] * mid.terms[m] for m in METRICS) / sum(w.values()) == \
        pytest.approx(mid.score)


def test_default_weights_are_equal_and_accept_the_job_struct() -> None:
    assert score_candidates(FLEET).weights == dict.fromkeys(METRICS, 1.0)
    table = score_candidates(FLEET, ScoreWeights(cost=2.0))
    assert table.weights == {"accuracy": 1.0, "latency": 1.0, "train_time": 1.0, "cost": 2.0}


def test_weights_change_the_ranking() -> None:
    fast = score_candidates(FLEET, {"accuracy": 0, "latency": 1, "train_time": 1, "cost": 0})
    thrifty = score_candidates(FLEET, {"accuracy": 0, "latency": 0, "train_time": 0, "cost": 1})
    assert fast.best().candidate.name == "big"
    assert thrifty.best().candidate.name == "cheap"
    assert thrifty.by_name("cheap").score == 1.0 and thrifty.by_name("big").score == 0.0


def test_degenerate_metric_counts_as_one_for_everyone() -> None:
    table = score_candidates(FLEET)
    assert table.degenerate == ["accuracy"]  # same student everywhere
    assert all(r.terms["accuracy"] == DEGENERATE_TERM for r in table.rows)
    # it lifts every score by the same w/sum(w) and leaves the ranking alone
    no_acc = score_candidates(FLEET, {"accuracy": 0.0})
    for a, b in zip(table.rows, no_acc.rows, strict=True):
        assert a.score == pytest.approx(0.25 + 0.75 * b.score)
    # one candidate: every metric is degenerate, the score is 1
    solo = score_candidates(FLEET[:1])
    assert solo.rows[0].score == 1.0 and set(solo.degenerate) == set(METRICS)


def test_infeasible_candidates_get_no_score_and_do_not_set_ranges() -> None:
    cands = [*FLEET, Candidate(name="tiny", accuracy=0.4, latency=1.0, train_time=1.0,
                               cost=0.0, feasible=False, note="student does not fit")]
    table = score_candidates(cands)
    assert table.by_name("tiny").score is None
    assert table.ranges["cost"] == (0.9, 4.0)
    assert [r.score for r in table.rows[:3]] == [r.score for r in score_candidates(FLEET).rows]


def test_missing_metric_is_dropped_and_said() -> None:
    cands = [Candidate(name=c.name, accuracy=c.accuracy, train_time=c.train_time, cost=c.cost)
             for c in FLEET]
    table = score_candidates(cands)
    assert table.dropped == ["latency"]
    assert "latency" not in table.rows[0].terms
    w = {"accuracy": 1.0, "train_time": 1.0, "cost": 1.0}
    exp = recompute([Candidate(name=c.name, accuracy=c.accuracy, latency=0.0,
                               train_time=c.train_time, cost=c.cost) for c in FLEET],
                    {**w, "latency": 0.0})
    assert [r.score for r in table.rows] == pytest.approx([exp[c.name] for c in FLEET])
    assert table.to_dict()["dropped"] == ["latency"]


def test_bad_weights_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="score weight cost"):
        score_candidates(FLEET, {"cost": -1.0})
    with pytest.raises(ConfigError, match="unknown score weight"):
        score_candidates(FLEET, {"acuracy": 1.0})
    with pytest.raises(ConfigError, match="sum to 0") as err:
        score_candidates(FLEET, dict.fromkeys(METRICS, 0.0))
    assert err.value.hint


def test_improvement_pct() -> None:
    assert improvement_pct(0.55, 0.37) == pytest.approx(48.648, rel=1e-3)
    assert improvement_pct(0.5, 0.0) is None
    assert improvement_pct(None, 0.3) is None


def test_to_dict_holds_everything_needed_to_recompute() -> None:
    d = score_candidates(FLEET).to_dict()
    assert set(d) >= {"formula", "weights", "ranges", "degenerate", "degenerate_rule", "rows"}
    row = d["rows"][0]
    assert set(row["raw"]) == set(METRICS) and set(row["terms"]) == set(METRICS)
    assert d["metrics"]["accuracy"]["higher_is_better"] is True
    assert d["metrics"]["cost"]["higher_is_better"] is False


finite = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(st.floats(0.0, 1.0), finite, finite, finite), min_size=1,
                  max_size=8),
    weights=st.tuples(*(st.floats(0.0, 10.0) for _ in METRICS)).filter(lambda w: sum(w) > 0),
)
def test_scores_in_unit_interval_and_match_recompute(
    rows: list[tuple[float, float, float, float]], weights: tuple[float, ...]
) -> None:
    cands = [Candidate(name=f"c{i}", accuracy=a, latency=lat, train_time=t, cost=c)
             for i, (a, lat, t, c) in enumerate(rows)]
    w = dict(zip(METRICS, weights, strict=True))
    table = score_candidates(cands, w)
    expected = recompute(cands, w)
    for r in table.rows:
        assert r.score is not None and 0.0 <= r.score <= 1.0
        assert math.isclose(r.score, expected[r.candidate.name], rel_tol=1e-9, abs_tol=1e-9)


# --- the comparison's helpers ------------------------------------------------------------


def _row(selector: str, server: str | None, **metrics: float) -> dict[str, object]:
    base = {"feasible": True, "accuracy": 0.4, "latency_ms": 5.0, "train_time_s": 60.0,
            "cost_usd": 0.1}
    return {"selector": selector, "server": server, **base, **metrics}


def test_agreement_only_when_nothing_separates_the_picks() -> None:
    same = [_row("pfg", "cpu-a"), _row("cost-first", "cpu-a"), _row("random", "cpu-a")]
    assert agreement(same) == "every selector picked cpu-a: nothing to compare on this fleet"
    no_pick = [*same[:2], _row("random", None)]
    assert agreement(no_pick) == ("every selector picked cpu-a: nothing to compare on this "
                                  "fleet (random made no pick)")
    twins = [_row("pfg", "cpu-a"), _row("cost-first", "cpu-b")]
    assert agreement(twins) == ("every selector's pick (cpu-a, cpu-b) has the same numbers on "
                                "every metric: nothing to compare on this fleet")
    assert agreement([_row("pfg", "cpu-a"), _row("cost-first", "cpu-b", cost_usd=0.05)]) is None
    assert agreement([_row("pfg", "cpu-a")]) is None  # no baseline: nothing agrees


def _estimate(server: str, train_s: float, price: float, api: float | None = None,
              key: str = "cpu-8t.lt10M.lora-sft") -> JobEstimate:
    def est(v: float, unit: str) -> Estimate:
        return Estimate(value=v, low=v / 2, high=v * 2, unit=unit)

    phases = [PhaseCost(phase=p, seconds=est(s, "s"), usd=est(s / 3600 * price, "USD"),
                        key=f"{key}.{p}")
              for p, s in (("synthesis", 100.0), ("train", train_s))]
    if api is not None:
        phases.append(PhaseCost(phase="synthesis-api", billed_on="api",
                                seconds=Estimate(value=0, low=0, high=0), usd=est(api, "USD")))
    total = 100.0 + train_s
    usd = total / 3600 * price + (api or 0.0)
    return JobEstimate(server=server, phases=phases, seconds=est(total, "s"),
                       usd=Estimate(value=usd, low=usd / 2, high=usd * 2))


def test_same_class_needs_the_same_keys_and_time() -> None:
    a = _estimate("a", 500.0, 0.1)
    assert same_class(a, _estimate("b", 500.0, 0.05))  # price does not matter
    assert not same_class(a, _estimate("b", 400.0, 0.1))
    assert not same_class(a, _estimate("b", 500.0, 0.1, key="gpu-l4.lt10M.lora-sft"))
    assert not same_class(a, None)


def test_job_cost_measured_phases_at_this_price_estimate_for_the_rest() -> None:
    est = _estimate("b", 500.0, 0.05, api=0.3)
    measured = {"train": StageCost(phase="train", server="a", measured_s=720.0,
                                   measured_usd=720.0 / 3600 * 0.1)}
    cost, estimated = job_cost(measured, est, price=0.05, run_price=0.1)
    # train as measured, at b's price; synthesis (not measured) estimated, with its API $
    assert cost == pytest.approx(720.0 / 3600 * 0.05 + 100.0 / 3600 * 0.05 + 0.3)
    assert estimated == ["synthesis"]
    assert job_cost({}, None, 0.1, 0.1) == (None, [])


def test_api_dollars_are_the_measured_ones_on_every_server() -> None:
    est = _estimate("b", 500.0, 0.05, api=0.3)
    usd = with_api_paid(est, 0.12)
    assert usd is not None and est.usd is not None
    assert usd.value == pytest.approx(est.usd.value - 0.3 + 0.12)
    assert usd.low == pytest.approx(est.usd.low - 0.15 + 0.12)
    assert with_api_paid(est, None) == est.usd
