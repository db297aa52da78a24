"""A tenant while its job runs, and what the orchestrator needs from the daemon (`Steps`).

`Tenant` holds what the daemon knows of one tenant (its agent, student, signature, bytes on
the bus, accuracies); it becomes a `TenantResult` in the job state and a `TenantStatus` in
every tenant event, and is rebuilt from the stored result when a restarted daemon resumes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from schemas.base import Message
from schemas.commands import RunStep
from schemas.specs import ServerOffer
from schemas.tenants import (
    StudentPick,
    TenantBudget,
    TenantBytes,
    TenantResult,
    TenantSignature,
    TenantSpec,
    TenantStatus,
)
from stratosd.dispatch import event_from_status
from stratosd.errors import AgentUnavailable, RemoteError

log = structlog.stdlib.get_logger(__name__)
TRACK_AGG, TRACK_ALONE = "agg", "alone"
STEP_TIMEOUT_S = 1800.0
QUEUE_POLL_S = 2.0  # a busy agent (its devices held by another training step) is asked again
BYTE_KEYS = ("to_agent", "from_agent", "signature", "updates", "mixes", "weights")
FINISHED = ("completed", "failed", "cancelled", "interrupted")


class Steps:
    """What the orchestrator needs from the daemon: run a step on an agent, move artifacts,
    price work on an agent, publish events."""

    def __init__(self, bus: Any, dispatch: Any, fleet: Any, costs: Any = None,
                 observe: Callable[[Any], Awaitable[None]] | None = None) -> None:
        self.bus, self.dispatch, self.fleet, self.costs = bus, dispatch, fleet, costs
        self.observe = observe  # the daemon's stratos_on_event observers (Plugins.on_event)

    def is_up(self, agent_id: str) -> bool:
        """True while the agent sends heartbeats."""
        return bool(self.fleet.is_up(agent_id))

    def offer(self, agent_id: str) -> ServerOffer:
        """The agent as a server offer (its price and capacity), for the cost model."""
        try:
            offer: ServerOffer = self.fleet.offer(agent_id)
        except KeyError:
            raise AgentUnavailable(f"agent {agent_id} is not known to the daemon",
                                   hint="start the agent that holds the tenant's data") from None
        return offer

    async def publish(self, subject: str, event: Message) -> None:
        """A tenant event into JetStream (not lost: a failure is logged, the job goes on),
        then to the `stratos_on_event` observers, like every run event the daemon publishes
        (a failing observer is logged and ignored by the plugin facade)."""
        try:
            await self.bus.publish_event(subject, event)
        except Exception:  # noqa: BLE001 - an event is not worth failing a job over
            log.warning("tenant_event_not_published", subject=subject, exc_info=True)
        if self.observe is not None:
            await self.observe(event)

    async def _send(self, agent_id: str, step: RunStep) -> str:
        """Send; while the agent's devices are held by another training step (`conflict`),
        wait in its queue; AgentUnavailable when the agent goes down meanwhile."""
        waited = 0.0
        while True:
            try:
                accepted = await self.dispatch.send(agent_id, step)
                return str(accepted.state)
            except RemoteError as exc:
                if exc.remote_code != "conflict":
                    raise
                if not self.is_up(agent_id):
                    raise AgentUnavailable(f"agent {agent_id} went down while {step.step} "
                                           "waited for its devices",
                                           hint="start the tenant's agent again") from None
                if waited % 30.0 == 0.0:
                    log.info("tenant_step_queued", agent_id=agent_id, step=step.step,
                             reason=exc.message, waited_s=waited)
                await asyncio.sleep(QUEUE_POLL_S)
                waited += QUEUE_POLL_S

    async def _outcome(self, agent_id: str, step: RunStep) -> tuple[Any, float]:
        """Send the step, wait for its outcome (or its endpoint); (outcome, seconds on the
        agent: the agent's own measure of the job when its event carried one, else from its
        acceptance to its outcome here; the queue wait is never counted)."""
        state = await self._send(agent_id, step)
        t0 = time.monotonic()
        if state in FINISHED and step.job_id not in self.dispatch.outcomes:
            status = await self.dispatch.status(agent_id, step.job_id)
            event = None if status is None else event_from_status(agent_id, status)
            if event is not None:
                await self.dispatch.handle_event(event)
        outcome = await self.dispatch.wait(step.job_id, timeout=STEP_TIMEOUT_S)
        self.dispatch.raise_for(step.job_id, outcome)
        measured = float(getattr(outcome, "duration_s", 0.0) or 0.0)
        return outcome, measured if measured > 0 else time.monotonic() - t0

    async def run(self, agent_id: str, step: RunStep) -> tuple[dict[str, Any], dict[str, str]]:
        """Send the step, wait for it; (result, artifacts) or the job's StratosError.

        Step job ids are deterministic, so after a daemon restart the same step is answered
        by the agent's record of it (finished: its outcome at once; running: waited on)."""
        result, artifacts, _secs = await self.run_timed(agent_id, step)
        return result, artifacts

    async def run_timed(self, agent_id: str, step: RunStep
                        ) -> tuple[dict[str, Any], dict[str, str], float]:
        """`run`, plus the seconds the job took on its agent (a step answered from the
        agent's record after a daemon restart counts 0: it was metered before)."""
        outcome, secs = await self._outcome(agent_id, step)
        return dict(outcome.result), dict(outcome.artifacts), secs

    async def deploy(self, agent_id: str, step: RunStep) -> Any:
        """Send a `deploy` step and wait until it serves: its `EndpointDeployed` (a step
        that ended without serving raises the job's error, or AgentUnavailable)."""
        outcome, _secs = await self._outcome(agent_id, step)
        if outcome.endpoint is None:
            raise AgentUnavailable(f"deploy job {step.job_id} on {agent_id} ended as "
                                   f"{outcome.state} without serving",
                                   hint="see the job's log on the serving agent")
        return outcome.endpoint

    async def undeploy(self, agent_id: str, endpoint_id: str) -> None:
        """Stop an endpoint on its agent (the normal `stratosctl undeploy` path)."""
        await self.dispatch.undeploy(agent_id, endpoint_id)

    def price(self, agent_id: str) -> float:
        """The agent's price now ($/h; 0 when the daemon does not know it)."""
        try:
            return float(self.fleet.offer(agent_id).price_usd_per_hour)
        except KeyError:
            return 0.0

    def has_gpu(self, agent_id: str) -> bool:
        """True when the agent reports a GPU."""
        try:
            return int(self.fleet.offer(agent_id).gpu_count) > 0
        except KeyError:
            return False


