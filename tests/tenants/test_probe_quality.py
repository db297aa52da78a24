"""The probe on real tiny students: a short fit learns something, and the graded quality it
reports separates candidates that exact match cannot (the bench measured 0 right answers each)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from agents.stepctx import StepContext
from agents.steps import tenant_probe
from agents.steps.tenant_common import TenantArgs, local_task, probe_split, target_scores
from bench.tenant_data import DESIGN, write_tenant_file
from schemas.tenants import CandidatePoint, TenantLimits, TradeoffWeights
from stratosd.tenants.selection import choose, predict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _ctx(tmp: Path, args: dict[str, object]) -> StepContext:
    return StepContext(job_id="probe", run_id="test", step="tenant_probe", args=args,
                       workdir=tmp / "work", inputs={}, state_dir=tmp / "runs" / "test" / "s")


def test_untrained_student_scores_near_uniform(tmp_path: Path) -> None:
    data = write_tenant_file(tmp_path / "t1.jsonl", DESIGN["t1"], 40, seed=0)
    ctx = _ctx(tmp_path, {})
    task = local_task(ctx, TenantArgs(tenant="t1", data_path=str(data)))
    _fit, probe = probe_split(task, 8)
    got = target_scores(task, probe, "config:tiny")
    assert got["target_nll"] == pytest.approx(4.6, abs=0.3)  # ≈ ln(vocab): nothing learned
    assert got["target_nll_se"] is not None and got["target_nll_se"] < 0.1
    assert 0.0 <= got["token_accuracy"] <= 0.2


def test_probe_reports_graded_quality_that_separates_tied_candidates(tmp_path: Path) -> None:
    data = write_tenant_file(tmp_path / "t1.jsonl", DESIGN["t1"], 120, seed=0)
    res = tenant_probe.run(_ctx(tmp_path, {
        "tenant": "t1", "data_path": str(data), "candidates": ["config:tiny", "config:small",
                                                                "config:base"],
        "measure": ["config:tiny", "config:small"], "probe_size": 16, "fit_steps": 20}))
    points = [msgspec.convert(p, CandidatePoint) for p in res["points"]]
    tiny, small, base = points
    assert base.predicted and base.target_nll is None
    for p in (tiny, small):
        assert not p.predicted and p.n_probe == 16
        assert p.fit_first_loss is not None and p.fit_final_loss is not None
        assert p.fit_final_loss < p.fit_first_loss - 0.5  # the short fit learned something
        assert p.target_nll is not None and p.target_nll_se is not None
        assert p.token_accuracy is not None and p.partial == p.accuracy  # jsonl-qa: no partial
    # after 20 steps exact match does not tell them apart (the bench measured 0 right answers
    # for both), yet the wider student fits the targets far better, by many standard errors
    assert abs(tiny.accuracy - small.accuracy) <= 1 / 16
    assert small.target_nll + 4 * small.target_nll_se < tiny.target_nll  # type: ignore[operator]
    measured = [tiny, small]
    points = [tiny, small, predict(measured, base.model, base.params)]
    pick = choose("t1", points, TenantLimits(), TradeoffWeights())
    assert pick.quality_metric == "target_prob"
    q = {p.model: p.quality for p in pick.points}
    assert q["config:small"] > q["config:tiny"]  # type: ignore[operator]
    assert "extrapolated" in pick.points[2].basis
