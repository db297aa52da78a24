"""Tenant training steps reserve their agent's devices like the pipeline's train step: two
tenants whose data sit on one agent never train at once there (the second waits its turn)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import api as js_api

from agents.runner import TRAINING_STEPS
from bench.tenant_data import DESIGN, write_tenant_file
from schemas import subjects
from schemas.events import EVENT_DECODER, JobCompleted, JobStarted
from schemas.tenants import SubmitTenantJob
from tests.conftest import start_agent
from tests.tenants.helpers import ask, small_job, wait_done

pytestmark = [pytest.mark.slow, pytest.mark.timeout(450)]


def test_tenant_training_steps_hold_the_devices() -> None:
    assert {"tenant_train", "tenant_probe"} <= TRAINING_STEPS


async def test_two_tenants_on_one_agent_take_turns(nats_url: str, tmp_path: Path,
                                                   daemon: Any) -> None:
    files = {n: write_tenant_file(tmp_path / "private" / n / "data.jsonl", DESIGN[n], 40, i)
             for i, n in enumerate(("t1", "t3"))}
    agent, task = await start_agent(nats_url, tmp_path, "host-shared")
    nc = await nats.connect(nats_url)
    try:
        # no alone baseline: each tenant's probe and round are enough to overlap, if they could
        job = small_job(files, {n: "host-shared" for n in files}, rounds=1, steps=2, alone=False)
        await ask(nc, SubmitTenantJob(spec=job, job_id="job-shared"))
        done = await wait_done(nc, "job-shared", timeout=360)  # four training steps in turn
        assert done.state == "completed", done.error
        assert all(r.state == "ok" and r.rounds_done == 1 for r in done.results.values())
        # the agent's own job events: training steps never overlap on its devices
        spans: dict[str, list[Any]] = {}
        sub = await nc.jetstream().subscribe(
            subjects.job_events(agent_id="host-shared"), ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.ALL, stream=subjects.EVENTS_STREAM)
        while True:  # the stream holds them all already: read until none is pending
            msg = await sub.next_msg(timeout=30)
            ev = EVENT_DECODER.decode(msg.data)
            if isinstance(ev, JobStarted | JobCompleted) and ev.step in TRAINING_STEPS:
                spans.setdefault(ev.job_id, []).append(ev.ts)
            if not msg.metadata.num_pending:
                break
        await sub.unsubscribe()
        intervals = sorted((s[0], s[-1]) for s in spans.values())
        assert len(intervals) == 2 + 2  # two probes, one round for each tenant
        for (_s0, e0), (s1, _e1) in zip(intervals, intervals[1:], strict=False):
            assert s1 >= e0, "two training steps ran at once on one agent"
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)
        await nc.close()
