"""Agent.run(): connect, serve commands, heartbeat telemetry, shut down cleanly."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from agents import telemetry
from agents.runner import Runner
from agents.service import AgentService
from schemas import subjects
from schemas.base import is_token
from schemas.commands import STEP_NAMES
from schemas.telemetry import AgentTelemetry
from stratosd import __version__
from stratosd.bus import Bus, connect
from stratosd.config import AgentConfig
from stratosd.errors import ConfigError
from stratosd.runtime import stop_on_signals

log = structlog.stdlib.get_logger(__name__)


class Agent:
    """A host agent: reports what it has, runs what the daemon asks, nothing else."""

    def __init__(self, config: AgentConfig) -> None:
        if not is_token(config.agent_id):
            raise ConfigError(
                f"agent id {config.agent_id!r} is not valid: use 1-64 of [a-z0-9_-]",
                hint="e.g. --id gpu-1", field="agent_id")
        self.config = config
        self.agent_id = config.agent_id
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.seq = 0
        self.latency_ms: float | None = None
        self.probe_latency_ms: float | None = None

    async def measure_latency(self) -> None:
        """Round trip to the daemon over the bus ($SRV.PING.stratosd), plus the probe URL."""
        t0 = time.perf_counter()
        try:
            await self.bus.nc.request(f"$SRV.PING.{subjects.DAEMON_SERVICE}", b"", timeout=2.0)
            self.latency_ms = round((time.perf_counter() - t0) * 1000.0, 3)
        except Exception:  # noqa: BLE001 - daemon away: keep the last figure
            log.debug("daemon_ping_failed")
        if self.config.probe_url:
            self.probe_latency_ms = await telemetry.probe_url(self.config.probe_url)

    def snapshot(self) -> AgentTelemetry:
        """This heartbeat's telemetry."""
        self.seq += 1
        return AgentTelemetry(
            agent_id=self.agent_id, agent_version=__version__, seq=self.seq,
            region=self.config.region, gpus=self._gpus,
            price_usd_per_hour=self.config.price_usd_per_hour,
            latency_ms=self.latency_ms if self.probe_latency_ms is None else self.probe_latency_ms,
            probe_latency_ms=self.probe_latency_ms, running_jobs=self.runner.running(),
            endpoints=self.runner.endpoints(), steps=list(STEP_NAMES),
            interval_s=self.config.telemetry_interval_s, source=self.agent_id,
            **telemetry.host(),
        )

    async def heartbeat(self) -> None:
        """Publish one telemetry message."""
        try:
            await self.bus.publish(subjects.telemetry(self.agent_id), self.snapshot())
        except Exception:  # noqa: BLE001 - reconnecting; next beat retries
            log.warning("telemetry_not_sent", exc_info=True)

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT; on stop, interrupt jobs (they checkpoint), then drain."""
        stop_on_signals(self.stopping)
        self._gpus = await asyncio.to_thread(telemetry.gpus)
        self.bus = Bus(await connect(self.config, f"stratos-agent-{self.agent_id}",
                                     retry_for_s=30.0))
        work = self.config.work_path
        work.mkdir(parents=True, exist_ok=True)
        self.runner = Runner(self.bus, self.agent_id, work, max_jobs=self.config.max_jobs,
                             grace_s=self.config.grace_s)
        self.service = AgentService(self.bus.nc, self.agent_id, self.runner)
        await self.service.start()
        await self.measure_latency()
        await self.heartbeat()
        scheduler = AsyncIOScheduler(timezone="UTC")
        interval = self.config.telemetry_interval_s
        scheduler.add_job(self.heartbeat, IntervalTrigger(seconds=interval, jitter=interval / 10),
                          id="telemetry", max_instances=1, coalesce=True)
        scheduler.add_job(self.measure_latency, IntervalTrigger(seconds=max(interval * 3, 5)),
                          id="latency", max_instances=1, coalesce=True)
        scheduler.start()
        log.info("agent_started", agent_id=self.agent_id, work_dir=str(work),
                 price_usd_per_hour=self.config.price_usd_per_hour, gpus=len(self._gpus))
        self.ready.set()
        await self.stopping.wait()
        log.info("agent_stopping", agent_id=self.agent_id)
        scheduler.shutdown(wait=False)
        await self.service.stop()
        await self.runner.shutdown()
        await self.bus.close()
        log.info("agent_stopped", agent_id=self.agent_id)

    def stop(self, *_: Any) -> None:
        """Ask run() to return."""
        self.stopping.set()
