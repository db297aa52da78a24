"""The `deploy` stage of a tenants job (`[deploy] enabled = true`): one endpoint per student
serves every tenant's tuned weights, each under the tenant's name.

What moves is weights, never data: each tenant's agent exports its ΔW as LoRA factors
(`tenant_apply kind=export`, an npz artifact counted in its `TenantBytes.weights`); the serving
agent stages them as peft adapters (`tenant_apply kind=import`; a tenant already on that agent
is staged from its own track and moves nothing); then the pipeline's own `deploy` step serves
the student with every adapter by name: `builtin-multi` (the built-in multi-adapter server)
on an agent without a GPU, `vllm` (multi-LoRA) on one with a GPU. The endpoint is an ordinary
endpoint: `stratosctl endpoints` lists it, `stratosctl undeploy ID` (or `stratosctl tenants
cancel JOB`) stops it.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from schemas.commands import RunStep
from schemas.tenants import TenantEndpoint, TenantEndpointReady
from stratosd.errors import AgentUnavailable, ConfigError
from stratosd.tenants.tenant import TRACK_AGG, Tenant

if TYPE_CHECKING:
    from stratosd.tenants.orchestrator import TenantRun

log = structlog.stdlib.get_logger(__name__)


def pick_deployer(run: TenantRun, agent: str) -> str:
    """`[deploy] deployer`, or for "auto": vllm on an agent with a GPU, else builtin-multi."""
    asked = run.spec.deploy.deployer
    if asked != "auto":
        return asked
    return "vllm" if run.steps.has_gpu(agent) else "builtin-multi"


def serving_agent(run: TenantRun, members: list[Tenant]) -> str:
    """`[deploy] agent`, else the first (by name) live tenant's agent."""
    agent = run.spec.deploy.agent or members[0].agent
    if not run.steps.is_up(agent):
        raise AgentUnavailable(f"serving agent {agent} is not up",
                               hint="start it, or name another in [deploy] agent")
    return agent


def deploy_job_id(job_id: str, student: str) -> str:
    """The endpoint's id: the deploy step's job id, one per (job, student)."""
    return f"{job_id}-serve-{hashlib.sha1(student.encode()).hexdigest()[:8]}"  # noqa: S324


async def _stage_weights(run: TenantRun, t: Tenant, agent: str) -> tuple[str, int]:
    """Move t's weights to the serving agent (if it is not its own); (ref there, bytes)."""
    args = {"tenant": t.spec.name, "model": t.student, "track": TRACK_AGG, "round": 0}
    inputs: dict[str, tuple[str, int]] = {}
    moved = 0
    if t.agent != agent:
        res = await run._step(t, "tenant_apply", {**args, "kind": "export"})
        key = next(iter(res["_artifacts"].values()), "")
        if not key:
            raise ConfigError(f"tenant {t.spec.name}: the export wrote no weights",
                              hint="see the tenant_apply job log on its agent")
        moved = int(res.get("weights_bytes") or 0)
        t.bytes["from_agent"] += moved
        t.bytes["weights"] += moved
        inputs["weights"] = (key, moved)
    res = await run._step(t, "tenant_apply", {**args, "kind": "import"}, inputs=inputs,
                          agent=agent)
    return str(res["ref"]), moved


async def _deploy_group(run: TenantRun, student: str, members: list[Tenant]) -> TenantEndpoint:
    agent = serving_agent(run, members)
    deployer = pick_deployer(run, agent)
    ep = TenantEndpoint(student=student, agent=agent, deployer=deployer,
                        endpoint_id=deploy_job_id(run.job_id, student),
                        names={t.spec.name: t.spec.name for t in members})
    refs: dict[str, str] = {}
    moved: dict[str, int] = {}
    for t in members:
        refs[t.spec.name], moved[t.spec.name] = await _stage_weights(run, t, agent)
        log.info("tenant_weights_staged", tenant=t.spec.name, agent_id=agent,
                 weights_bytes=moved[t.spec.name])
    spec = run.spec.deploy
    args: dict[str, Any] = {
        "deployer": deployer, "model": student, "served_name": student,
        "params": {**spec.params, "adapters": refs}, "load_requests": spec.load_requests}
    cmd = RunStep(job_id=ep.endpoint_id, run_id=run.job_id, step="deploy", args=args,
                  source="stratosd")
    run.inflight[cmd.job_id] = agent
    try:
        served = await run.steps.deploy(agent, cmd)
    finally:
        run.inflight.pop(cmd.job_id, None)
    ep = msgspec.structs.replace(ep, url=served.url, state="serving", weights_bytes=moved)
    for t in members:
        t.endpoint_url, t.served_name = served.url, t.spec.name
    log.info("tenant_endpoint_ready", endpoint_id=ep.endpoint_id, url=ep.url, agent_id=agent,
             deployer=deployer, names=sorted(ep.names))
    await run._emit("endpoint_ready", TenantEndpointReady(job_id=run.job_id, endpoint=ep,
                                                          source="stratosd"))
    return ep


async def deploy_endpoints(run: TenantRun) -> None:
    """One endpoint per student over the live tenants (kept in the job state)."""
    groups: dict[str, list[Tenant]] = defaultdict(list)
    for _name, t in sorted(run.tenants.items()):
        if t.alive and t.student:
            groups[t.student].append(t)
    done = {e.student: e for e in run.state.endpoints if e.state == "serving"}
    endpoints = list(done.values())
    for student, members in sorted(groups.items()):
        if student in done:  # resumed after it was deployed
            continue
        endpoints.append(await _deploy_group(run, student, members))
        await run._save(endpoints=endpoints)
