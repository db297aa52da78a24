"""The daemon never waits forever for a job: a lost terminal event is reconciled with the agent,
a job its agent does not know is retried, a gone agent fails the wait; the dispatcher's maps
stay bounded. Real nats-server, daemon and agent in this process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import structlog

from agents.outbox import FAULTS_ENV
from schemas import subjects
from schemas.events import JobCompleted
from stratosd.errors import AgentUnavailable
from stratosd.pipeline import StageRun
from tests.conftest import start_agent
from tests.daemon.jobstages import install, probe_job, run_end, submit, until


@pytest.fixture
async def gpu1(daemon: Any, nats_url: str, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Any:
    """Agent gpu-1 whose real publish path silently loses the first job_completed."""
    monkeypatch.setenv(FAULTS_ENV, "lose:job_completed:1")
    agent, task = await start_agent(nats_url, tmp_path, "gpu-1")
    await daemon.fleet.wait_up("gpu-1", timeout=10)
    try:
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)


@pytest.mark.timeout(120)
async def test_a_lost_job_completed_is_reconciled_and_the_run_completes(
    daemon: Any, gpu1: Any,
) -> None:
    daemon.dispatch.silence_s = 1.0
    stages = install(daemon, {"probe_teachers": probe_job})
    with structlog.testing.capture_logs() as logs:
        run, _ = await run_end(daemon, await submit(daemon))
    assert run.state == "completed", run.error
    assert run.results["probe_teachers"]["best"] == "oracle"
    assert stages.attempts["probe_teachers"] == [1]  # settled by the answer, not a retry
    lost = [e for e in logs if e["event"] == "job_event_fault_injected"]
    assert [(e["mode"], e["kind"]) for e in lost] == [("lose", "job_completed")]
    reconciled = [e for e in logs if e["event"] == "job_reconciled"]
    assert [(e["state"], e["agent_id"]) for e in reconciled] == [("completed", "gpu-1")]


@pytest.mark.timeout(120)
async def test_a_job_its_agent_does_not_know_is_lost_and_retried(daemon: Any, gpu1: Any) -> None:
    daemon.dispatch.silence_s = 0.3

    async def first_one_lost(ctx: StageRun) -> dict[str, Any]:
        if ctx.attempt == 1:  # as if the RunStep had been sent, but the agent never got it
            ghost = f"{ctx.run_id}-ghost"
            daemon.dispatch.job_agent[ghost] = "gpu-1"
            await daemon.dispatch.wait(ghost)
        return await probe_job(ctx)

    stages = install(daemon, {"probe_teachers": first_one_lost})
    with structlog.testing.capture_logs() as logs:
        run, _ = await run_end(daemon, await submit(daemon))
    assert run.state == "completed", run.error
    assert stages.attempts["probe_teachers"] == [1, 2]
    lost = [e for e in logs if e["event"] == "job_lost"]
    assert len(lost) == 1 and lost[0]["reason"] == "the agent does not know it"
    assert any(e["event"] == "stage_retry" and "was lost" in e["error"] for e in logs)


async def test_a_wait_on_a_gone_agent_ends(daemon: Any) -> None:
    d = daemon.dispatch
    d.silence_s, d.lost_after_s = 0.2, 1.0
    d.job_agent["gone-1"] = "gpu-9"  # nobody serves gpu-9
    with pytest.raises(AgentUnavailable, match="no word of job gone-1"):
        await d.wait("gone-1", timeout=20)
    assert "gone-1" not in d._waiters


async def test_a_wait_that_starts_after_the_agent_went_down_fails_at_once(daemon: Any) -> None:
    d = daemon.dispatch
    d.silence_s = d.lost_after_s = 600.0  # only the agent's going down can end this wait
    d.job_agent["late-1"] = "gpu-9"
    d.fail_agent("gpu-9")  # before anyone waits on late-1
    with pytest.raises(AgentUnavailable, match="went down while running job late-1"):
        await d.wait("late-1", timeout=20)


async def test_finished_jobs_are_forgotten(daemon: Any) -> None:
    d = daemon.dispatch
    d.max_finished = 5
    d.silence_s = 600.0
    d.job_agent["busy-1"] = "gpu-1"
    busy = asyncio.create_task(d.wait("busy-1"))  # a job still under way is never evicted

    async def complete(job_id: str) -> None:
        await daemon.bus.publish_event(subjects.job_event("gpu-1", job_id, "completed"),
                                       JobCompleted(job_id=job_id, agent_id="gpu-1"))

    for n in range(20):
        d.job_agent[f"b-{n}"] = "gpu-1"  # as send() records it
        await complete(f"b-{n}")
    await until(lambda: "b-19" in d.outcomes)
    for table in (d.outcomes, d.outcome_agent, d._finished):
        assert set(table) == {f"b-{n}" for n in range(15, 20)}
    assert set(d.job_agent) == {"busy-1", *(f"b-{n}" for n in range(15, 20))}
    assert set(d.heard) <= set(d.job_agent)

    d.finished_ttl_s = 0.0  # and nothing is kept longer than the TTL
    await complete("busy-1")
    assert (await asyncio.wait_for(busy, 10)).state == "completed"
    assert set(d.outcomes) <= {"busy-1"} and set(d.job_agent) <= {"busy-1"}
    assert not d._waiters


async def test_a_completed_jobs_outcome_keeps_the_agents_own_duration(
        daemon: Any, agent: Any) -> None:
    # what tenant spend metering bills: the agent's measure, not the daemon's wait
    install(daemon, {"probe_teachers": probe_job})
    run, _ = await run_end(daemon, await submit(daemon))
    assert run.state == "completed", run.error
    job_id = run.jobs["probe#1"]
    outcome = daemon.dispatch.outcomes[job_id]
    assert outcome.state == "completed" and outcome.duration_s > 0