@dataclass
class Tenant:
    """A tenant while its job runs."""

    spec: TenantSpec
    agent: str = ""
    student: str = ""
    pick: StudentPick | None = None
    signature: TenantSignature | None = None
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KEYS, 0))
    state: str = "ok"
    error: str = ""
    dropped_at: str = ""
    rounds_done: int = 0
    weights: dict[str, float] = field(default_factory=dict)
    group: str = ""
    accuracy: dict[str, float] = field(default_factory=dict)
    n_test: int = 0
    adapter: str = ""
    budget: TenantBudget | None = None
    last_step: str = ""
    update: dict[str, Any] = field(default_factory=dict)  # this round's tenant_train result
    spent_usd: float = 0.0  # measured: job seconds on its agent x the agent's price
    spent_s: float = 0.0
    round_usd: float = 0.0  # what the last round measured (the next one's floor)
    stopped_at: str = ""  # "round-N": over budget, it did not start round N
    stop_reason: str = ""
    endpoint_url: str = ""
    served_name: str = ""

    @property
    def training(self) -> bool:
        """Still in the job and still doing rounds."""
        return self.alive and not self.stopped_at

    def bill(self, seconds: float, price_usd_per_hour: float) -> float:
        """Meter one job on its agent (like the core cost model meters a stage); its $."""
        usd = max(seconds, 0.0) / 3600.0 * price_usd_per_hour
        self.spent_s += max(seconds, 0.0)
        self.spent_usd += usd
        return usd

    @property
    def alive(self) -> bool:
        """Still in the job."""
        return self.state == "ok"

    @property
    def raw_bytes(self) -> int:
        """The size of its data file (from its signature)."""
        return self.signature.raw_bytes if self.signature else 0

    def result(self) -> TenantResult:
        """Its section of the report."""
        return TenantResult(
            tenant=self.spec.name, agent=self.agent, student=self.student, adapter=self.adapter,
            pick=self.pick, accuracy_alone=self.accuracy.get(TRACK_ALONE),
            accuracy_aggregated=self.accuracy.get(TRACK_AGG), n_test=self.n_test,
            weights={k: round(v, 4) for k, v in self.weights.items()}, group=self.group,
            rounds_done=self.rounds_done, bytes=TenantBytes(raw_data=self.raw_bytes,
                                                            **self.bytes),
            state=self.state, error=self.error, dropped_at=self.dropped_at,  # type: ignore[arg-type]
            budget=self.budget, spent_usd=round(self.spent_usd, 6),
            spent_s=round(self.spent_s, 3), stopped_at=self.stopped_at,
            stop_reason=self.stop_reason, endpoint_url=self.endpoint_url,
            served_name=self.served_name)

    def status(self) -> TenantStatus:
        """Its row in every tenant event."""
        return TenantStatus(
            state=self.state, agent=self.agent, student=self.student,  # type: ignore[arg-type]
            rounds_done=self.rounds_done, accuracy_alone=self.accuracy.get(TRACK_ALONE),
            accuracy_aggregated=self.accuracy.get(TRACK_AGG),
            bytes_sent=self.bytes["to_agent"] + self.bytes["from_agent"],
            raw_bytes=self.raw_bytes, spent_usd=round(self.spent_usd, 6),
            stopped_at=self.stopped_at)

    @classmethod
    def restore(cls, spec: TenantSpec, r: TenantResult,
                signature: TenantSignature | None) -> Tenant:
        """The tenant as a stored job state left it (a restarted daemon resumes from it)."""
        acc = {k: v for k, v in ((TRACK_ALONE, r.accuracy_alone),
                                 (TRACK_AGG, r.accuracy_aggregated)) if v is not None}
        b = r.bytes
        return cls(spec=spec, agent=r.agent, student=r.student, pick=r.pick,
                   signature=signature, bytes={k: int(getattr(b, k)) for k in BYTE_KEYS},
                   state=r.state, error=r.error, dropped_at=r.dropped_at,
                   rounds_done=r.rounds_done, weights=dict(r.weights), group=r.group,
                   accuracy=acc, n_test=r.n_test, adapter=r.adapter, budget=r.budget,
                   spent_usd=r.spent_usd, spent_s=r.spent_s, stopped_at=r.stopped_at,
                   stop_reason=r.stop_reason, endpoint_url=r.endpoint_url,
                   served_name=r.served_name)
