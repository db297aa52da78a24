"""Fixtures: a real nats-server (JetStream on) per test, in-process daemon and agents."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from stratosd.natsd import NatsServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every test gets its own STRATOS_HOME and model cache; nothing leaks between tests.
    monkeypatch.setenv("STRATOS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STRATOS_MODEL_CACHE", str(ROOT / ".stratos" / "test-models"))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server on a free loopback port with JetStream, killed afterwards."""
    server = NatsServer(tmp_path / "nats-store", port=-1)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """URL of the test's nats-server."""
    return nats_server.url


@contextlib.asynccontextmanager
async def running_daemon(cfg: Any) -> AsyncIterator[Any]:
    """A Daemon with config cfg running in this event loop until the block ends."""
    from stratosd.daemon import Daemon

    d = Daemon(cfg)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 20)
    try:
        yield d
    finally:
        d.stop()
        await asyncio.wait_for(task, 30)


def daemon_config(nats_url: str, tmp_path: Path, **over: Any) -> Any:
    """The tests' DaemonConfig: quick liveness checks and KV flushes, home under tmp_path."""
    from stratosd.config import DaemonConfig

    return DaemonConfig(nats_url=nats_url, home=str(tmp_path / "home"), liveness_check_s=0.2,
                        missed_heartbeats=3, kv_flush_s=0.5, **over)


@pytest.fixture
async def daemon(nats_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    """A Daemon running in this event loop against the test server."""
    async with running_daemon(daemon_config(nats_url, tmp_path)) as d:
        yield d


async def start_agent(nats_url: str, tmp_path: Path, agent_id: str, price: float = 1.0,
                      interval: float = 0.3, **kw: Any) -> tuple[Any, asyncio.Task[None]]:
    """An Agent in this event loop."""
    from agents.agent import Agent
    from stratosd.config import AgentConfig

    kw.setdefault("calibrate", False)  # tests that need a capacity ask for it
    cfg = AgentConfig(nats_url=nats_url, home=str(tmp_path / "home"), agent_id=agent_id,
                      price_usd_per_hour=price, telemetry_interval_s=interval,
                      work_dir=str(tmp_path / "agents" / agent_id), grace_s=5.0, **kw)
    agent = Agent(cfg)
    task = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.ready.wait(), 20)
    return agent, task


@pytest.fixture
async def agent(nats_url: str, tmp_path: Path, daemon: Any) -> AsyncIterator[Any]:
    """One agent 'gpu-1' registered with the daemon."""
    a, task = await start_agent(nats_url, tmp_path, "gpu-1", price=2.0)
    try:
        yield a
    finally:
        a.stop()
        await asyncio.wait_for(task, 30)


async def wait_latency_known(daemon: Any, agent_id: str, timeout: float = 15) -> None:
    """Wait until the daemon sees agent_id up with a measured user-facing latency."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (daemon.fleet.is_up(agent_id) and daemon.fleet.offer(agent_id).latency_known):
        assert asyncio.get_running_loop().time() < deadline, f"{agent_id}: no latency measured"
        await asyncio.sleep(0.1)


@pytest.fixture
def users_url() -> Iterator[str]:
    """A loopback HTTP server standing in for the users' region (agents' --probe-url)."""
    from stratosd.ctl.demo import UsersEndpoint

    users = UsersEndpoint()
    try:
        yield users.url
    finally:
        users.close()


def free_port() -> int:
    """A free loopback TCP port (for processes that need one up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A spawned `python -m ...` process with its output captured to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.fh = log.open("wb")
        self.p = subprocess.Popen(  # noqa: S603
            [sys.executable, *args], stdout=self.fh, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def kill(self) -> None:
        """SIGKILL (crash)."""
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait."""
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self.fh.close()
        return int(self.p.returncode)

    def output(self) -> str:
        """Everything it printed so far."""
        if not self.fh.closed:
            self.fh.flush()
        return self.log.read_text(errors="replace")


def wait_until(pred: Any, timeout: float, interval: float = 0.1) -> bool:
    """Poll a condition (sync tests of spawned processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())
