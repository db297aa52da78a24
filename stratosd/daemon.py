"""Daemon.run(): start order, signals, shutdown order."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import structlog
from nats.js.errors import KeyNotFoundError, NoKeysError

from schemas import subjects
from schemas.base import Message, encode
from schemas.commands import EndpointInfo, RunInfo
from schemas.events import EndpointDeployed, EndpointRemoved
from schemas.specs import ServerOffer
from stratosd.api import PeriodicJob
from stratosd.bus import Bus, connect
from stratosd.config import DaemonConfig
from stratosd.costmodel.costs import CostModel
from stratosd.dispatch import Dispatcher
from stratosd.errors import StratosError
from stratosd.fleet import Fleet
from stratosd.natsd import NatsServer
from stratosd.pipeline import BudgetVerdict, Pipeline
from stratosd.plugins import Plugins
from stratosd.runtime import stop_on_signals
from stratosd.scheduler import build_scheduler
from stratosd.service import ControlService
from stratosd.stages import STAGE_FUNCS, Services, budget_check
from stratosd.store import RunStore

log = structlog.stdlib.get_logger(__name__)
ENDPOINT_DECODER = msgspec.json.Decoder(EndpointInfo)


class Daemon:
    """One daemon: decides, dispatches, remembers. Plugins supply every policy."""

    def __init__(self, config: DaemonConfig, plugins: Plugins | None = None) -> None:
        self._config = config
        self.plugins = plugins or Plugins()
        self.embedded: NatsServer | None = None
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.url = ""

    @property
    def config(self) -> DaemonConfig:
        """The daemon's configuration (DaemonAPI)."""
        return self._config

    async def publish(self, subject: str, message: Message) -> None:
        """Publish an event to JetStream and show it to stratos_on_event observers."""
        await self.bus.publish_event(subject, message)
        await self.plugins.on_event(message)

    def offers(self) -> list[ServerOffer]:
        """Live agents and catalog offers (DaemonAPI)."""
        return self.fleet.offers() + self.catalog_offers()

    def catalog_offers(self) -> list[ServerOffer]:
        """Every offer from every catalog plugin."""
        return self.plugins.catalog_offers()

    async def endpoints(self) -> list[EndpointInfo]:
        """Deployed endpoints from KV."""
        kv = await self.bus.kv(subjects.ENDPOINTS_BUCKET)
        try:
            keys = await kv.keys()
        except NoKeysError:
            return []
        out = []
        for key in keys:
            try:
                out.append(ENDPOINT_DECODER.decode((await kv.get(key)).value))
            except (KeyNotFoundError, msgspec.DecodeError):
                continue
        return out

    async def _on_endpoint(self, event: Any) -> None:
        kv = await self.bus.kv(subjects.ENDPOINTS_BUCKET)
        if isinstance(event, EndpointDeployed):
            info = EndpointInfo(endpoint_id=event.endpoint_id, run_id=event.run_id,
                                agent_id=event.agent_id, url=event.url, model=event.model,
                                deployer=event.deployer, metrics=dict(event.metrics),
                                created=event.ts)
            await kv.put(event.endpoint_id, encode(info))
        elif isinstance(event, EndpointRemoved):
            try:
                await kv.delete(event.endpoint_id)
            except KeyNotFoundError:
                pass

    def _start_embedded(self) -> str:
        home = self.config.home_path
        home.mkdir(parents=True, exist_ok=True)
        port_file = home / "nats.port"
        port = self.config.embedded_port
        if port == -1 and port_file.exists():
            port = int(port_file.read_text().strip() or -1)  # agents reconnect to the same port
        conf = Path(self.config.embedded_config).expanduser() if self.config.embedded_config \
            else None
        host = self.config.embedded_host

        def server(p: int) -> NatsServer:
            return NatsServer(home / "nats", host=host, port=p, config_file=conf)

        self.embedded = server(port)
        try:
            url = self.embedded.start()
        except StratosError:
            if port == -1:
                raise
            self.embedded = server(-1)
            url = self.embedded.start()
        port_file.write_text(str(self.embedded.port))
        (home / "nats.url").write_text(url)
        return url

    async def run(self) -> None:
        """Start everything, serve until SIGTERM/SIGINT, then stop in order."""
        stop_on_signals(self.stopping)
        self.plugins.configure(self.config)
        if self.config.nats_url:
            self.url = self.config.nats_url
        else:
            self.url = await asyncio.to_thread(self._start_embedded)
        try:
            await self._serve()
        finally:
            if self.embedded is not None:
                await asyncio.to_thread(self.embedded.stop)

    async def _serve(self) -> None:
        cfg = self.config
        self.bus = Bus(await connect(cfg, "stratosd", self.url, retry_for_s=30.0), cfg)
        await self.bus.ensure_streams()
        self.store = RunStore(self.bus)
        self.dispatch = Dispatcher(self.bus, ack_timeout_s=cfg.job_ack_timeout_s,
                                   on_endpoint=self._on_endpoint)
        self.fleet = Fleet(self.bus, missed_heartbeats=cfg.missed_heartbeats,
                           publish=self.publish, on_down=self._agent_down)
        self.costs = CostModel(self.plugins)
        await self.costs.book.load(self.bus)
        services = Services(bus=self.bus, fleet=self.fleet, dispatch=self.dispatch,
                            plugins=self.plugins, config=cfg, costs=self.costs)

        async def check(run: RunInfo, stage: str) -> BudgetVerdict | None:
            return await budget_check(run, stage, services)

        self.pipeline = Pipeline(self.store, STAGE_FUNCS, self.publish, retries=cfg.stage_retries,
                                 budget_check=check)
        self.pipeline.services = services  # type: ignore[attr-defined]
        self.dispatch.on_progress = self.pipeline.on_job_progress
        await self.fleet.start()
        await self.dispatch.start()
        self.control = ControlService(self)
        await self.control.start()
        self.metrics = None  # Prometheus exporter (stratosd.metrics), only with metrics_port
        if cfg.metrics_port is not None:
            from stratosd.metrics import DaemonMetrics

            self.metrics = await DaemonMetrics.serve(self)
        jobs = [
            PeriodicJob("liveness", self.fleet.check_liveness, cfg.liveness_check_s, 0.0),
            PeriodicJob("agents_kv_flush", self.fleet.flush_kv, cfg.kv_flush_s, 0.5),
            PeriodicJob("ingest_stats", self.fleet.report_ingest, cfg.ingest_report_s),
            *self.plugins.periodic_jobs(cfg),
        ]
        scheduler = build_scheduler(jobs)
        scheduler.start()
        await self.plugins.startup(self)
        resumed = await self.pipeline.resume_all()
        log.info("daemon_started", nats_url=self.url, resumed_runs=len(resumed),
                 plugins=len(self.plugins.pm.get_plugins()))
        self.ready.set()
        await self.stopping.wait()
        log.info("daemon_stopping")
        scheduler.shutdown(wait=False)
        await self.control.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        try:
            await asyncio.wait_for(self.pipeline.stop(), cfg.handler_grace_s)
        except TimeoutError:
            log.warning("shutdown_grace_expired")
        await self.plugins.shutdown(self)
        await self.fleet.flush_kv()
        await self.fleet.stop()
        await self.dispatch.stop()
        await self.bus.close()
        log.info("daemon_stopped")

    async def _agent_down(self, agent_id: str) -> None:
        self.dispatch.fail_agent(agent_id)

    def stop(self) -> None:
        """Ask run() to return."""
        self.stopping.set()
