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
    TenantDropped,
    TenantJob,
    TenantLimits,
    TenantSignature,
    TenantSpec,
)
from stratosd.costmodel.learn import EfficiencyBook
from stratosd.tenants import budget
from tests.conftest import start_agent
from tests.tenants.helpers import Events, ask, small_job, wait_done

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
        for a, task in agents:
            a.stop()
            await asyncio.wait_for(task, 30)
        await nc.close()
