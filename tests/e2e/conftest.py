"""Fixtures for the end-to-end security tests: a nats-server with generated credentials,
a daemon and two agents logged in with their own identities."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from stratosd.auth import DAEMON_USER
from stratosd.config import DaemonConfig
from stratosd.natsd import NatsServer
from tests.conftest import running_daemon, start_agent
from tests.e2e.secure import Creds, auth_init, server_config, until


@pytest.fixture(scope="module")
def auth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated config for the module (bcrypt hashing takes a moment per user)."""
    out = tmp_path_factory.mktemp("auth") / "etc-stratos"
    assert auth_init(out) == 0
    return out


@pytest.fixture
def creds(auth_dir: Path, tmp_path: Path) -> Iterator[Creds]:
    """A nats-server with the generated config and its own JetStream store, per test."""
    server = NatsServer(tmp_path / "store", port=-1, config_file=server_config(auth_dir, tmp_path))
    server.start()
    try:
        yield Creds(auth_dir, server.url)
    finally:
        server.stop()


@pytest.fixture
async def secure_daemon(creds: Creds, tmp_path: Path) -> AsyncIterator[Any]:
    """An in-process daemon logged in as `daemon`."""
    cfg = DaemonConfig(nats_url=creds.url, nats_user=DAEMON_USER,
                       nats_password_file=str(creds.out / f"{DAEMON_USER}.password"),
                       home=str(tmp_path / "home"), liveness_check_s=0.5, missed_heartbeats=10,
                       kv_flush_s=0.5)
    async with running_daemon(cfg) as d:
        yield d


@pytest.fixture
async def agents(creds: Creds, tmp_path: Path, secure_daemon: Any) -> AsyncIterator[Any]:
    """Agents gpu-1 and gpu-2, each with its own credentials, registered with the daemon."""
    started = [await start_agent(creds.url, tmp_path, a, **creds.agent_kw(a))
               for a in ("gpu-1", "gpu-2")]
    await until(lambda: all(secure_daemon.fleet.is_up(a) for a in ("gpu-1", "gpu-2")))
    try:
        yield {a.agent_id: a for a, _ in started}
    finally:
        for a, task in started:
            a.stop()
            await asyncio.wait_for(task, 30)
