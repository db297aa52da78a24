"""Faults survived, with real processes on loopback: an agent SIGKILLed mid-training, and the
nats-server restarted under a running job (at once, and after 8 s down mid-training, longer
than a JetStream publish timeout). Each run completes with nothing lost.

A teacher that times out or answers garbage is covered below the bus, where it is cheap:
`tests/plugins/test_synthesize.py::test_garbage_and_timeouts_mark_rows_failed` (retries, the
row is marked failed, the job goes on) and `tests/plugins/test_teachers.py` (retry policy).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from schemas import subjects
from schemas.base import decode_or_error
from schemas.commands import GetRun, RunInfo, SubmitRun
from schemas.events import EVENT_DECODER, AgentDown, JobProgress, JobStarted
from stratosd.bus import Bus
from stratosd.natsd import NatsServer
from stratosd.validate import spec_from_data
from tests.conftest import Proc
from tests.e2e.jobs import agents_up, daemon_ready, open_bus, tiny_spec

pytestmark = pytest.mark.slow

# Fast failure detection: heartbeats every 0.5 s, down after 3 missed, checked twice a second.
DAEMON_ENV = {"STRATOS_LIVENESS_CHECK_S": "0.5", "STRATOS_MISSED_HEARTBEATS": "3"}


async def _get_run(bus: Bus, run_id: str) -> RunInfo:
    return (await bus.request(subjects.daemon_cmd("run"), GetRun(run_id=run_id))).run


async def _finished(bus: Bus, run_id: str, timeout: float) -> RunInfo:
    """Poll the daemon (a request, not a subscription: it must work across a server restart)."""
    async def loop() -> RunInfo:
        while True:
            try:
                run = await _get_run(bus, run_id)
                if run.state in ("completed", "failed", "cancelled"):
                    return run
            except Exception:  # noqa: BLE001 - the bus may be reconnecting
                pass
            await asyncio.sleep(0.5)
    return await asyncio.wait_for(loop(), timeout)


async def _history(bus: Bus, filter_subject: str, until: str = "run_completed") -> list[dict]:
    """Replay a subject filter from the stream (a late watcher sees everything, in order)."""
    seen: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def cb(msg: Any) -> None:
        seen.append(json.loads(msg.data))
        if seen[-1]["type"] == until:
            done.set()

    sub = await bus.js.subscribe(filter_subject, cb=cb, ordered_consumer=True)
    try:
        await asyncio.wait_for(done.wait(), 15)
    finally:
        await sub.unsubscribe()
    return seen


def _kill_tree(proc: Proc) -> None:
    """SIGKILL a process and its job children (a crashed host takes both with it)."""
    try:
        children = psutil.Process(proc.p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.kill()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


class Cluster:
    """A daemon process and named agent processes on one nats-server."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url = url
        self.tmp = tmp
        self.env = {"STRATOS_HOME": str(tmp / "home"), **DAEMON_ENV}
        self.procs: dict[str, Proc] = {}

    def daemon(self) -> Proc:
        """Start the daemon."""
        self.procs["daemon"] = Proc(["-m", "stratosd", "--nats", self.url, "--log-format",
                                     "json"], self.tmp / "daemon.log", self.env)
        return self.procs["daemon"]

    def agent(self, agent_id: str) -> Proc:
        """Start an agent with a 0.5 s heartbeat."""
        self.procs[agent_id] = Proc(
            ["-m", "agents", "--id", agent_id, "--nats", self.url, "--interval", "0.5",
             "--price-per-hour", "1.0", "--log-format", "json"],
            self.tmp / f"{agent_id}.log", self.env)
        return self.procs[agent_id]

    def stop(self) -> None:
        """Stop agents first (they interrupt their jobs), then the daemon."""
        for name, proc in self.procs.items():
            if name != "daemon":
                _kill_tree(proc)
                proc.stop()
        if "daemon" in self.procs:
            self.procs["daemon"].stop()

    def logs(self) -> str:
        """The tail of every process's output (for failure messages)."""
        return "\n".join(f"--- {n}\n{p.output()[-3000:]}" for n, p in self.procs.items())


@pytest.fixture
async def cluster(nats_url: str, tmp_path: Path) -> AsyncIterator[tuple[Cluster, Bus]]:
    """Daemon plus agents cpu-1 and cpu-2, all registered."""
    c = Cluster(nats_url, tmp_path)
    c.daemon()
    c.agent("cpu-1")
    c.agent("cpu-2")
    bus = await open_bus(nats_url)
    try:
        await daemon_ready(bus)
        await agents_up(bus, {"cpu-1", "cpu-2"})
        yield c, bus
    finally:
        await bus.close()
        if not bus.nc.is_closed:  # still reconnecting to a server a test stopped
            await bus.nc.close()
        c.stop()


