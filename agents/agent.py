"""Agent.run(): connect, serve commands, heartbeat telemetry, shut down cleanly."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Coroutine
from typing import Any

import msgspec
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from agents import calibrate, telemetry
from agents.runner import Runner
from agents.service import AgentService
from schemas import subjects
from schemas.base import is_token, utc_now
from schemas.commands import STEP_NAMES
from schemas.telemetry import AgentTelemetry, Capacity
from stratosd import __version__
from stratosd.artifacts import private as private_artifacts
from stratosd.bus import Bus, connect
from stratosd.config import AgentConfig
from stratosd.errors import ConfigError, Conflict
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
        self.probe_targets = telemetry.parse_probe_targets(config.probe_urls)
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.seq = 0
        self.user_latency_ms: dict[str, float] = {}
        self.daemon_rtt_ms: float | None = None  # bus health only: users never see this path
        self.capacity: Capacity | None = None
        self._calibration: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def latency_ms(self) -> float | None:
        """User-facing latency: the worst probe target's median; None when unknown."""
        return telemetry.worst_latency(self.user_latency_ms)

    async def measure_latency(self) -> None:
        """Time every --probe-url target (user-facing latency); log the daemon RTT at debug."""
        if self.probe_targets:
            self.user_latency_ms = await telemetry.user_latency(self.probe_targets)
            missing = sorted(set(self.probe_targets) - set(self.user_latency_ms))
            if missing:
                log.debug("probe_targets_unanswered", targets=missing)
        t0 = time.perf_counter()
        try:
            await self.bus.nc.request(f"$SRV.PING.{subjects.DAEMON_SERVICE}", b"", timeout=2.0)
            self.daemon_rtt_ms = round((time.perf_counter() - t0) * 1000.0, 3)
            log.debug("daemon_rtt", rtt_ms=self.daemon_rtt_ms)
        except Exception:  # noqa: BLE001 - daemon away: nothing to learn this round
            log.debug("daemon_ping_failed")

    def start_calibration(self) -> str:
        """Start the capacity benchmarks in the background (a running one is joined).

        Refused while a training job holds the devices: it would measure the contention."""
        if self._calibration is not None and not self._calibration.done():
            return "calibrating"
        holders = self.runner.training_jobs()
        if holders:
            raise Conflict(
                f"agent {self.agent_id} is busy: training job {holders[0]} holds its devices, "
                "a calibration now would measure the contention",
                hint="calibrate when the job has finished (stratosctl servers --calibrate)")
        self._calibration = self._spawn(self._calibrate(), "calibrate")
        return "calibrating"

    async def _calibrate(self) -> None:
        log.info("calibration_started", agent_id=self.agent_id,
                 job_threads=self.config.job_threads)
        try:
            cap = await calibrate.calibrate(self.bus, self.agent_id, self.config.work_path,
                                            threads=self.config.job_threads)
        except Exception as exc:  # noqa: BLE001 - a failed benchmark must never stop the agent
            log.warning("calibration_failed", agent_id=self.agent_id, exc_info=True)
            cap = Capacity(measured_at=utc_now(), job_threads=self.config.job_threads,
                           error=f"{type(exc).__name__}: {exc}")
        notes = []
        if self._gpus and cap.device != "cuda" and cap.matmul_tflops:
            notes.append(f"NVML sees {len(self._gpus)} GPU(s) but torch could not use CUDA: "
                         "these are CPU figures (check the driver and the torch build)")
        if (holders := self.runner.training_jobs()):
            # a job took the devices meanwhile: its load is in these figures
            notes.append(f"training job {holders[0]} started during the benchmarks; the "
                         "figures include its load (recalibrate when idle)")
        if notes:
            cap = msgspec.structs.replace(cap, error="; ".join([*filter(None, [cap.error]),
                                                                *notes]))
        if cap.error:
            log.warning("calibration_incomplete", agent_id=self.agent_id, error=cap.error)
        self.capacity = cap
        log.info("calibrated", agent_id=self.agent_id, device=cap.device, threads=cap.threads,
                 matmul_tflops=cap.matmul_tflops, mem_bw_gbps=cap.mem_bw_gbps,
                 disk_write_mbps=cap.disk_write_mbps, upload_mbps=cap.upload_mbps,
                 duration_s=cap.duration_s)
        await self.heartbeat()  # the daemon sees it now, not a beat later

    async def _first_latency(self) -> None:
        await self.measure_latency()
        if self.user_latency_ms:
            await self.heartbeat()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"agent-{name}", context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def snapshot(self) -> AgentTelemetry:
        """This heartbeat's telemetry."""
        self.seq += 1
        latency = self.latency_ms
        return AgentTelemetry(
            agent_id=self.agent_id, agent_version=__version__, seq=self.seq,
            region=self.config.region, gpus=self._gpus,
            price_usd_per_hour=self.config.price_usd_per_hour,
            latency_ms=latency, probe_latency_ms=latency,
            user_latency_ms=dict(self.user_latency_ms), capacity=self.capacity,
            running_jobs=self.runner.running(), training_jobs=self.runner.training_jobs(),
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
                                     retry_for_s=30.0), self.config)
        if private_artifacts.enabled(self.config):  # a secured bus: its own bucket only
            self.bus.artifacts = private_artifacts.agent_artifacts(self.bus, self.agent_id)
        work = self.config.work_path
        work.mkdir(parents=True, exist_ok=True)
        self.runner = Runner(self.bus, self.agent_id, work, max_jobs=self.config.max_jobs,
                             grace_s=self.config.grace_s, job_threads=self.config.job_threads)
        await self.runner.start()  # job events an earlier life left unpublished go out now
        self.service = AgentService(self.bus.nc, self.agent_id, self.runner,
                                    calibrate=self.start_calibration)
        await self.service.start()
        await self.heartbeat()  # ready at once: latency and capacity follow when measured
        self._spawn(self._first_latency(), "latency")
        if self.config.calibrate:
            self.start_calibration()
        scheduler = AsyncIOScheduler(timezone="UTC")
        interval = self.config.telemetry_interval_s
        scheduler.add_job(self.heartbeat, IntervalTrigger(seconds=interval, jitter=interval / 10),
                          id="telemetry", max_instances=1, coalesce=True)
        scheduler.add_job(self.measure_latency, IntervalTrigger(seconds=max(interval * 3, 5)),
                          id="latency", max_instances=1, coalesce=True)
        scheduler.start()
        log.info("agent_started", agent_id=self.agent_id, work_dir=str(work),
                 price_usd_per_hour=self.config.price_usd_per_hour, gpus=len(self._gpus),
                 job_threads=self.config.job_threads, probe_targets=sorted(self.probe_targets),
                 calibrate=self.config.calibrate)
        self.ready.set()
        await self.stopping.wait()
        log.info("agent_stopping", agent_id=self.agent_id)
        scheduler.shutdown(wait=False)
        await self.service.stop()
        for task in list(self._tasks):
            task.cancel()  # a calibration kills its benchmark child
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runner.shutdown()
        await self.bus.close()
        log.info("agent_stopped", agent_id=self.agent_id)

    def stop(self, *_: Any) -> None:
        """Ask run() to return."""
        self.stopping.set()
