"""Prometheus metrics of the daemon, in the text exposition format on `metrics_port`.

Two sources, so that nothing is added to the telemetry hot path:

- read at scrape time from the daemon's own state: fleet size and state, each agent's last
  telemetry, the telemetry ingest counters and delay histogram, runs in progress;
- counted from the events on the bus (one core subscription to `stratos.evt.>`): runs and
  their outcomes, stages and their durations, jobs, measured spend, and each event's lag from
  its publisher's clock to the daemon's.

Scrapes are served from a thread. They read a snapshot of the fleet's dict taken in one C-level
copy, so they never see it change size mid-iteration, and they write the per-agent series
directly (150,000 samples at 10,000 agents). Metric names and example queries:
docs/operations.md.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from schemas import subjects
from schemas.events import (
    EVENT_DECODER,
    AgentDown,
    AgentRegistered,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobInterrupted,
    JobStarted,
    RunBudgetExhausted,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunResumed,
    RunStageCompleted,
    RunStageStarted,
    RunSubmitted,
)
from stratosd import __version__
from stratosd.dispatch import CONSUMER
from stratosd.errors import ConfigError, StratosError
from stratosd.fleet import DELAY_BOUNDS_MS

if TYPE_CHECKING:
    from stratosd.daemon import Daemon

log = structlog.stdlib.get_logger(__name__)

REFRESH_S = 5.0  # how often the job-event consumer's backlog is read
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# le bounds of exported latency histograms, seconds
LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 30.0, 60.0)
# stages and jobs take seconds to hours
DURATION_BUCKETS_S = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
                      7200.0, 14400.0, 28800.0, 86400.0)
# the telemetry delay histogram's buckets: a subset of the fleet's own (ms → s)
_DELAY_LE_MS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                10000.0)
_DELAY_LE_INDEX = tuple(DELAY_BOUNDS_MS.index(b) for b in _DELAY_LE_MS)
_RUN_ENDS: dict[type, str] = {RunCompleted: "completed", RunFailed: "failed",
                               RunCancelled: "cancelled", RunBudgetExhausted: "stopped"}
_JOB_ENDS: dict[type, str] = {JobCompleted: "completed", JobFailed: "failed",
                               JobCancelled: "cancelled", JobInterrupted: "interrupted"}


class StateCollector:
    """Gauges read from the daemon at scrape time: fleet, agents, ingest, runs in progress."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        """One scrape's worth of metric families."""
        fleet = self.daemon.fleet
        agents = list(fleet.agents.items())  # atomic under the GIL: the loop may mutate it
        yield from self._fleet(agents)
        stats = fleet.stats
        yield CounterMetricFamily("stratos_telemetry_messages", "Telemetry messages applied "
                                  "to the registry.", value=stats.messages)
        yield CounterMetricFamily("stratos_telemetry_rejected", "Telemetry messages dropped "
                                  "(undecodable, forged subject, incompatible schema).",
                                  value=stats.rejected)
        counts = list(stats.counts)
        cumulative = [sum(counts[:i + 1]) for i in _DELAY_LE_INDEX]
        yield HistogramMetricFamily(
            "stratos_telemetry_delay_seconds", "From an agent's publish (its clock) to the "
            "daemon's registry update.",
            buckets=[*((_le(ms / 1000), c) for ms, c in zip(_DELAY_LE_MS, cumulative,
                                                             strict=True)),
                     ("+Inf", sum(counts))],
            sum_value=stats.delay_ms_sum / 1000)
        yield GaugeMetricFamily("stratos_runs_active", "Runs this daemon is driving now.",
                                value=len(self.daemon.pipeline.tasks))

    def _fleet(self, agents: list[tuple[str, Any]]) -> Iterator[Metric]:
        by_status = GaugeMetricFamily("stratos_agents", "Known agents by status.",
                                      labels=["status"])
        up = sum(st.status == "up" for _, st in agents)
        by_status.add_metric(["up"], up)
        by_status.add_metric(["down"], len(agents) - up)
        yield by_status
        yield GaugeMetricFamily("stratos_agents_busy", "Live agents whose devices a training "
                                "job holds.", value=sum(st.status == "up" and
                                                        bool(st.telemetry.training_jobs)
                                                        for _, st in agents))
        yield GaugeMetricFamily("stratos_agents_gpus", "GPUs on live agents.",
                                value=sum(len(st.telemetry.gpus) for _, st in agents
                                          if st.status == "up"))


