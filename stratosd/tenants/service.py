"""The daemon's `tenants` command (stratos.cmd.daemon.tenants) and the tenants KV bucket."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import structlog
from nats.js.errors import KeyNotFoundError, NoKeysError

from schemas import subjects
from schemas.base import Message, encode, new_id, utc_now
from schemas.tenants import (
    TENANT_STATE_DECODER,
    CancelTenantJob,
    GetTenantJob,
    ListTenantJobs,
    SubmitTenantJob,
    TenantJob,
    TenantJobCancelled,
    TenantJobList,
    TenantJobReply,
    TenantJobState,
    TenantJobSubmitted,
)
from stratosd.errors import ConfigError, NotFound, StratosError, Unsupported
from stratosd.plugins import lookup

log = structlog.stdlib.get_logger(__name__)


def validate_tenant_job(spec: TenantJob, plugins: Any) -> None:
    """What the daemon can check before any agent works: names, plugins, candidates."""
    names = [t.name for t in spec.tenants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"tenant name {dup[0]!r} appears twice",
                          hint="give every [[tenants]] entry its own name", field="tenants")
    lookup(plugins.aggregators, spec.aggregation.rule, "aggregation.rule")
    lookup(plugins.trainers, spec.trainer, "trainer")
    unknown = sorted(set(spec.students.measure) - set(spec.students.candidates))
    if unknown:
        raise ConfigError(f"students.measure names {unknown[0]!r}, not a candidate",
                          hint="measure a subset of students.candidates",
                          field="students.measure")
    if spec.deploy.enabled and spec.deploy.deployer != "auto":
        lookup(plugins.deployers, spec.deploy.deployer, "deploy.deployer")
    if spec.aggregation.keep_ranks > spec.aggregation.lora_r:
        raise ConfigError(f"aggregation.keep_ranks {spec.aggregation.keep_ranks} > lora_r "
                          f"{spec.aggregation.lora_r}", hint="keep at most lora_r ranks",
                          field="aggregation.keep_ranks")


class TenantService:
    """Submits tenants jobs, keeps their state in KV, answers status queries."""

    def __init__(self, daemon: Any) -> None:
        self.d = daemon
        self.kv: Any = None
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.runs: dict[str, Any] = {}  # job_id → its TenantRun while it runs

    async def start(self) -> None:
        """Create (or bind) the KV bucket; take up again the jobs a stopped daemon left
        running (each at its stored stage)."""
        self.kv = await self.d.bus.ensure_kv(subjects.TENANTS_BUCKET)  # replicated on a cluster
        for state in await self.list(limit=1000):
            if state.state in ("queued", "running") and state.job_id not in self.tasks:
                self._start(self._restore(state), resume=True)

    def _steps(self) -> Any:
        from stratosd.tenants.orchestrator import Steps

        return Steps(self.d.bus, self.d.dispatch, self.d.fleet, getattr(self.d, "costs", None),
                     observe=self.d.plugins.on_event)

    def _restore(self, state: TenantJobState) -> Any:
        from stratosd.tenants.orchestrator import TenantRun

        return TenantRun.restore(state, self._steps(), self.d.plugins, self.save,
                                 self.d.config.home_path)

    def _start(self, run: Any, resume: bool = False) -> None:
        task = asyncio.create_task(run.run(resume=resume), name=f"tenants-{run.job_id}")
        self.tasks[run.job_id] = task
        self.runs[run.job_id] = run

        def done(_t: asyncio.Task[Any]) -> None:
            self.tasks.pop(run.job_id, None)
            self.runs.pop(run.job_id, None)

        task.add_done_callback(done)

    async def stop(self) -> None:
        """Cancel running jobs (their last state stays in KV)."""
        for task in self.tasks.values():
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=5)

    async def save(self, state: TenantJobState) -> None:
        """Write a job's state."""
        await self.kv.put(state.job_id, encode(state))

    async def get(self, job_id: str) -> TenantJobState:
        """A job's state or NotFound."""
        try:
            entry = await self.kv.get(job_id)
        except KeyNotFoundError:
            raise NotFound(f"no tenants job {job_id!r}",
                           hint="list them with `stratosctl tenants status`") from None
        return TENANT_STATE_DECODER.decode(entry.value)

    async def current(self, job_id: str) -> TenantJobState:
        """A job's state, its endpoints marked stopped once they left the daemon's endpoint
        list (`stratosctl undeploy`, or the serving agent stopped them)."""
        state = await self.get(job_id)
        serving = [e for e in state.endpoints if e.state == "serving"]
        if not serving or job_id in self.tasks:
            return state
        live = {e.endpoint_id for e in await self.d.endpoints()}
        if all(e.endpoint_id in live for e in serving):
            return state
        state = msgspec.structs.replace(state, endpoints=[
            e if e.state != "serving" or e.endpoint_id in live
            else msgspec.structs.replace(e, state="stopped") for e in state.endpoints])
        await self.save(state)
        return state

    async def cancel(self, job_id: str) -> TenantJobState:
        """Stop a running job (its in-flight steps are cancelled on their agents) and
        undeploy its endpoints; a finished job only loses its endpoints."""
        state = await self.get(job_id)
        run, task = self.runs.get(job_id), self.tasks.get(job_id)
        if task is not None and run is not None:
            task.cancel()
            await asyncio.wait([task], timeout=10)
            for step_id, agent in list(run.inflight.items()):
                await self.d.dispatch.cancel(agent, step_id)
            state = run.state
        stopped = []
        for ep in state.endpoints:
            if ep.state == "serving" or (ep.state == "deploying" and ep.endpoint_id):
                try:
                    await self.d.dispatch.undeploy(ep.agent, ep.endpoint_id)
                except StratosError as exc:  # already gone: nothing to stop
                    log.info("tenant_endpoint_not_undeployed", endpoint_id=ep.endpoint_id,
                             agent_id=ep.agent, error=exc.message)
                stopped.append(ep.endpoint_id)
        finished = state.state in ("completed", "failed", "cancelled")
        state = msgspec.structs.replace(
            state, state=state.state if finished else "cancelled", updated=utc_now(),
            endpoints=[msgspec.structs.replace(e, state="stopped")
                       if e.endpoint_id in stopped else e for e in state.endpoints])
        await self.save(state)
        await self._steps().publish(subjects.tenant_event(job_id, "cancelled"),
                                    TenantJobCancelled(job_id=job_id, stage=state.stage,
                                                       undeployed=stopped, source="stratosd"))
        log.info("tenant_job_cancelled", job_id=job_id, undeployed=stopped,
                 was=state.state)
        return state

    async def list(self, limit: int) -> list[TenantJobState]:
        """Jobs, newest first."""
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return []
        out = []
        for key in keys:
            try:
                out.append(await self.get(key))
            except (NotFound, msgspec.DecodeError):
                continue
        return sorted(out, key=lambda j: j.created, reverse=True)[:limit]

    async def submit(self, spec: TenantJob, job_id: str | None) -> TenantJobState:
        """Start a job (the same job_id again returns its state)."""
        from stratosd.tenants.orchestrator import TenantRun

        validate_tenant_job(spec, self.d.plugins)
        if job_id is not None:
            try:
                return await self.get(job_id)
            except NotFound:
                pass
        steps = self._steps()
        run = TenantRun(job_id or new_id(), spec, steps, self.d.plugins, self.save,
                        self.d.config.home_path)
        await self.save(run.state)
        await steps.publish(subjects.tenant_event(run.job_id, "submitted"), TenantJobSubmitted(
            job_id=run.job_id, name=spec.name, tenants=[t.name for t in spec.tenants],
            rounds=spec.aggregation.rounds, rule=spec.aggregation.rule, source="stratosd"))
        self._start(run)
        log.info("tenant_job_submitted", job_id=run.job_id, tenants=len(spec.tenants))
        return run.state

    async def handle(self, cmd: Any) -> Message:
        """Dispatch on the command type."""
        if isinstance(cmd, SubmitTenantJob):
            return TenantJobReply(job=await self.submit(cmd.spec, cmd.job_id),
                                  source="stratosd")
        if isinstance(cmd, GetTenantJob):
            return TenantJobReply(job=await self.current(cmd.job_id), source="stratosd")
        if isinstance(cmd, CancelTenantJob):
            return TenantJobReply(job=await self.cancel(cmd.job_id), source="stratosd")
        if isinstance(cmd, ListTenantJobs):
            return TenantJobList(jobs=await self.list(cmd.limit), source="stratosd")
        raise Unsupported(f"unsupported tenants command {type(cmd).__name__}")
