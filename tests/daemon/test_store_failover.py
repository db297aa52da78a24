"""The run store rides out a bus failover: reads and writes wait for the server to come back,
and a write whose ack was lost is recognised when retried (not reported as a conflict).
Real nats-server; the server is stopped and started on the same port and store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from schemas.base import utc_now
from schemas.commands import RunInfo
from stratosd.bus import Bus, connect
from stratosd.config import StratosConfig
from stratosd.errors import Conflict
from stratosd.natsd import NatsServer
from stratosd.store import RunStore
from stratosd.validate import spec_from_data
from tests.e2e.jobs import tiny_spec


async def open_store(url: str) -> tuple[Bus, RunStore]:
    cfg = StratosConfig(nats_url=url)
    bus = Bus(await connect(cfg, "test-store"), cfg)
    await bus.ensure_streams()
    return bus, RunStore(bus)


def new_run(run_id: str) -> RunInfo:
    now = utc_now()
    return RunInfo(run_id=run_id, name="store", state="queued", stage="select_server",
                   created=now, updated=now, spec=spec_from_data(tiny_spec("store")))


async def test_reads_and_writes_wait_out_a_server_restart(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "store", port=-1)
    server.start()
    bus, store = await open_store(server.url)
    try:
        run = await store.create(new_run("run-a"))
        port = int(server.url.rsplit(":", 1)[1])
        server.stop()
        read = asyncio.create_task(store.get("run-a"))
        await asyncio.sleep(2.0)  # the read is retrying against a dead server
        assert not read.done()
        server = NatsServer(tmp_path / "store", port=port)
        server.start()
        got = await asyncio.wait_for(read, 45)
        assert got.revision == run.revision
        saved = await store.save(got, state="running")
        assert (await store.get("run-a")).state == "running" == saved.state
    finally:
        await bus.close()
        server.stop()


async def test_a_write_whose_ack_was_lost_is_not_a_conflict(
    nats_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    bus, store = await open_store(nats_url)
    try:
        run = await store.create(new_run("run-b"))
        kv = await bus.kv("stratos_runs")
        update = kv.update
        lost: list[int] = []

        async def ack_lost(key: str, value: bytes, last: int | None = None) -> Any:
            rev = await update(key, value, last=last)  # the write lands on the server
            if not lost:
                lost.append(rev)
                raise nats.errors.TimeoutError  # ... and its ack never arrives
            return rev

        monkeypatch.setattr(kv, "update", ack_lost)
        saved = await store.save(run, state="running")
        assert saved.revision == lost[0] and saved.state == "running"
        # a real conflict is still one: another writer moved the run on first
        other = await store.save(saved, stage="train")
        with pytest.raises(Conflict, match="changed concurrently"):
            await store.save(saved, stage="evaluate")
        assert (await store.get("run-b")).revision == other.revision
    finally:
        await bus.close()
