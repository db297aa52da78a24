"""A tenant's agent is lost mid-round: the job drops it, re-weights the rest and completes.

Three tenants; t4's agent is a real `python -m agents` process, SIGKILLed once round 1 has
started (its signature and probe are in). The daemon notices the missing heartbeats, the step
in flight fails as lost, and the others' rounds go on without it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest

from bench.tenant_data import DESIGN, write_tenant_file
from schemas.tenants import (
    GetTenantJob,
    SubmitTenantJob,
    TenantDropped,
    TenantJobCompleted,
    TenantRoundCompleted,
    TenantRoundStarted,
)
from tests.conftest import Proc, start_agent
from tests.tenants.helpers import Events, ask, small_job, stop_agents, wait_done

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]


async def _up(daemon: Any, agent_id: str, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not daemon.fleet.is_up(agent_id):
        assert asyncio.get_running_loop().time() < deadline, f"{agent_id} never came up"
        await asyncio.sleep(0.2)


async def test_agent_lost_mid_round_drops_the_tenant_and_the_rest_complete(
        nats_url: str, tmp_path: Path, daemon: Any) -> None:
    files = {n: write_tenant_file(tmp_path / "private" / n / "data.jsonl", DESIGN[n], 40, i)
             for i, n in enumerate(("t1", "t2", "t4"))}
    agents = [await start_agent(nats_url, tmp_path, f"host-{n}") for n in ("t1", "t2")]
    doomed = Proc(["-m", "agents", "--id", "host-t4", "--nats", nats_url, "--interval", "0.3",
                   "--no-calibrate", "--work-dir", str(tmp_path / "agents" / "host-t4"),
                   "--log-format", "json"], tmp_path / "host-t4.log",
                  {"STRATOS_HOME": str(tmp_path / "home-t4")})
    nc = await nats.connect(nats_url)
    try:
        await _up(daemon, "host-t4")
        job = small_job(files, rounds=2, steps=2, alone=False)
        await ask(nc, SubmitTenantJob(spec=job, job_id="job-lost"))
        events = await Events().start(nc, "job-lost")
        await events.wait_for(TenantRoundStarted, round=1)
        state = (await ask(nc, GetTenantJob(job_id="job-lost"))).job
        assert state.signatures["t4"].n_examples > 0, "t4's signature is in before the kill"
        doomed.kill()  # SIGKILL: no goodbye, no job_interrupted; only missing heartbeats

        dropped = await events.wait_for(TenantDropped, tenant="t4")
        assert dropped.state == "lost" and dropped.stage == "round-1"
        assert dropped.remaining == ["t1", "t2"]
        done = await wait_done(nc, "job-lost")
        assert done.state == "completed", done.error
        lost = done.results["t4"]
        assert lost.state == "lost" and lost.dropped_at == "round-1"
        assert "host-t4" in lost.error and lost.rounds_done == 0
        for name in ("t1", "t2"):  # both rounds intact, weights over who was left
            r = done.results[name]
            assert r.state == "ok" and r.rounds_done == 2, r.error
            assert set(r.weights) == {"t1", "t2"}
            assert abs(sum(r.weights.values()) - 1) < 1e-6
            assert r.accuracy_aggregated is not None
        rounds = [e for e in events.seen if isinstance(e, TenantRoundCompleted)]
        assert [e.round for e in rounds] == [1, 2]
        assert all(set(e.weights) == {"t1", "t2"} for e in rounds)
        assert rounds[-1].tenants["t4"].state == "lost"
        end = await events.wait_for(TenantJobCompleted)
        assert end.dropped == ["t4"]
        report = Path(done.report_paths["markdown"]).read_text()
        assert "## Tenant t4 (lost)" in report and "**lost** at round-1" in report
        assert "aggregated without it (t1, t2)" in report
        await events.stop()
    finally:
        doomed.kill()
        doomed.stop()
        await stop_agents(agents, nc)