def _le(value: float) -> str:
    return f"{value:g}"


def _esc(value: str) -> str:
    """A label value as the text format wants it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# per-agent gauges: name, help, value from (AgentState, AgentTelemetry); None skips the agent
_AGENT_GAUGES: tuple[tuple[str, str, Callable[[Any, Any], float | None]], ...] = (
    ("stratos_agent_up", "1 while the agent sends heartbeats, 0 once it missed them.",
     lambda st, t: 1 if st.status == "up" else 0),
    ("stratos_agent_last_seen_timestamp_seconds", "When its last heartbeat arrived.",
     lambda st, t: st.last_seen_at.timestamp()),
    ("stratos_agent_cpu_percent", "Host CPU use.", lambda st, t: t.cpu_pct),
    ("stratos_agent_memory_used_bytes", "Host memory in use.",
     lambda st, t: t.ram_used_mib * 2**20),
    ("stratos_agent_memory_total_bytes", "Host memory.", lambda st, t: t.ram_total_mib * 2**20),
    ("stratos_agent_price_usd_per_hour", "What an hour of this server costs.",
     lambda st, t: t.price_usd_per_hour),
    ("stratos_agent_running_jobs", "Jobs running on the agent.",
     lambda st, t: len(t.running_jobs)),
    ("stratos_agent_latency_seconds", "Latency users see (its probe targets, worst one); "
     "absent when nothing measured it.",
     lambda st, t: None if t.latency_ms is None else t.latency_ms / 1000),
)
_GPU_GAUGES: tuple[tuple[str, str, Callable[[Any], float]], ...] = (
    ("stratos_agent_gpu_utilization_percent", "GPU utilization.", lambda g: g.util_pct),
    ("stratos_agent_gpu_memory_used_bytes", "GPU memory in use.",
     lambda g: g.mem_used_mib * 2**20),
    ("stratos_agent_gpu_memory_total_bytes", "GPU memory.", lambda g: g.mem_total_mib * 2**20),
)


def render_agents(agents: list[tuple[str, Any]]) -> str:
    """Per-agent series from each agent's last telemetry, labelled by agent_id (a validated
    subject token), in the text format. Written directly: at 10,000 agents the client
    library's generic path takes seconds a scrape."""
    out = ["# HELP stratos_agent_info Constant 1; what the agent says it is.\n"
           "# TYPE stratos_agent_info gauge\n"]
    for a, st in agents:
        t = st.telemetry
        out.append(f'stratos_agent_info{{agent_id="{a}",hostname="{_esc(t.hostname)}",'
                   f'region="{_esc(t.region)}",agent_version="{_esc(t.agent_version)}",'
                   f'gpu_model="{_esc(t.gpus[0].model if t.gpus else "cpu")}"}} 1\n')
    for name, doc, get in _AGENT_GAUGES:
        out.append(f"# HELP {name} {doc}\n# TYPE {name} gauge\n")
        for a, st in agents:
            v = get(st, st.telemetry)
            if v is not None:
                out.append(f'{name}{{agent_id="{a}"}} {float(v)!r}\n')
    for name, doc, gpu_get in _GPU_GAUGES:
        out.append(f"# HELP {name} {doc}\n# TYPE {name} gauge\n")
        out.extend(f'{name}{{agent_id="{a}",gpu="{g.index}"}} {float(gpu_get(g))!r}\n'
                   for a, st in agents for g in st.telemetry.gpus)
    return "".join(out)


