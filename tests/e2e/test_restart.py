"""Real daemon and agent processes: a daemon killed mid-run resumes it from KV after restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from schemas import subjects
from schemas.base import decode_or_error
from schemas.commands import GetRun, SubmitRun
from schemas.events import EVENT_DECODER, RunCompleted, RunStageStarted
from stratosd.validate import spec_from_data
from tests.conftest import Proc
from tests.e2e.jobs import agents_up, daemon_ready, open_bus, tiny_spec

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
async def test_daemon_killed_mid_run_resumes(nats_url: str, tmp_path: Path) -> None:
    env = {"STRATOS_HOME": str(tmp_path / "home")}
    daemon = Proc(["-m", "stratosd", "--nats", nats_url, "--log-format", "json"],
                  tmp_path / "d1.log", env)
    agent = Proc(["-m", "agents", "--id", "cpu-1", "--nats", nats_url, "--interval", "0.5",
                  "--log-format", "json"], tmp_path / "agent.log", env)
    bus = await open_bus(nats_url)
    try:
        await daemon_ready(bus)
        await agents_up(bus, {"cpu-1"})
        spec = spec_from_data(tiny_spec("restart"))
        run_id = (await bus.request(subjects.daemon_cmd("submit"), SubmitRun(spec=spec))).ref
        seen: list[object] = []
        started = asyncio.Event()

        async def cb(msg: object) -> None:
            ev = decode_or_error(EVENT_DECODER, msg.data)  # type: ignore[attr-defined]
            seen.append(ev)
            if isinstance(ev, RunStageStarted) and ev.stage == "synthesize":
                started.set()

        sub = await bus.js.subscribe(subjects.run_events(run_id), cb=cb, ordered_consumer=True)
        await asyncio.wait_for(started.wait(), 240)

        async def sent() -> None:  # the synthesis job is on the agent
            while "synthesize#1" not in (await bus.request(
                    subjects.daemon_cmd("run"), GetRun(run_id=run_id))).run.jobs:
                await asyncio.sleep(0.1)
        await asyncio.wait_for(sent(), 60)
        daemon.kill()  # mid-run, with an agent job in flight
        daemon2 = Proc(["-m", "stratosd", "--nats", nats_url, "--log-format", "json"],
                       tmp_path / "d2.log", env)
        try:
            async def done() -> None:
                while not any(isinstance(e, RunCompleted) for e in seen):
                    await asyncio.sleep(0.2)
            await asyncio.wait_for(done(), 420)
            run = (await bus.request(subjects.daemon_cmd("run"), GetRun(run_id=run_id))).run
            assert run.state == "completed", run.error
            assert {"synthesize", "train", "evaluate", "report"} <= set(run.results)
            assert "run_resumed" in daemon2.output()
            # the new daemon waited for the job in flight instead of sending it again
            assert "synthesize#2" not in run.jobs, run.jobs
        finally:
            await sub.unsubscribe()
            daemon2.stop()
        # events are replayable from the stream by a late watcher, in order
        replay: list[str] = []

        async def rcb(msg: object) -> None:
            replay.append(json.loads(msg.data)["type"])  # type: ignore[attr-defined]

        sub2 = await bus.js.subscribe(subjects.run_events(run_id), cb=rcb, ordered_consumer=True)
        async def replayed() -> None:
            while "run_completed" not in replay:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(replayed(), 10)
        await sub2.unsubscribe()
        assert replay[0] == "run_submitted" and replay[-1] == "run_completed"
        assert replay.count("run_stage_completed") >= 9
    finally:
        await bus.close()
        agent.stop()
        daemon.stop()
