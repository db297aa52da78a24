"""A tenants job survives a daemon restart: the new daemon takes it up at its stored stage and
every step the old one sent is answered by the agent's record of it, never run twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import pytest

from bench.tenant_data import DESIGN, write_tenant_file
from schemas.tenants import (
    SubmitTenantJob,
    TenantJobCompleted,
    TenantJobResumed,
    TenantRoundStarted,
)
from tests.conftest import daemon_config, running_daemon, start_agent
from tests.tenants.helpers import Events, ask, small_job, stop_agents, wait_done

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]


async def test_tenant_job_resumes_after_a_daemon_restart(nats_url: str, tmp_path: Path) -> None:
    cfg = daemon_config(nats_url, tmp_path)
    files = {n: write_tenant_file(tmp_path / "private" / n / "data.jsonl", DESIGN[n], 40, i)
             for i, n in enumerate(("t1", "t3"))}
    nc = await nats.connect(nats_url)
    agents: list[tuple[Any, asyncio.Task[None]]] = []
    try:
        async with running_daemon(cfg):
            agents = [await start_agent(nats_url, tmp_path, f"host-{n}") for n in files]
            job = small_job(files, rounds=2, steps=2, alone=False)
            await ask(nc, SubmitTenantJob(spec=job, job_id="job-resume"))
            events = await Events().start(nc, "job-resume")
            await events.wait_for(TenantRoundStarted, round=1)
        # the daemon is gone mid-round (its steps may still run on the agents)
        async with running_daemon(cfg):
            resumed = await events.wait_for(TenantJobResumed)
            assert resumed.stage == "round-1"
            done = await wait_done(nc, "job-resume")
            await events.wait_for(TenantJobCompleted)
        await events.stop()
        assert done.state == "completed", done.error
        assert done.attempt == 2
        for name in files:
            r = done.results[name]
            assert r.state == "ok" and r.rounds_done == 2, r.error
            assert r.accuracy_aggregated is not None
        # no step ran twice: one job per (tenant, step, round, track) on each agent
        for agent, _task in agents:
            steps = Counter(j.cmd.step for j in agent.runner.jobs.values())
            assert steps["tenant_signature"] == 1 and steps["tenant_probe"] == 1, steps
            assert steps["tenant_train"] == 2 and steps["tenant_apply"] == 2, steps
            assert steps["tenant_evaluate"] == 1, steps
            assert all(j.state == "completed" for j in agent.runner.jobs.values())
    finally:
        await stop_agents(agents, nc)