class _Handler(BaseHTTPRequestHandler):
    """GET /metrics (or /): the registry's families, then the per-agent ones."""

    metrics: DaemonMetrics  # set on the subclass each DaemonMetrics makes

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        """Serve one scrape."""
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "try /metrics")
            return
        try:
            body = self.metrics.exposition()
        except Exception:  # noqa: BLE001 - a failed scrape must not take the thread down
            log.error("metrics_scrape_failed", exc_info=True)
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Scrapes are not worth a log line each."""


class DaemonMetrics:
    """The daemon's Prometheus endpoint and the event counters behind it."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes
        r.register(StateCollector(daemon))
        Gauge("stratos_build_info", "Constant 1; the daemon's version.", ["version"],
              registry=r).labels(__version__).set(1)
        self.runs_submitted = Counter("stratos_runs_submitted", "Runs accepted.", registry=r)
        self.runs_resumed = Counter("stratos_runs_resumed", "Runs resumed after a stop.",
                                    registry=r)
        self.runs_finished = Counter("stratos_runs_finished", "Runs that ended, by outcome "
                                     "(completed, failed, cancelled, stopped: at its budget).",
                                     ["outcome"], registry=r)
        self.run_failures = Counter("stratos_run_failures", "Failed runs by the stage that "
                                    "failed and the error code.", ["stage", "code"], registry=r)
        self.run_duration = Histogram("stratos_run_duration_seconds", "From submission to "
                                      "the run's end, by outcome.", ["outcome"],
                                      buckets=DURATION_BUCKETS_S, registry=r)
        self.stages_started = Counter("stratos_stages_started", "Stage attempts begun.",
                                      ["stage"], registry=r)
        self.stage_retries = Counter("stratos_stage_retries", "Stage attempts after the first "
                                     "(retries and resumes).", ["stage"], registry=r)
        self.stage_duration = Histogram("stratos_stage_duration_seconds", "Completed stages' "
                                        "durations.", ["stage"], buckets=DURATION_BUCKETS_S,
                                        registry=r)
        self.spent = Counter("stratos_spent_usd", "Measured spend of completed stages (server "
                             "time and API $), USD.", ["stage"], registry=r)
        self.jobs_started = Counter("stratos_jobs_started", "Agent jobs started, by step.",
                                    ["step"], registry=r)
        self.jobs_finished = Counter("stratos_jobs_finished", "Agent jobs that ended, by "
                                     "outcome.", ["outcome"], registry=r)
        self.job_duration = Histogram("stratos_job_duration_seconds", "Completed agent jobs' "
                                      "durations, by step.", ["step"],
                                      buckets=DURATION_BUCKETS_S, registry=r)
        self.agent_registrations = Counter("stratos_agent_registrations", "Agents heard from "
                                           "for the first time or after being down.",
                                           registry=r)
        self.agent_downs = Counter("stratos_agent_downs", "Agents marked down (missed "
                                   "heartbeats).", registry=r)
        self.event_lag = Histogram("stratos_event_lag_seconds", "From an event's timestamp "
                                   "(its publisher's clock) to the daemon seeing it, by kind "
                                   "(run, job, agent, endpoint).", ["kind"],
                                   buckets=LAG_BUCKETS_S, registry=r)
        self.consumer_pending = Gauge("stratos_job_events_pending", "Job events in JetStream "
                                      "not yet delivered to the daemon's consumer.", registry=r)
        self.consumer_ack_pending = Gauge("stratos_job_events_ack_pending", "Job events "
                                          "delivered to the daemon and not yet acknowledged.",
                                          registry=r)
        self.port = 0
        self._server: Any = None
        self._subs: list[Any] = []
        self._task: asyncio.Task[None] | None = None

    def exposition(self) -> bytes:
        """One scrape's body (called from the HTTP thread)."""
        agents = list(self.daemon.fleet.agents.items())  # atomic under the GIL
        text = generate_latest(self.registry)
        if self.daemon.config.metrics_agents:
            text += render_agents(agents).encode()
        return text

    @classmethod
    async def serve(cls, daemon: Daemon) -> DaemonMetrics:
        """Start serving on the daemon's metrics_host:metrics_port (0: any free port)."""
        metrics = cls(daemon)
        await metrics.start()
        return metrics

    async def start(self) -> None:
        """Bind the HTTP endpoint, subscribe to events, start the backlog refresher."""
        cfg = self.daemon.config
        port = cfg.metrics_port or 0
        handler = type("Handler", (_Handler,), {"metrics": self})
        try:
            self._server = ThreadingHTTPServer((cfg.metrics_host, port), handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {cfg.metrics_host}:{port}: {exc}",
                hint="pick a free --metrics-port (0: any free port), or leave it unset",
                field="metrics_port") from None
        self._server.daemon_threads = True
        self.port = int(self._server.server_port)
        threading.Thread(target=self._server.serve_forever, name="metrics-http",
                         daemon=True).start()
        for subject in subjects.EVENTS_SUBJECTS:
            self._subs.append(await self.daemon.bus.nc.subscribe(subject, cb=self._on_msg))
        self._task = asyncio.create_task(self._refresh(), name="metrics-refresh")
        log.info("metrics_serving", host=cfg.metrics_host, port=self.port)

    async def stop(self) -> None:
        """Stop the refresher, the subscription and the HTTP server."""
        if self._task is not None:
            self._task.cancel()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - shutdown path
                log.debug("unsubscribe_failed")
        if self._server is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()

    async def _on_msg(self, msg: Any) -> None:
        try:
            event = EVENT_DECODER.decode(msg.data)
        except msgspec.DecodeError:
            return  # the consumers that act on events log and reject it
        try:
            await self.observe(event)
        except Exception:  # noqa: BLE001 - metrics must never cost an event
            log.warning("metrics_event_failed", subject=msg.subject, exc_info=True)

    async def observe(self, event: Any) -> None:
        """Count one event."""
        kind = type(event).__struct_config__.tag.partition("_")[0]
        self.event_lag.labels(kind).observe(max(0.0, time.time() - event.ts.timestamp()))
        if isinstance(event, RunSubmitted):
            self.runs_submitted.inc()
        elif isinstance(event, RunStageStarted):
            self.stages_started.labels(event.stage).inc()
            if event.attempt > 1:
                self.stage_retries.labels(event.stage).inc()
        elif isinstance(event, RunStageCompleted):
            self.stage_duration.labels(event.stage).observe(event.duration_s)
            cost = event.result.get("cost")
            usd = cost.get("measured_usd") if isinstance(cost, dict) else None
            if isinstance(usd, int | float) and usd > 0:
                self.spent.labels(event.stage).inc(usd)
        elif isinstance(event, RunResumed):
            self.runs_resumed.inc()
        elif type(event) in _RUN_ENDS:
            await self._run_end(event, _RUN_ENDS[type(event)])
        elif isinstance(event, JobStarted):
            self.jobs_started.labels(event.step).inc()
        elif type(event) in _JOB_ENDS:
            self.jobs_finished.labels(_JOB_ENDS[type(event)]).inc()
            if isinstance(event, JobCompleted):
                self.job_duration.labels(event.step).observe(event.duration_s)
        elif isinstance(event, AgentRegistered):
            self.agent_registrations.inc()
        elif isinstance(event, AgentDown):
            self.agent_downs.inc()

    async def _run_end(self, event: Any, outcome: str) -> None:
        self.runs_finished.labels(outcome).inc()
        if isinstance(event, RunFailed):
            self.run_failures.labels(event.stage, event.code).inc()
        try:
            run = await self.daemon.store.get(event.run_id)
        except StratosError:
            return  # a run this daemon never stored: counted, not timed
        self.run_duration.labels(outcome).observe(
            max(0.0, (event.ts - run.created).total_seconds()))

    async def _refresh(self) -> None:
        """Read the job-event consumer's backlog every REFRESH_S."""
        while True:
            try:
                info = await self.daemon.bus.js.consumer_info(subjects.EVENTS_STREAM, CONSUMER)
                self.consumer_pending.set(info.num_pending or 0)
                self.consumer_ack_pending.set(info.num_ack_pending or 0)
            except Exception:  # noqa: BLE001 - a periodic job logs its own failures
                log.debug("metrics_refresh_failed", exc_info=True)
            await asyncio.sleep(REFRESH_S)
