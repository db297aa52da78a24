"""Commands to agents and job tracking: send a step, wait for its outcome, survive restarts.

A job's outcome arrives as a JetStream event (agents keep terminal events in an outbox until
JetStream acks them). Should one be lost anyway, `wait` does not hang: a job silent for
`silence_s` is reconciled with its agent (GetJob) and the answer is applied as if it were the
event; a job its agent does not know, or whose agent has not answered for `lost_after_s`, is
lost (AgentUnavailable: the stage retries). Finished jobs are forgotten `finished_ttl_s` after
they end, and beyond `max_finished`, so the maps stay bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from nats.js import api as js_api

from schemas import subjects
from schemas.base import Message, decode_or_error
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
from stratosd.artifacts.private import AgentBuckets
from stratosd.artifacts.private import enabled as private_enabled
from stratosd.bus import Bus
from stratosd.errors import (
    AgentUnavailable,
    BadMessage,
    BusUnavailable,
    JobRejected,
    NotFound,
    OutOfMemory,
    RemoteError,
    StratosError,
    failure_class,
)
from stratosd.errors import JobFailed as JobFailedError

log = structlog.stdlib.get_logger(__name__)
CONSUMER = "stratosd-jobs"
# events that settle a job (a deploy job is settled once it serves)
OUTCOME_EVENTS = (JobCompleted, JobFailed, JobCancelled, JobInterrupted, EndpointDeployed)


@dataclass
class Outcome:
    """How a job ended (or, for deploy jobs, that it is serving)."""

    state: str
    result: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    error: JobFailed | None = None
    endpoint: EndpointDeployed | None = None
    duration_s: float = 0.0  # the agent's own measure of a completed job (0: not known)


class Dispatcher:
    """Sends RunStep commands and resolves waiters from job events (a durable consumer)."""

    def __init__(
        self,
        bus: Bus,
        *,
        ack_timeout_s: float = 5.0,
        on_progress: Callable[[JobProgress], Awaitable[None]] | None = None,
        on_endpoint: Callable[[Any], Awaitable[None]] | None = None,
        silence_s: float = 30.0,
        lost_after_s: float = 120.0,
        max_finished: int = 4096,
        finished_ttl_s: float = 3600.0,
    ) -> None:
        self.bus = bus
        self.ack_timeout_s = ack_timeout_s
        self.on_progress = on_progress
        self.on_endpoint = on_endpoint
        self.silence_s = silence_s  # a job this long without an event is asked about
        self.lost_after_s = lost_after_s  # ... and this long without any answer is lost
        self.max_finished = max_finished
        self.finished_ttl_s = finished_ttl_s
        self.outcomes: dict[str, Outcome] = {}
        self.job_agent: dict[str, str] = {}
        self.outcome_agent: dict[str, str] = {}  # job_id → the agent whose subject carried it
        self.heard: dict[str, float] = {}  # job_id → monotonic time of its last event/answer
        # unwaited jobs of an agent that went down: asked about at once, lost if unanswered
        self._suspect: dict[str, AgentUnavailable] = {}
        self._finished: dict[str, float] = {}  # job_id → when it ended, oldest first
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}
        self._sub: Any = None
        # a secured bus: each agent has its own artifact bucket (stratosd.artifacts.private)
        self.buckets = AgentBuckets(bus, _copy_dir(bus)) if private_enabled(bus.config) else None

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
        if isinstance(event, OUTCOME_EVENTS):
            self.outcome_agent.setdefault(job_id, sender)
        if expected is not None:
            self.heard[job_id] = time.monotonic()
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
            outcome = Outcome("completed", dict(event.result), dict(event.artifacts),
                              duration_s=float(event.duration_s))
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
        self._suspect.pop(job_id, None)
        fut = self._waiters.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)
        self._retire(job_id)

    def _retire(self, job_id: str) -> None:
        """The job has ended: forget it once it is old or too many others ended after it."""
        now = time.monotonic()
        self._finished.pop(job_id, None)
        self._finished[job_id] = now
        while self._finished:
            oldest, ended = next(iter(self._finished.items()))
            if len(self._finished) <= self.max_finished and now - ended < self.finished_ttl_s:
                break
            del self._finished[oldest]
            if oldest in self._waiters:  # waited on again (a resend): still in use
                continue
            for table in (self.outcomes, self.job_agent, self.outcome_agent, self.heard,
                          self._suspect):
                table.pop(oldest, None)

    async def send(self, agent_id: str, step: RunStep) -> Accepted:
        """Ask agent_id to run step; idempotent by job_id on the agent side."""
        self.job_agent[step.job_id] = agent_id
        self.heard[step.job_id] = time.monotonic()
        self._suspect.pop(step.job_id, None)
        self._finished.pop(step.job_id, None)  # (re)sent: under way again
        if self.buckets is not None:  # the inputs go where only that agent reads them
            await self.buckets.place(agent_id, step)
        try:
            reply = await self.bus.request(subjects.agent_cmd(agent_id, "run"), step,
                                           timeout=self.ack_timeout_s)
        except (NotFound, BusUnavailable) as exc:
            raise AgentUnavailable(f"agent {agent_id} did not take job {step.job_id}: {exc}",
                                   hint="the run will re-select a server") from None
        accepted = _accepted(reply, subjects.agent_cmd(agent_id, "run"))
        log.info("job_dispatched", job_id=step.job_id, agent_id=agent_id, step=step.step,
                 run_id=step.run_id)
        return accepted

    async def status(self, agent_id: str, job_id: str) -> JobStatus | None:
        """The agent's view of a job, or None when the agent is gone or never had it."""
        try:
            reply = await self.bus.request(subjects.agent_cmd(agent_id, "job"),
                                           GetJob(job_id=job_id), timeout=self.ack_timeout_s)
        except StratosError:
            return None
        return reply if isinstance(reply, JobStatus) else None

    @property
    def check_s(self) -> float:
        """How often a waiter looks at its job's silence."""
        return max(0.05, min(5.0, self.silence_s / 2))

    async def wait(self, job_id: str, timeout: float | None = None) -> Outcome:
        """Wait for the job's outcome (already known outcomes return at once).

        Never forever: a silent job is reconciled with its agent (see the module docstring);
        TimeoutError only when the caller's timeout passes first. With private artifacts, what
        the job wrote into its agent's bucket is copied into the shared one first."""
        agent_id = self.job_agent.get(job_id)
        outcome = await self._wait(job_id, timeout)
        if self.buckets is not None and agent_id is not None:
            try:
                await self.buckets.collect(agent_id, job_id, outcome.artifacts.values())
            except Exception:  # noqa: BLE001 - the outputs stay in the agent's bucket
                log.warning("artifacts_not_collected", job_id=job_id, agent_id=agent_id,
                            exc_info=True)
        return outcome

    async def _wait(self, job_id: str, timeout: float | None) -> Outcome:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self.heard.setdefault(job_id, time.monotonic())
        while True:
            known = self.outcomes.get(job_id)
            if known is not None:
                return known
            if job_id in self._suspect:  # its agent went down before this wait began
                await self._reconcile_or_drop(job_id)
                continue
            fut = self._waiters.get(job_id)
            if fut is None or fut.done():
                fut = loop.create_future()
                self._waiters[job_id] = fut
            step = self.check_s
            if deadline is not None:
                step = min(step, deadline - loop.time())
                if step <= 0:
                    if self._waiters.get(job_id) is fut:
                        del self._waiters[job_id]
                    raise TimeoutError(f"job {job_id}: no outcome within {timeout}s")
            try:
                return await asyncio.wait_for(asyncio.shield(fut), step)
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                if self._waiters.get(job_id) is fut and not fut.done():
                    del self._waiters[job_id]
                raise
            await self._reconcile_or_drop(job_id)

    async def _reconcile_or_drop(self, job_id: str) -> None:
        try:
            await self.reconcile(job_id)
        except AgentUnavailable:
            self._waiters.pop(job_id, None)
            self._retire(job_id)
            raise

    async def reconcile(self, job_id: str) -> None:
        """If the job has been silent past silence_s (or its agent went down), ask its agent
        and apply the answer as the job's event; AgentUnavailable when the job is lost."""
        now = time.monotonic()
        silent = now - self.heard.get(job_id, now)
        suspect = self._suspect.pop(job_id, None)
        if silent < self.silence_s and suspect is None:
            return
        agent_id = self.job_agent.get(job_id)
        status: JobStatus | None = None
        if agent_id is not None:
            try:
                reply = await self.bus.request(subjects.agent_cmd(agent_id, "job"),
                                               GetJob(job_id=job_id, source="stratosd"),
                                               timeout=self.ack_timeout_s)
                status = reply if isinstance(reply, JobStatus) else None
            except RemoteError as exc:
                if exc.remote_code == "not_found":
                    log.warning("job_lost", job_id=job_id, agent_id=agent_id,
                                silent_s=round(silent, 1), reason="the agent does not know it")
                    raise AgentUnavailable(
                        f"agent {agent_id} does not know job {job_id} (silent for "
                        f"{silent:.0f}s): the job was lost",
                        hint="the stage runs it again") from None
                log.warning("job_status_refused", job_id=job_id, agent_id=agent_id,
                            code=exc.remote_code, error=exc.message)
            except StratosError as exc:  # nobody serves the agent's subject, or no reply
                log.info("job_status_unanswered", job_id=job_id, agent_id=agent_id,
                         silent_s=round(silent, 1), error=exc.message)
        if status is None:
            if suspect is not None:
                raise suspect
            if silent >= self.lost_after_s:
                log.warning("job_lost", job_id=job_id, agent_id=agent_id,
                            silent_s=round(silent, 1), reason="no event and no answer")
                raise AgentUnavailable(
                    f"no word of job {job_id} from agent {agent_id or '(unknown)'} for "
                    f"{silent:.0f}s", hint="the stage runs it again on a live server")
            return
        self.heard[job_id] = time.monotonic()
        event = event_from_status(agent_id or "", status)
        if event is None:
            log.debug("job_still_running", job_id=job_id, agent_id=agent_id, state=status.state)
            return
        log.warning("job_reconciled", job_id=job_id, agent_id=agent_id, state=status.state,
                    silent_s=round(silent, 1))
        if agent_id is not None:
            self.outcome_agent.setdefault(job_id, agent_id)
        await self.handle_event(event)

    def fail_agent(self, agent_id: str) -> None:
        """An agent went down: its waiting jobs fail with AgentUnavailable; a wait that starts
        later asks the agent at once and fails the same way unless the agent answers."""
        for job_id, owner in list(self.job_agent.items()):
            if owner != agent_id or job_id in self.outcomes or (
                    job_id in self._finished and job_id not in self._waiters):
                continue  # settled, or given up on already
            exc = AgentUnavailable(
                f"agent {agent_id} went down while running job {job_id}",
                hint="the run resumes on another server from its last checkpoint")
            fut = self._waiters.pop(job_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            else:
                self._suspect[job_id] = exc
            self._retire(job_id)  # forgotten in time unless waited on meanwhile

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
        subject = subjects.agent_cmd(agent_id, "calibrate")
        reply = await self.bus.request(subject, Calibrate(source="stratosd"),
                                       timeout=self.ack_timeout_s)
        return _accepted(reply, subject)

    def raise_for(self, job_id: str, outcome: Outcome) -> None:
        """Raise the matching StratosError for a job that did not complete."""
        if outcome.state in ("completed", "serving"):
            return
        if outcome.state == "failed" and outcome.error is not None:
            raise job_error(job_id, outcome.error)
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


def job_error(job_id: str, err: JobFailed) -> StratosError:
    """The error a failed job raises, by its failure class: JobRejected (permanent: the run
    fails now), OutOfMemory (the stage degrades, then retries) or JobFailed (retried)."""
    code = err.code or "job_failed"
    message = f"{err.step or 'job'} job {job_id} failed [{code}]: {err.message}"
    kind = failure_class(code)
    if kind == "permanent":
        return JobRejected(code, message, err.hint)
    if kind == "out_of_memory":
        return OutOfMemory(message, err.hint, detail=dict(err.detail))
    return JobFailedError(message, hint=err.hint, child_code=code)


def event_from_status(agent_id: str, st: JobStatus) -> Message | None:
    """The event an agent's answer stands for; None while the job is still under way."""
    job_id, source = st.job_id, "stratosd"
    if st.state == "completed":
        return JobCompleted(job_id=job_id, agent_id=agent_id, step=st.step,
                            result=dict(st.result), artifacts=dict(st.artifacts), source=source)
    if st.state == "failed":
        return JobFailed(job_id=job_id, agent_id=agent_id, step=st.step,
                         code=st.code or "job_failed", message=st.error or "failed on its agent",
                         hint=st.hint, detail=dict(st.detail), source=source)
    if st.state == "cancelled":
        return JobCancelled(job_id=job_id, agent_id=agent_id, source=source)
    if st.state == "interrupted":
        return JobInterrupted(job_id=job_id, agent_id=agent_id, source=source)
    return st.endpoint  # a deploy job that serves; None for one still starting


def _accepted(reply: Any, subject: str) -> Accepted:
    if not isinstance(reply, Accepted):
        raise BadMessage("type", f"{subject} answered {type(reply).__name__}, not accepted")
    return reply


def _copy_dir(bus: Bus) -> Path | None:
    """Where the daemon stages artifact copies between buckets (under its home)."""
    return bus.config.home_path / "tmp" if bus.config is not None else None
