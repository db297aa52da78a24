"""The fleet's ingest bookkeeping at scale: a bounded delay histogram, and a KV copy of the
registry rewritten when what it shows changes, not on every heartbeat."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from schemas import subjects
from schemas.telemetry import TELEMETRY_DECODER, AgentTelemetry
from stratosd.fleet import IngestStats


def test_delay_percentiles_from_the_histogram_are_close_to_exact() -> None:
    rng = random.Random(7)
    delays = [rng.lognormvariate(1.0, 1.0) for _ in range(50_000)] + [-0.2] * 10  # skew
    stats = IngestStats()
    for d in delays:
        stats.record(d)
    window = stats.take_window()
    delays.sort()
    assert window["messages"] == len(delays) == stats.messages
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        exact = delays[int(len(delays) * q)]
        assert abs(window[f"delay_ms_{name}"] - exact) / exact < 0.03, name
    assert window["delay_ms_max"] == round(delays[-1], 3)
    assert sum(stats.counts) == len(delays)  # kept for metrics; the window starts afresh
    assert stats.take_window()["messages"] == 0


async def _kv_entry(daemon: Any, agent_id: str) -> tuple[int, AgentTelemetry]:
    kv = await daemon.bus.kv(subjects.AGENTS_BUCKET)
    entry = await kv.get(agent_id)
    return entry.revision, TELEMETRY_DECODER.decode(entry.value)


async def _heartbeat(daemon: Any, tlm: AgentTelemetry) -> None:
    await daemon.bus.publish(subjects.telemetry(tlm.agent_id), tlm)

    async def applied() -> None:
        while (st := daemon.fleet.agents.get(tlm.agent_id)) is None or st.telemetry.seq < tlm.seq:
            await asyncio.sleep(0.02)
    await asyncio.wait_for(applied(), 10)
    await daemon.fleet.flush_kv()


async def test_kv_is_rewritten_when_what_it_shows_changes(daemon: Any) -> None:
    base = AgentTelemetry(agent_id="kv-1", seq=1, cpu_pct=10.0, price_usd_per_hour=1.0,
                          interval_s=5.0)
    await _heartbeat(daemon, base)
    first, stored = await _kv_entry(daemon, "kv-1")
    assert stored.seq == 1

    # a heartbeat that changes only load figures is not written at once
    for seq in (2, 3):
        await _heartbeat(daemon, AgentTelemetry(agent_id="kv-1", seq=seq, cpu_pct=90.0,
                                                price_usd_per_hour=1.0, interval_s=5.0))
    assert (await _kv_entry(daemon, "kv-1"))[0] == first

    # a new price (or hardware, capacity, jobs, status) is
    await _heartbeat(daemon, AgentTelemetry(agent_id="kv-1", seq=4, cpu_pct=90.0,
                                            price_usd_per_hour=2.5, interval_s=5.0))
    revision, stored = await _kv_entry(daemon, "kv-1")
    assert revision > first
    assert (stored.seq, stored.price_usd_per_hour) == (4, 2.5)
