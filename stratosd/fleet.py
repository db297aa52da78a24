"""Agent directory: telemetry in, liveness out. Hot path: decode, update a dict, record delay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import structlog

from schemas import SCHEMA_VERSION, subjects
from schemas.base import encode, utc_now
from schemas.commands import ServerRow
from schemas.events import AgentDown, AgentRegistered
from schemas.specs import ServerOffer
from schemas.telemetry import TELEMETRY_DECODER, AgentTelemetry
from stratosd.bus import Bus
from stratosd.offers import OfferTable

log = structlog.stdlib.get_logger(__name__)


@dataclass
class AgentState:
    """What the daemon knows of one agent."""

    telemetry: AgentTelemetry
    last_seen: float  # monotonic
    last_seen_at: datetime
    status: str = "up"
    dirty: bool = True


@dataclass
class IngestStats:
    """Telemetry ingest counters: totals, plus a window reported and reset periodically."""

    messages: int = 0
    rejected: int = 0
    delays_ms: list[float] = field(default_factory=list)
    window_start: float = field(default_factory=time.monotonic)

    def record(self, delay_ms: float) -> None:
        """Count one message and keep its publish→registry delay (bounded)."""
        self.messages += 1
        if len(self.delays_ms) < 500_000:
            self.delays_ms.append(delay_ms)

    def take_window(self) -> dict[str, float]:
        """Rate and delay percentiles since the last call; starts a new window."""
        now = time.monotonic()
        delays = sorted(self.delays_ms)
        span = max(now - self.window_start, 1e-9)
        out = {
            "messages": float(len(delays)),
            "msgs_per_s": round(len(delays) / span, 1),
            "window_s": round(span, 2),
        }
        if delays:
            out["delay_ms_p50"] = round(delays[len(delays) // 2], 3)
            out["delay_ms_p99"] = round(delays[min(len(delays) - 1, int(len(delays) * 0.99))], 3)
            out["delay_ms_max"] = round(delays[-1], 3)
        self.delays_ms = []
        self.window_start = now
        return out


class Fleet:
    """Live server registry built from agent telemetry."""

    def __init__(
        self,
        bus: Bus,
        *,
        missed_heartbeats: int = 3,
        publish: Callable[[str, Any], Awaitable[None]] | None = None,
        on_down: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.bus = bus
        self.missed_heartbeats = missed_heartbeats
        self.agents: dict[str, AgentState] = {}
        self.stats = IngestStats()
        self._publish = publish
        self._on_down = on_down
        self._sub: Any = None
        self._new: list[str] = []
        self._disconnected_at = 0.0
        self._table: OfferTable | None = None  # live offers, columnar; None: rebuild

    async def start(self) -> None:
        """Restore known agents from KV (as down until heard) and subscribe to telemetry."""
        try:
            kv = await self.bus.kv(subjects.AGENTS_BUCKET)
            for key in await kv.keys():
                entry = await kv.get(key)
                tlm = TELEMETRY_DECODER.decode(entry.value)
                self.agents[tlm.agent_id] = AgentState(
                    tlm,
                    last_seen=float("-inf"),
                    last_seen_at=tlm.ts,
                    status="down",
                    dirty=False,
                )
        except Exception:  # noqa: BLE001 - empty bucket raises; nothing to restore
            log.debug("fleet_restore_empty")
        self._registrations: asyncio.Queue[str] = asyncio.Queue()
        self._announcer = asyncio.create_task(self._announce(), name="fleet-announce")
        self._sub = await self.bus.nc.subscribe(
            subjects.ALL_TELEMETRY, cb=self._on_msg, pending_msgs_limit=100_000
        )

    async def _on_msg(self, msg: Any) -> None:
        self.ingest(msg.data, msg.subject)
        if self._new:
            # JetStream publishes wait for an ack: keep them off the telemetry hot path
            new, self._new = self._new, []
            for agent_id in new:
                self._registrations.put_nowait(agent_id)

    async def _announce(self) -> None:
        while True:
            agent_id = await self._registrations.get()
            st = self.agents.get(agent_id)
            if st is None:
                continue
            log.info("agent_registered", agent_id=agent_id, hostname=st.telemetry.hostname)
            try:
                await self._emit(
                    subjects.agent_event(agent_id, "registered"),
                    AgentRegistered(
                        agent_id=agent_id,
                        hostname=st.telemetry.hostname,
                        region=st.telemetry.region,
                        price_usd_per_hour=st.telemetry.price_usd_per_hour,
                        source="stratosd",
                    ),
                )
            except Exception:  # noqa: BLE001 - an announcement is not worth the loop
                log.warning("agent_event_not_published", agent_id=agent_id, exc_info=True)

    def ingest(self, data: bytes, subject: str | None = None) -> AgentTelemetry | None:
        """Apply one telemetry message (sync: the hot path never awaits).

        The payload's agent_id must match the subject it came on: bus permissions let an agent
        publish only on its own subject, so a mismatch is a forgery and is dropped.
        """
        try:
            tlm = TELEMETRY_DECODER.decode(data)
        except msgspec.DecodeError as exc:
            self.stats.rejected += 1
            log.debug("message_rejected", reason=str(exc))
            return None
        if subject is not None and subject != f"{subjects.PREFIX}.tlm.{tlm.agent_id}":
            self.stats.rejected += 1
            log.warning("message_rejected", subject=subject, agent_id=tlm.agent_id,
                        reason="telemetry agent_id does not match its subject")
            return None
        if tlm.schema_version != SCHEMA_VERSION:
            self.stats.rejected += 1
            side = "agent" if tlm.schema_version < SCHEMA_VERSION else "daemon"
            log.warning(
                "agent_incompatible",
                agent_id=tlm.agent_id,
                agent_schema=tlm.schema_version,
                daemon_schema=SCHEMA_VERSION,
                hint=f"upgrade the {side}",
            )
            return None
        now = utc_now()
        self.stats.record((now - tlm.ts).total_seconds() * 1000.0)
        self._table = None
        st = self.agents.get(tlm.agent_id)
        if st is None or st.status != "up":
            self._new.append(tlm.agent_id)
            self.agents[tlm.agent_id] = AgentState(tlm, time.monotonic(), now)
        else:
            st.telemetry, st.last_seen, st.last_seen_at, st.dirty = (
                tlm,
                time.monotonic(),
                now,
                True,
            )
        return tlm

    async def _emit(self, subject: str, event: Any) -> None:
        if self._publish is not None:
            await self._publish(subject, event)

    async def check_liveness(self) -> list[str]:
        """Mark agents silent for missed_heartbeats × their interval as down; return them."""
        now = time.monotonic()
        if not self.bus.nc.is_connected:
            # our own outage is not theirs: judge them again once we are back
            self._disconnected_at = self._disconnected_at or now
            return []
        if self._disconnected_at:
            gap = now - self._disconnected_at
            self._disconnected_at = 0.0
            for st in self.agents.values():
                st.last_seen += gap

        down = []
        for agent_id, st in self.agents.items():
            limit = self.missed_heartbeats * st.telemetry.interval_s
            if st.status == "up" and now - st.last_seen > limit:
                st.status = "down"
                st.dirty = True
                self._table = None
                down.append(agent_id)
        for agent_id in down:
            st = self.agents[agent_id]
            silent = now - st.last_seen
            log.warning("agent_down", agent_id=agent_id, silent_s=round(silent, 1))
            await self._emit(
                subjects.agent_event(agent_id, "down"),
                AgentDown(
                    agent_id=agent_id,
                    silent_s=round(silent, 2),
                    running_jobs=list(st.telemetry.running_jobs),
                    source="stratosd",
                ),
            )
            if self._on_down is not None:
                await self._on_down(agent_id)
        return down

    async def flush_kv(self) -> int:
        """Write changed agents' last telemetry to KV stratos_agents."""
        kv = await self.bus.kv(subjects.AGENTS_BUCKET)
        n = 0
        for agent_id, st in list(self.agents.items()):
            if st.dirty:
                st.dirty = False
                await kv.put(agent_id, encode(st.telemetry))
                n += 1
        return n

    async def wait_up(self, agent_id: str, timeout: float | None = None) -> bool:
        """Wait until an agent reports (after a daemon restart, agents are 'down' until
        their next heartbeat). Default timeout: the agent's heartbeat window; an agent never
        heard of is waited for only with an explicit timeout."""
        st = self.agents.get(agent_id)
        if timeout is None:
            if st is None:
                return False
            timeout = self.missed_heartbeats * st.telemetry.interval_s
        deadline = time.monotonic() + timeout
        while not self.is_up(agent_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.is_up(agent_id)

    async def report_ingest(self) -> None:
        """Log the telemetry ingest rate and publish→registry delay of the last window."""
        stats = self.stats.take_window()
        if stats["messages"]:
            log.info(
                "telemetry_ingest",
                agents_up=sum(a.status == "up" for a in self.agents.values()),
                rejected_total=self.stats.rejected,
                **stats,
            )

    def is_up(self, agent_id: str) -> bool:
        """True when the agent is live."""
        st = self.agents.get(agent_id)
        return st is not None and st.status == "up"

    def offer(self, agent_id: str) -> ServerOffer:
        """The agent as a server offer."""
        st = self.agents[agent_id]
        t = st.telemetry
        gpu_model = t.gpus[0].model if t.gpus else "cpu"
        gpu_mem = min((g.mem_total_mib for g in t.gpus), default=0)
        return ServerOffer(
            id=agent_id,
            source="agent",
            agent_id=agent_id,
            gpu_model=gpu_model,
            gpu_count=len(t.gpus),
            gpu_mem_mib=gpu_mem,
            cpu_count=t.cpu_count,
            ram_mib=t.ram_total_mib,
            price_usd_per_hour=t.price_usd_per_hour,
            # unknown latency (no --probe-url answered) is latency_known=False; 0.0 is only a
            # placeholder the field's type needs, never a measurement
            latency_ms=t.latency_ms if t.latency_ms is not None else 0.0,
            latency_known=t.latency_ms is not None,
            region=t.region,
            status="up" if st.status == "up" else "down",
            capacity=t.capacity,
            busy=bool(t.training_jobs),
        )

    def live(self) -> list[str]:
        """Ids of the agents that are up, sorted."""
        return sorted(a for a, st in self.agents.items() if st.status == "up")

    def table(self) -> OfferTable:
        """Live agents as offers in columnar form (what selection reads); rebuilt only after
        telemetry or a status change."""
        if self._table is None:
            self._table = OfferTable.from_offers(self.offers())
        return self._table

    def offers(self, *, include_down: bool = False) -> list[ServerOffer]:
        """Live agents as offers (the candidates a run can execute on)."""
        if not include_down and self._table is not None:
            return list(self._table.offers)
        return [
            self.offer(a)
            for a, st in sorted(self.agents.items())
            if include_down or st.status == "up"
        ]

    def rows(self) -> list[ServerRow]:
        """The registry as `stratosctl servers` shows it."""
        return [
            ServerRow(
                offer=self.offer(a),
                last_seen=st.last_seen_at,
                cpu_pct=st.telemetry.cpu_pct,
                ram_used_mib=st.telemetry.ram_used_mib,
                running_jobs=list(st.telemetry.running_jobs),
                endpoints=list(st.telemetry.endpoints),
            )
            for a, st in sorted(self.agents.items())
        ]

    async def stop(self) -> None:
        """Unsubscribe and stop announcing."""
        if getattr(self, "_announcer", None) is not None:
            self._announcer.cancel()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - shutdown path
                log.debug("unsubscribe_failed")
