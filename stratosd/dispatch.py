"""Commands to agents and job tracking: send a step, wait for its outcome, survive restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.js import api as js_api

from schemas import subjects
from schemas.base import decode_or_error
from schemas.commands import Accepted, Calibrate, CancelJob, GetJob, JobStatus, RunStep, Undeploy
from schemas.events import (
    EVENT_DECODER,
    EndpointDeployed,
    EndpointRemoved,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobInterrupted,
    JobProgress,
)
from stratosd.bus import Bus
from stratosd.errors import AgentUnavailable, BadMessage, BusUnavailable, NotFound, StratosError
from stratosd.errors import JobFailed as JobFailedError

log = structlog.stdlib.get_logger(__name__)
CONSUMER = "stratosd-jobs"


@dataclass
class Outcome:
    """How a job ended (or, for deploy jobs, that it is serving)."""

    state: str
    result: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    error: JobFailed | None = None
    endpoint: EndpointDeployed | None = None


class Dispatcher:
    """Sends RunStep commands and resolves waiters from job events (a durable consumer)."""

    def __init__(
        self,
        bus: Bus,
        *,
        ack_timeout_s: float = 5.0,
        on_progress: Callable[[JobProgress], Awaitable[None]] | None = None,
        on_endpoint: Callable[[Any], Awaitable[None]] | None = None,
    ) -> None:
        self.bus = bus
        self.ack_timeout_s = ack_timeout_s
        self.on_progress = on_progress
        self.on_endpoint = on_endpoint
        self.outcomes: dict[str, Outcome] = {}
        self.job_agent: dict[str, str] = {}
        self.outcome_agent: dict[str, str] = {}  # job_id → the agent whose subject carried it
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}
        self._sub: Any = None

    async def start(self) -> None:
        """Durable consumer of job events: events published while the daemon was down arrive."""
        self._sub = await self.bus.js.subscribe(
            subjects.ALL_JOB_EVENTS, durable=CONSUMER, stream=subjects.EVENTS_STREAM,
            cb=self._on_msg, manual_ack=True,
            config=js_api.ConsumerConfig(
                deliver_policy=js_api.DeliverPolicy.NEW, ack_wait=30.0, max_deliver=5
            ),
        )

    async def _on_msg(self, msg: Any) -> None:
        try:
            event = decode_or_error(EVENT_DECODER, msg.data)
        except BadMessage as exc:
            log.warning("message_rejected", subject=msg.subject, reason=exc.message)
            await msg.term()
            return
        sender = subjects.job_event_agent(msg.subject)
        claimed = getattr(event, "agent_id", sender) or sender
        job_id = str(getattr(event, "job_id", None) or getattr(event, "endpoint_id", ""))
        expected = self.job_agent.get(job_id)
        if claimed != sender or (expected is not None and expected != sender):
            log.warning("message_rejected", subject=msg.subject, job_id=job_id, agent_id=sender,
                        reason="job event from an agent the job was not sent to")
            await msg.term()
            return
        self.outcome_agent.setdefault(job_id, sender)
        try:
            await self.handle_event(event)
        except Exception:  # noqa: BLE001 - event boundary: redeliver later
            log.error("job_event_failed", subject=msg.subject, exc_info=True)
            await msg.nak(delay=1.0)
            return
        await msg.ack()

    async def handle_event(self, event: Any) -> None:
        """Turn a job event into an outcome / progress callback."""
        outcome: Outcome | None = None
        if isinstance(event, JobCompleted):
            outcome = Outcome("completed", dict(event.result), dict(event.artifacts))
        elif isinstance(event, JobFailed):
            outcome = Outcome("failed", error=event)
        elif isinstance(event, JobCancelled):
            outcome = Outcome("cancelled")
        elif isinstance(event, JobInterrupted):
            outcome = Outcome("interrupted")
        elif isinstance(event, EndpointDeployed):
            outcome = Outcome("serving", endpoint=event)
            if self.on_endpoint is not None:
                await self.on_endpoint(event)
        elif isinstance(event, EndpointRemoved):
            if self.on_endpoint is not None:
                await self.on_endpoint(event)
        elif isinstance(event, JobProgress) and self.on_progress is not None:
            await self.on_progress(event)
        if outcome is not None:
            job_id = event.job_id if not isinstance(event, EndpointDeployed) else event.endpoint_id
            self._resolve(job_id, outcome)

    def _resolve(self, job_id: str, outcome: Outcome) -> None:
        self.outcomes[job_id] = outcome
        fut = self._waiters.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    async def send(self, agent_id: str, step: RunStep) -> Accepted:
        """Ask agent_id to run step; idempotent by job_id on the agent side."""
        self.job_agent[step.job_id] = agent_id
        try:
            reply = await self.bus.request(subjects.agent_cmd(agent_id, "run"), step,
                                           timeout=self.ack_timeout_s)
        except (NotFound, BusUnavailable) as exc:
            raise AgentUnavailable(f"agent {agent_id} did not take job {step.job_id}: {exc}",
                                   hint="the run will re-select a server") from None
        assert isinstance(reply, Accepted)
        log.info("job_dispatched", job_id=step.job_id, agent_id=agent_id, step=step.step,
                 run_id=step.run_id)
        return reply

    async def status(self, agent_id: str, job_id: str) -> JobStatus | None:
        """The agent's view of a job, or None when the agent is gone or never had it."""
        try:
            reply = await self.bus.request(subjects.agent_cmd(agent_id, "job"),
                                           GetJob(job_id=job_id), timeout=self.ack_timeout_s)
        except StratosError:
            return None
        return reply if isinstance(reply, JobStatus) else None

    async def wait(self, job_id: str, timeout: float | None = None) -> Outcome:
        """Wait for the job's outcome (already known outcomes return at once)."""
        if job_id in self.outcomes:
            return self.outcomes[job_id]
        fut = self._waiters.get(job_id)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._waiters[job_id] = fut
        return await asyncio.wait_for(asyncio.shield(fut), timeout)

    def fail_agent(self, agent_id: str) -> None:
        """An agent went down: its waiting jobs fail with AgentUnavailable."""
        for job_id, fut in list(self._waiters.items()):
            if self.job_agent.get(job_id) == agent_id and not fut.done():
                fut.set_exception(AgentUnavailable(
                    f"agent {agent_id} went down while running job {job_id}",
                    hint="the run resumes on another server from its last checkpoint"))
                self._waiters.pop(job_id, None)

    async def cancel(self, agent_id: str, job_id: str) -> None:
        """Ask the agent to cancel a job (best effort)."""
        try:
            await self.bus.request(subjects.agent_cmd(agent_id, "cancel"),
                                   CancelJob(job_id=job_id), timeout=self.ack_timeout_s)
        except StratosError as exc:
            log.warning("job_cancel_failed", job_id=job_id, agent_id=agent_id, error=str(exc))

    async def undeploy(self, agent_id: str, endpoint_id: str) -> None:
        """Stop an endpoint on its agent."""
        await self.bus.request(subjects.agent_cmd(agent_id, "undeploy"),
                               Undeploy(endpoint_id=endpoint_id), timeout=self.ack_timeout_s)

    async def calibrate(self, agent_id: str) -> Accepted:
        """Ask an agent to re-run its capacity benchmarks (it replies at once; the figures
        arrive with its telemetry). A busy agent's refusal comes back as RemoteError."""
        reply = await self.bus.request(subjects.agent_cmd(agent_id, "calibrate"),
                                       Calibrate(source="stratosd"), timeout=self.ack_timeout_s)
        assert isinstance(reply, Accepted)
        return reply

    def raise_for(self, job_id: str, outcome: Outcome) -> None:
        """Raise the matching StratosError for a job that did not complete."""
        if outcome.state in ("completed", "serving"):
            return
        if outcome.state == "failed" and outcome.error is not None:
            err = outcome.error
            raise JobFailedError(f"job {job_id} failed: {err.message}", hint=err.hint)
        raise AgentUnavailable(f"job {job_id} ended as {outcome.state}",
                               hint="the run resumes on another server")

    async def stop(self) -> None:
        """Unsubscribe (the durable consumer stays, so nothing is lost across restarts)."""
        for fut in self._waiters.values():
            fut.cancel()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - shutdown path
                log.debug("unsubscribe_failed")
