"""budget_usd per tenant, checked with the core cost model on the tenant's agent offer before
any training: a tenant no candidate fits is refused with the numbers; the others go on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest

from bench.tenant_data import DESIGN, write_tenant_file
from schemas.specs import ServerOffer
from schemas.tenants import (
    StudentChoice,
    SubmitTenantJob,
    TenantBudgetStopped,
    TenantDropped,
    TenantJob,
    TenantLimits,
    TenantRoundCompleted,
    TenantRoundStarted,
    TenantSignature,
    TenantSpec,
)
from stratosd.costmodel.learn import EfficiencyBook
from stratosd.tenants import budget
from tests.conftest import start_agent
from tests.tenants.helpers import Events, ask, ctl, small_job, stop_agents, wait_done

SIG = TenantSignature(tenant="t1", n_examples=120, question_hist=[], answer_hist=[],
                      mean_question_chars=8.0, mean_answer_chars=1.0, raw_bytes=4000)
SPEC = TenantJob(tenants=[TenantSpec(name="t1", agents=["a"], data_path="/x")],
                 students=StudentChoice(candidates=["config:tiny", "config:small"],
                                        measure=["config:tiny"]))
PARAMS = {"config:tiny": 86_848, "config:small": 616_576}


def _offer(price: float) -> ServerOffer:
    return ServerOffer(id="a", agent_id="a", price_usd_per_hour=price, cpu_count=2,
                       ram_mib=8192)


def test_estimate_scales_with_price_and_work() -> None:
    cheap = budget.check(SPEC, 1.0, PARAMS, SIG, _offer(1.0), EfficiencyBook(), rounds_left=2)
    dear = budget.check(SPEC, 1.0, PARAMS, SIG, _offer(10.0), EfficiencyBook(), rounds_left=2)
    longer = budget.check(SPEC, 1.0, PARAMS, SIG, _offer(1.0), EfficiencyBook(), rounds_left=8)
    for model in PARAMS:
        c = cheap[model]
        assert 0 < c.probe_usd < c.estimate_usd and c.low_usd <= c.estimate_usd <= c.high_usd
        assert dear[model].estimate_usd == pytest.approx(10 * c.estimate_usd, rel=1e-3)
        assert longer[model].estimate_usd > c.estimate_usd
        assert c.fits and "tenant_train" in c.basis and "on a at $1/h" in c.basis
    assert cheap["config:small"].estimate_usd > cheap["config:tiny"].estimate_usd
    free = budget.check(SPEC, 0.0, PARAMS, SIG, _offer(0.0), EfficiencyBook(), rounds_left=2)
    assert all(v.fits and v.estimate_usd == 0 for v in free.values())


def test_over_budget_says_the_numbers() -> None:
    got = budget.check(SPEC, 1e-6, PARAMS, SIG, _offer(2.0), EfficiencyBook(), rounds_left=2)
    v = got["config:tiny"]
    assert not v.fits
    why = budget.why_over(v)
    assert f"${v.estimate_usd:.4g}" in why and "> budget_usd $1e-06" in why and "$2/h" in why


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_tenant_over_budget_is_refused_before_training(nats_url: str, tmp_path: Path,
                                                             daemon: Any) -> None:
    files = {n: write_tenant_file(tmp_path / "private" / n / "data.jsonl", DESIGN[n], 40, i)
             for i, n in enumerate(("t1", "t4"))}
    agents = [await start_agent(nats_url, tmp_path, f"host-{n}", price=3.0) for n in files]
    nc = await nats.connect(nats_url)
    try:
        limits = {"t1": TenantLimits(budget_usd=1e-6), "t4": TenantLimits(budget_usd=100.0)}
        job = small_job(files, rounds=1, steps=2, alone=False, limits=limits)
        await ask(nc, SubmitTenantJob(spec=job, job_id="job-budget"))
        events = await Events().start(nc, "job-budget")
        done = await wait_done(nc, "job-budget")
        assert done.state == "completed", done.error
        refused = done.results["t1"]
        assert refused.state == "failed" and refused.dropped_at == "select"
        assert "budget: estimated $" in refused.error and "> budget_usd $1e-06" in refused.error
        assert "at $3/h" in refused.error and refused.rounds_done == 0
        assert refused.pick is None and refused.accuracy_aggregated is None
        dropped = await events.wait_for(TenantDropped, tenant="t1")
        assert dropped.stage == "select" and dropped.remaining == ["t4"]
        ok = done.results["t4"]
        assert ok.state == "ok" and ok.rounds_done == 1, ok.error
        assert ok.budget is not None and ok.budget.fits
        assert 0 < ok.budget.estimate_usd <= 100.0 and ok.budget.price_usd_per_hour == 3.0
        # t1's agent never trained: only its signature and probe ran there
        steps = {j.cmd.step for j in agents[0][0].runner.jobs.values()}
        assert steps == {"tenant_signature", "tenant_probe"}, steps
        await events.stop()
    finally:
        await stop_agents(agents, nc)


def test_round_boundary_check_uses_the_larger_of_estimate_and_last_round() -> None:
    est = budget.next_round(SPEC, 1.0, 0.0, 0.0, "config:tiny", SIG, _offer(1.0),
                            EfficiencyBook(), PARAMS["config:tiny"])
    assert est.fits and est.next_round_usd > 0 and "(estimated)" in est.reason
    measured = budget.next_round(SPEC, 1.0, 0.5, 0.6, "config:tiny", SIG, _offer(1.0),
                                 EfficiencyBook(), PARAMS["config:tiny"])
    assert measured.next_round_usd == 0.6 and not measured.fits
    assert measured.projected_usd == pytest.approx(1.1 + measured.eval_usd)
    assert "as its last round measured" in measured.reason and "> budget_usd $1" in measured.reason


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_measured_spend_stops_a_tenant_at_the_round_boundary(nats_url: str,
                                                                  tmp_path: Path,
                                                                  daemon: Any) -> None:
    """Free while it is checked and probed (price 0: the budget admits it and its first
    round), then the agent's price jumps during round 1 (a spot price): before round 2 the
    measured spend plus the next round would exceed budget_usd, so it stops there, keeps its
    round, is evaluated, and the job completes."""
    files = {"t1": write_tenant_file(tmp_path / "private" / "t1" / "data.jsonl", DESIGN["t1"],
                                     40, 0)}
    agent, task = await start_agent(nats_url, tmp_path, "host-t1", price=0.0)
    nc = await nats.connect(nats_url)
    try:
        job = small_job(files, rounds=3, steps=2, alone=False,
                        limits={"t1": TenantLimits(budget_usd=5.0)})
        await ask(nc, SubmitTenantJob(spec=job, job_id="job-spend"))
        events = await Events().start(nc, "job-spend")
        await events.wait_for(TenantRoundStarted, round=1)
        agent.config.price_usd_per_hour = 360_000.0  # $100/s from the next heartbeat on
        done = await wait_done(nc, "job-spend")
        assert done.state == "completed", done.error
        r = done.results["t1"]
        assert r.state == "ok" and r.rounds_done == 1, r
        assert r.stopped_at == "round-2" and "budget: measured spend $" in r.stop_reason
        assert "> budget_usd $5" in r.stop_reason
        assert r.spent_usd > 0 and r.spent_s > 0 and r.accuracy_aggregated is not None
        stop = await events.wait_for(TenantBudgetStopped)
        assert stop.tenant == "t1" and stop.round == 2 and stop.budget_usd == 5.0
        assert stop.projected_usd > 5.0 and stop.spent_usd > 0
        rounds = [e.round for e in events.seen if isinstance(e, TenantRoundCompleted)]
        assert rounds == [1], rounds
        rc = next(e for e in events.seen if isinstance(e, TenantRoundCompleted))
        assert rc.tenants["t1"].spent_usd >= 0
        trains = [j for j in agent.runner.jobs.values() if j.cmd.step == "tenant_train"]
        assert len(trains) == 1
        st = await asyncio.to_thread(ctl, nats_url, "tenants", "status", "job-spend")
        assert "budget stop" in st.stdout and "stopped before round-2" in st.stdout, st.stdout
        assert "spent (measured)" in Path(done.report_paths["markdown"]).read_text()
        await events.stop()
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)
        await nc.close()
