"""End-to-end test support: tiny job specs (every stage real, toy sizes) and bus waits."""

from __future__ import annotations

import asyncio
from typing import Any

from schemas import subjects
from schemas.commands import ListServers
from stratosd.bus import Bus, connect
from stratosd.config import StratosConfig


async def open_bus(url: str) -> Bus:
    """A test client connection."""
    return Bus(await connect(StratosConfig(nats_url=url), "test", retry_for_s=10))


async def daemon_ready(bus: Bus, timeout: float = 30) -> None:
    """Wait until the daemon's micro service answers a ping."""
    async def loop() -> None:
        while True:
            try:
                await bus.nc.request(f"$SRV.PING.{subjects.DAEMON_SERVICE}", b"", timeout=1)
                return
            except Exception:  # noqa: BLE001 - not up yet
                await asyncio.sleep(0.2)
    await asyncio.wait_for(loop(), timeout)


async def agents_up(bus: Bus, agent_ids: set[str], timeout: float = 60) -> None:
    """Wait until the daemon lists every agent in agent_ids as up."""
    async def loop() -> None:
        while True:
            servers = (await bus.request(subjects.daemon_cmd("servers"), ListServers())).servers
            if agent_ids <= {s.offer.id for s in servers if s.offer.status == "up"}:
                return
            await asyncio.sleep(0.2)
    await asyncio.wait_for(loop(), timeout)


def tiny_spec(name: str = "e2e", *, deploy: bool = False, **over: Any) -> dict[str, Any]:
    """A Mahjong L1 job: reference teacher (no model), tiny student, a few training steps."""
    spec: dict[str, Any] = {
        "name": name,
        "task": {"name": "mahjong-winning-tiles",
                 "params": {"difficulty": 1, "n_train": 16, "n_test": 8, "seed": 0},
                 "probe_size": 4},
        "teachers": [{"name": "oracle", "backend": "reference", "model": "reference"}],
        "students": [{"model": "config:tiny"}],
        "constraints": {"budget_usd": 100.0},
        "deploy": deploy,
        "train": {"max_steps": 6, "save_steps": 2,
                  "synthesis": {"tries": 1},
                  "prescreen": {"sample_size": 2},
                  "evaluate": {"max_new_tokens": 16, "limit": 4}},
    }
    spec.update(over)
    return spec
