"""Agent registration, telemetry in the registry, agents marked down when silent."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog

from schemas import subjects
from schemas.commands import ListServers, ServerList
from tests.conftest import start_agent


async def _servers(daemon: Any) -> ServerList:
    reply = await daemon.bus.request(subjects.daemon_cmd("servers"), ListServers())
    assert isinstance(reply, ServerList)
    return reply


async def _until(pred: Any, timeout: float = 10.0) -> None:
    async def loop() -> None:
        while not pred():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(loop(), timeout)


async def test_agent_registers_and_reports_telemetry(daemon: Any, agent: Any) -> None:
    await _until(lambda: daemon.fleet.is_up("gpu-1"))
    servers = (await _servers(daemon)).servers
    row = next(s for s in servers if s.offer.id == "gpu-1")
    assert row.offer.price_usd_per_hour == 2.0
    assert row.offer.cpu_count >= 1 and row.offer.ram_mib > 0
    assert row.offer.status == "up"
    assert row.last_seen is not None
    # without --probe-url nothing measures what users see: latency is unknown, not 0
    assert row.offer.latency_known is False
    await agent.measure_latency()
    assert agent.latency_ms is None
    # the bus round trip to the daemon is still timed, as a debug figure
    assert agent.daemon_rtt_ms is not None and agent.daemon_rtt_ms > 0


async def test_killed_agent_is_marked_down(daemon: Any, nats_url: str, tmp_path: Path) -> None:
    a, task = await start_agent(nats_url, tmp_path, "doomed", interval=0.2)
    await _until(lambda: daemon.fleet.is_up("doomed"))
    with structlog.testing.capture_logs() as logs:
        task.cancel()  # the agent vanishes without a goodbye
        await asyncio.gather(task, return_exceptions=True)
        await a.bus.nc.close()
        # 3 missed heartbeats of 0.2 s, checked every 0.2 s
        await _until(lambda: not daemon.fleet.is_up("doomed"), timeout=5)
    assert any(e["event"] == "agent_down" and e["agent_id"] == "doomed" for e in logs)
    row = next(s for s in (await _servers(daemon)).servers if s.offer.id == "doomed")
    assert row.offer.status == "down"


async def test_incompatible_agent_is_refused(daemon: Any) -> None:
    from schemas.telemetry import AgentTelemetry

    with structlog.testing.capture_logs() as logs:
        await daemon.bus.publish(
            subjects.telemetry("old-agent"), AgentTelemetry(agent_id="old-agent", schema_version=0)
        )
        await daemon.bus.nc.flush()
        await _until(lambda: any(e["event"] == "agent_incompatible" for e in logs))
    assert "old-agent" not in daemon.fleet.agents
    assert (
        next(e for e in logs if e["event"] == "agent_incompatible")["hint"] == "upgrade the agent"
    )