@pytest.mark.timeout(240)
async def test_agent_killed_mid_training_resumes_on_the_other_agent(
    cluster: tuple[Cluster, Bus],
) -> None:
    c, bus = cluster
    # Many small steps, a checkpoint every 2: training is still going when the first lands.
    spec = tiny_spec("agent-kill")
    spec["train"].update(max_steps=60, save_steps=2)
    run_id = (await bus.request(subjects.daemon_cmd("submit"),
                                SubmitRun(spec=spec_from_data(spec)))).ref
    victim: dict[str, str] = {}
    checkpoint = asyncio.Event()
    downs: list[str] = []

    async def on_job(msg: Any) -> None:
        ev = decode_or_error(EVENT_DECODER, msg.data)
        if isinstance(ev, JobStarted) and ev.run_id == run_id and ev.step == "train":
            victim.setdefault("agent_id", ev.agent_id)
        if (isinstance(ev, JobProgress) and ev.run_id == run_id and ev.step == "train"
                and ev.message.startswith("checkpoint uploaded")):
            victim.setdefault("agent_id", ev.agent_id)
            checkpoint.set()

    async def on_agent(msg: Any) -> None:
        ev = decode_or_error(EVENT_DECODER, msg.data)
        if isinstance(ev, AgentDown):
            downs.append(ev.agent_id)

    subs = [await bus.js.subscribe(subjects.ALL_JOB_EVENTS, cb=on_job, ordered_consumer=True),
            await bus.js.subscribe(subjects.ALL_AGENT_EVENTS, cb=on_agent,
                                   ordered_consumer=True)]
    try:
        await asyncio.wait_for(checkpoint.wait(), 150)
        dead = victim["agent_id"]
        _kill_tree(c.procs[dead])  # a crashed host: agent and its training child, no goodbye
        run = await _finished(bus, run_id, 150)
    except TimeoutError:
        pytest.fail(f"run did not get through the agent kill\n{c.logs()}")
    finally:
        for sub in subs:
            await sub.unsubscribe()
    assert run.state == "completed", (run.error, c.logs())
    assert dead in downs, "the daemon never declared the killed agent down"
    assert run.results["select_server"]["agent_id"] == dead
    assert run.results["train"]["resumed"] is True
    assert run.progress["agent_id"] != dead  # re-selected onto the survivor
    assert dead in run.progress["excluded_agents"]
    assert {"train", "evaluate", "report"} <= set(run.results)
    assert "server_reselected" in c.procs["daemon"].output()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("stage", "down_s"), [
    ("synthesize", 0.0),
    # Training may end inside the 8-s outage: its job_completed waits in the agent's outbox
    # until JetStream is back and acks it (agents/outbox.py).
    ("train", 8.0),
], ids=["quick-restart", "down-8s-mid-training"])
async def test_nats_restart_mid_run_loses_nothing(
    cluster: tuple[Cluster, Bus], nats_server: NatsServer, stage: str, down_s: float,
) -> None:
    c, bus = cluster
    spec = tiny_spec("nats-restart")
    spec["train"].update(max_steps=20, save_steps=5)
    run_id = (await bus.request(subjects.daemon_cmd("submit"),
                                SubmitRun(spec=spec_from_data(spec)))).ref
    reached = asyncio.Event()

    async def on_run(msg: Any) -> None:
        ev = json.loads(msg.data)
        if ev["type"] == "run_stage_started" and ev["stage"] == stage:
            reached.set()

    sub = await bus.js.subscribe(subjects.run_events(run_id), cb=on_run, ordered_consumer=True)
    replacement: NatsServer | None = None
    try:
        await asyncio.wait_for(reached.wait(), 150)
        await sub.unsubscribe()
        before = await _get_run(bus, run_id)
        # Same port and store: every client reconnects to it; JetStream state is on disk.
        port, store = nats_server.port, nats_server.store_dir
        await asyncio.to_thread(nats_server.stop)
        await asyncio.sleep(down_s)  # the outage itself: longer than a JetStream publish timeout
        replacement = NatsServer(store, port=port)
        await asyncio.to_thread(replacement.start)
        run = await _finished(bus, run_id, 180)
        assert run.state == "completed", (run.error, c.logs())
        assert run.created == before.created and run.spec == before.spec  # KV state intact
        assert set(before.results) <= set(run.results)
        history = await _history(bus, subjects.run_events(run_id))
    except TimeoutError:
        pytest.fail(f"run did not get through the nats restart\n{c.logs()}")
    finally:
        await bus.close()  # before its server goes: a client left reconnecting never ends
        c.stop()
        if replacement is not None:
            await asyncio.to_thread(replacement.stop)
    types = [e["type"] for e in history]
    assert types[0] == "run_submitted" and types[-1] == "run_completed"
    started = {e["stage"] for e in history if e["type"] == "run_stage_started"}
    completed = {e["stage"] for e in history if e["type"] == "run_stage_completed"}
    assert started == completed == set(run.results), (started, completed)
    assert len({e["id"] for e in history}) == len(history)  # no duplicates
    assert "nats_reconnected" in c.procs["daemon"].output()
    assert "run_crashed" not in c.procs["daemon"].output()
