"""The agent's outbox: job events on disk until JetStream acks them, across publish failures
and agent restarts. Real nats-server, real agents, real job children."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from agents.outbox import FAULTS_ENV, Faults, Outbox
from agents.runner import OUTBOX_FILE
from schemas import subjects
from schemas.base import decode_or_error
from schemas.commands import RunStep
from schemas.events import EVENT_DECODER, JobCompleted
from stratosd.bus import Bus, connect
from stratosd.config import StratosConfig
from stratosd.errors import ConfigError
from tests.conftest import start_agent
from tests.daemon.jobstages import install, probe_job, run_end, submit, until


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    """A client with the streams in place (as the daemon creates them)."""
    b = Bus(await connect(StratosConfig(nats_url=nats_url), "outbox-test"))
    await b.ensure_streams()
    try:
        yield b
    finally:
        await b.close()


def _publisher(bus: Bus) -> Any:
    async def publish(subject: str, payload: bytes, msg_id: str) -> None:
        await bus.js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
    return publish


def _event(n: int) -> tuple[str, JobCompleted]:
    job_id = f"job-{n}"
    return (subjects.job_event("gpu-1", job_id, "completed"),
            JobCompleted(job_id=job_id, agent_id="gpu-1", step="probe", result={"n": n}))


async def _stored(bus: Bus, subject: str) -> Any:
    msg = await bus.js.get_last_msg(subjects.EVENTS_STREAM, subject)
    return decode_or_error(EVENT_DECODER, msg.data)


async def test_pending_events_survive_a_restart_and_go_out_in_order(bus: Bus,
                                                                     tmp_path: Path) -> None:
    path = tmp_path / "outbox" / "job-events.log"
    first = Outbox(path, _publisher(bus), faults=Faults("fail:job_completed:1000"))
    first.start()
    sent = [_event(n) for n in range(3)]
    for subject, event in sent:
        await first.put(subject, event)
    assert not await first.drain(0.5)  # every publish fails: nothing leaves
    await first.close(timeout=0.1)
    assert len(path.read_bytes().splitlines()) == 3  # on disk, fsynced before any publish

    with path.open("ab") as fh:
        fh.write(b'{"op":"add","id":"torn')  # a crash in the middle of an append
    second = Outbox(path, _publisher(bus))
    assert [r.id for r in second.pending.values()] == [e.id for _, e in sent]
    second.start()
    assert await second.drain(10)
    for subject, event in sent:
        assert (await _stored(bus, subject)).id == event.id
    assert path.read_bytes() == b""  # all acked: the journal starts afresh
    await second.close()
    assert not Outbox(path, _publisher(bus)).pending


async def test_acked_entries_are_not_sent_again(bus: Bus, tmp_path: Path) -> None:
    path = tmp_path / "job-events.log"
    box = Outbox(path, _publisher(bus), faults=Faults("fail:job_started:1000"))
    box.start()
    subject, done = _event(1)
    await box.put(subject, done)  # goes out at once
    assert await box.drain(10)
    stuck = subjects.job_event("gpu-1", "job-2", "started")
    from schemas.events import JobStarted

    await box.put(stuck, JobStarted(job_id="job-2", agent_id="gpu-1", step="probe"))
    await box.close(timeout=0.3)
    assert [r.kind for r in Outbox(path, _publisher(bus)).pending.values()] == ["job_started"]


def test_fault_spec_is_checked() -> None:
    faults = Faults("fail:job_completed:2,lose:job_failed")
    assert [faults.take("job_completed") for _ in range(3)] == ["fail", "fail", None]
    assert [faults.take("job_failed") for _ in range(2)] == ["lose", None]
    with pytest.raises(ConfigError) as info:
        Faults("drop:job_completed")
    assert info.value.field == FAULTS_ENV


@pytest.mark.timeout(120)
async def test_failed_publishes_of_job_completed_are_retried_and_the_run_completes(
    daemon: Any, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the agent's real publish path fails twice for job_completed; no daemon reconciliation
    monkeypatch.setenv(FAULTS_ENV, "fail:job_completed:2")
    daemon.dispatch.silence_s = 600.0
    agent, task = await start_agent(nats_url, tmp_path, "gpu-1")
    try:
        await daemon.fleet.wait_up("gpu-1", timeout=10)
        stages = install(daemon, {"probe_teachers": probe_job})
        with structlog.testing.capture_logs() as logs:
            run, _ = await run_end(daemon, await submit(daemon))
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)
    assert run.state == "completed", run.error
    assert run.results["probe_teachers"]["best"] == "oracle"
    assert stages.attempts["probe_teachers"] == [1]  # no retry: the event got through
    names = [e["event"] for e in logs]
    injected = [e for e in logs if e["event"] == "job_event_fault_injected"]
    assert [(e["mode"], e["kind"]) for e in injected] == [("fail", "job_completed")] * 2
    assert names.count("job_event_publish_retry") == 2
    assert "job_reconciled" not in names and "job_event_not_published" not in names


@pytest.mark.timeout(120)
async def test_an_agent_restarted_with_a_pending_outbox_delivers_it(
    daemon: Any, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon.dispatch.silence_s = 600.0  # the outbox delivers, not the reconciliation
    monkeypatch.setenv(FAULTS_ENV, "fail:job_failed:100000")
    agent, task = await start_agent(nats_url, tmp_path, "gpu-1")
    await daemon.fleet.wait_up("gpu-1", timeout=10)
    # a job whose input is missing fails in the agent at once; its job_failed cannot go out
    step = RunStep(job_id="outbox-1", run_id="r1", step="train", args={},
                   inputs={"dataset": "r1/missing.jsonl"})
    await daemon.dispatch.send("gpu-1", step)
    await until(lambda: any(r.kind == "job_failed" for r in agent.runner.outbox.pending.values()))
    agent.stop()
    await asyncio.wait_for(task, 30)
    journal = tmp_path / "agents" / "gpu-1" / OUTBOX_FILE
    assert b"job_failed" in journal.read_bytes()
    assert "outbox-1" not in daemon.dispatch.outcomes

    monkeypatch.delenv(FAULTS_ENV)
    again, task = await start_agent(nats_url, tmp_path, "gpu-1")
    try:
        assert await again.runner.outbox.drain(10)
        await until(lambda: journal.read_bytes() == b"")  # compacted once all are acked
        stored = await _stored(daemon.bus, subjects.job_event("gpu-1", "outbox-1", "failed"))
        assert stored.code == "not_found"
        await until(lambda: "outbox-1" in daemon.dispatch.outcomes)  # by the stream
        outcome = await daemon.dispatch.wait("outbox-1", timeout=30)
        assert outcome.state == "failed" and outcome.error is not None
        assert outcome.error.code == "not_found" and "missing.jsonl" in outcome.error.message
    finally:
        again.stop()
        await asyncio.wait_for(task, 30)
