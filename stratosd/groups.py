"""More than one server: a group of agents that trains one job together (`train.nodes = N`).

Selection: `group_offers` turns the live agents into group candidates, N free agents of one
region and one kind of hardware each (the cheapest), scored by the job's selector as one
server: devices and $/h summed, CPU speed summed at the prior scaling efficiency of N ranks
(GPU groups: the cost model applies it to the summed devices), memory and latency of the worst
member. The chosen offer's `members` name the agents, the rendezvous host first.

Training (`train_group`): the daemon sends the host agent its train job with `group.is_host`;
the host picks a free port and reports it as a progress line (`rdzv_port`); the daemon sends
every other member its job with the endpoint. Each member's torchrun joins the c10d
rendezvous (elastic `min_nodes:nodes`); the node that gets global rank 0 uploads the
checkpoints and the model. When a member is lost (its agent goes down, its job with it), the
others' collectives fail: the daemon stops what is left, says so in a run progress event, and
restarts the group from the last uploaded checkpoint on a replacement agent (same region and
hardware) or, when none is free, on the survivors while they are at least `min_nodes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from schemas import subjects
from schemas.base import decode_or_error
from schemas.commands import RunStep
from schemas.events import EVENT_DECODER, JobProgress
from schemas.specs import ServerOffer
from stratosd.bus import Bus
from stratosd.dispatch import Dispatcher, Outcome, job_error
from stratosd.errors import (
    AgentUnavailable,
    ConfigError,
    Infeasible,
    JobRejected,
    RemoteError,
    StratosError,
)
from stratosd.fleet import Fleet

log = structlog.stdlib.get_logger(__name__)

GROUP_KEYS = ("nodes", "min_nodes")  # [train] keys for the daemon, not the trainer
RDZV_METRIC = "rdzv_port"  # agents.steps.train reports the host's port in this metric
LOCAL_ADDR = "127.0.0.1"  # members on one host meet on loopback
MODEL_ARTIFACT = "model.tar"


def nodes_asked(train: Mapping[str, Any]) -> tuple[int, int]:
    """(nodes, min_nodes) from the job's [train] table; (1, 1) unless it asks for a group."""
    def num(name: str, default: int) -> int:
        value = train.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.{name} must be an integer >= 1, got {value!r}",
                              hint="nodes = N trains on N servers; min_nodes (<= nodes) is how "
                              "few may carry on after losing some", field=f"train.{name}")
        return value

    nodes = num("nodes", 1)
    min_nodes = num("min_nodes", nodes)
    if min_nodes > nodes:
        raise ConfigError(f"train.min_nodes = {min_nodes} is more than train.nodes = {nodes}",
                          hint="min_nodes <= nodes", field="train.min_nodes")
    return nodes, min_nodes


def same_hardware(a: ServerOffer, b: ServerOffer) -> bool:
    """Members of one group train alike (DDP waits for the slowest)."""
    return (a.gpu_model, a.gpu_count, a.gpu_mem_mib, a.cpu_count) == \
        (b.gpu_model, b.gpu_count, b.gpu_mem_mib, b.cpu_count)


def group_offer(members: Sequence[ServerOffer]) -> ServerOffer:
    """The group as one candidate (see the module docstring); members[0] hosts the
    rendezvous and the stages that run on one server. Its speed is the head's per device;
    the cost model counts the group's devices (GPUs summed, or one per CPU member through
    `members`) for the training phase only, at N ranks' scaling efficiency (learned, else
    the prior), so probe, evaluation and deployment are not credited with the group."""
    if not members:
        raise ValueError("a group needs members")
    head = members[0]
    return msgspec.structs.replace(
        head,
        id="+".join(m.id for m in members),
        source="group",
        gpu_count=sum(m.gpu_count for m in members),
        gpu_mem_mib=min(m.gpu_mem_mib for m in members),
        ram_mib=min(m.ram_mib for m in members),
        price_usd_per_hour=round(sum(m.price_usd_per_hour for m in members), 6),
        latency_ms=max(m.latency_ms for m in members),
        latency_known=all(m.latency_known for m in members),
        status="up" if all(m.status == "up" for m in members) else "down",
        busy=any(m.busy for m in members),
        members=[m.id for m in members],
    )


def same_kind_sets(offers: Sequence[ServerOffer]) -> list[list[ServerOffer]]:
    """The offers split into sets of one region and one kind of hardware (order kept): the
    servers a group may be made of."""
    kinds: list[list[ServerOffer]] = []
    for o in offers:
        for kind in kinds:
            if kind[0].region == o.region and same_hardware(kind[0], o):
                kind.append(o)
                break
        else:
            kinds.append([o])
    return kinds


def group_offers(offers: Sequence[ServerOffer], nodes: int) -> list[ServerOffer]:
    """Group candidates of `nodes` live agents: per region and kind of hardware, the cheapest
    free ones. Infeasible when there are none: `constraints.busy` when busy agents would make
    one (the run queues), `train.nodes` when the fleet is too small."""
    live = [o for o in offers if o.status == "up" and o.agent_id]
    groups: list[ServerOffer] = []
    busy_would = False
    kinds = same_kind_sets(sorted(live, key=lambda o: (o.region, o.price_usd_per_hour, o.id)))
    for kind in kinds:
        free = [o for o in kind if not o.busy]
        if len(free) >= nodes:
            groups.append(group_offer(free[:nodes]))
        elif len(kind) >= nodes:
            busy_would = True
    if groups:
        return groups
    if busy_would:
        raise Infeasible(f"every group of {nodes} matching servers has a member busy with "
                         "another run's training", hint="the run waits for them",
                         field="constraints.busy")
    largest = max((len(k) for k in kinds), default=0)
    raise Infeasible(f"train.nodes = {nodes}, but no region has {nodes} live servers of one "
                     f"kind (at most {largest})",
                     hint="start more agents in one region, or lower train.nodes",
                     field="train.nodes")


def rendezvous_addresses(fleet: Fleet, members: Sequence[str]) -> dict[str, str]:
    """The address each member is reached at: loopback when they all share a host, else
    their hostnames (which must resolve between them, as torchrun itself assumes)."""
    names = {m: fleet.agents[m].telemetry.hostname if m in fleet.agents else "" for m in members}
    if len(set(names.values())) <= 1:
        return dict.fromkeys(members, LOCAL_ADDR)
    return {m: names[m] or LOCAL_ADDR for m in members}


@dataclass
class GroupJob:
    """One multi-node training job and the daemon services it uses."""

    run_id: str
    attempt: int
    members: list[str]
    min_nodes: int
    args: dict[str, Any]
    inputs: dict[str, str]
    dispatch: Dispatcher
    fleet: Fleet
    bus: Bus
    say: Callable[[str], Awaitable[None]]  # a run progress event
    on_members: Callable[[list[str]], Awaitable[None]] | None = None
    resume_key: str = ""  # the checkpoint artifact a restart resumes from
    port_timeout_s: float = 300.0  # the host fetches its inputs and starts before it reports
    settle_s: float = 120.0  # what is left of a failed group stops within this
    down_grace_s: float = 30.0  # after a failure, how long the fleet may take to see a loss
    restarts: list[dict[str, Any]] = field(default_factory=list)


async def train_group(job: GroupJob) -> Outcome:
    """Train on the group; restart from the last checkpoint when members are lost (see the
    module docstring). Returns the outcome of the member whose node held global rank 0."""
    members = list(job.members)
    for rnd in range(len(job.members) + 1):  # every restart loses at least one node
        inputs = dict(job.inputs)
        if job.resume_key and await job.bus.has_artifact(job.resume_key):
            inputs["resume"] = job.resume_key
        outcomes, failure = await _round(job, members, rnd, inputs)
        if failure is None:
            return _merged(job, members, outcomes)
        lost = await _lost(job, members, failure)
        survivors = [m for m in members if m not in lost]
        spare = _replacements(job.fleet, members, lost)
        new = survivors + spare[:len(lost)]
        if len(new) < job.min_nodes:
            raise AgentUnavailable(
                f"the training group lost {', '.join(lost)}: {len(new)} node(s) left, "
                f"min_nodes = {job.min_nodes}",
                hint="start agents in the group's region (the run retries), or lower "
                "train.min_nodes") from failure
        checkpoint = "the last checkpoint" if await job.bus.has_artifact(job.resume_key) \
            else "the start (no checkpoint yet)"
        why = str(failure)[:300]
        message = (f"node(s) lost: {', '.join(lost)} ({why}); restarting training from "
                   f"{checkpoint} on {len(new)} node(s): {', '.join(new)}"
                   + (f" ({', '.join(spare[:len(lost)])} replacing)" if spare else ""))
        log.warning("group_node_lost", run_id=job.run_id, lost=lost, members=new, round=rnd)
        job.restarts.append({"round": rnd, "lost": lost, "members": new})
        await job.say(message)
        members = new
        if job.on_members is not None:
            await job.on_members(members)
    raise AgentUnavailable(f"the training group kept losing nodes ({job.restarts})",
                           hint="check the agents' hosts; the run retries")


def _job_id(job: GroupJob, rnd: int, node: int) -> str:
    return f"{job.run_id}-train-{job.attempt}-g{rnd}n{node}"


async def _round(job: GroupJob, members: list[str], rnd: int, inputs: dict[str, str]
                 ) -> tuple[dict[str, Outcome], StratosError | None]:
    """One launch of the group: the host first, then the others with its endpoint."""
    addrs = rendezvous_addresses(job.fleet, members)
    host = members[0]
    group = {"nnodes": len(members), "min_nodes": min(job.min_nodes, len(members)),
             "rdzv_id": f"{job.run_id}-{job.attempt}-{rnd}", "host": addrs[host]}
    ids = {m: _job_id(job, rnd, i) for i, m in enumerate(members)}
    tasks: dict[str, asyncio.Task[Outcome]] = {}
    try:
        port = asyncio.get_running_loop().create_future()
        sub = await job.bus.js.subscribe(
            subjects.job_event(host, ids[host], "progress"), ordered_consumer=True,
            stream=subjects.EVENTS_STREAM, cb=_port_reader(port))
        try:
            await _send(job, host, ids[host], {**group, "node_rank": 0, "is_host": True,
                                               "local_addr": addrs[host]}, inputs)
            tasks[host] = asyncio.create_task(job.dispatch.wait(ids[host]))
            done, _ = await asyncio.wait([port, tasks[host]], timeout=job.port_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if port not in done:
                if tasks[host] in done:  # the host ended before its rendezvous was up
                    return {}, _failure(ids[host], tasks[host])
                raise AgentUnavailable(f"{host} reported no rendezvous port within "
                                       f"{job.port_timeout_s:.0f}s", hint="see its job log")
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        endpoint = f"{addrs[host]}:{int(port.result())}"
        log.info("group_rendezvous", run_id=job.run_id, endpoint=endpoint, members=members)
        for i, m in enumerate(members[1:], start=1):
            await _send(job, m, ids[m], {**group, "node_rank": i, "is_host": False,
                                         "endpoint": endpoint, "local_addr": addrs[m]}, inputs)
            tasks[m] = asyncio.create_task(job.dispatch.wait(ids[m]))
        pending = set(tasks.values())
        while pending:
            finished, pending = await asyncio.wait(pending,
                                                   return_when=asyncio.FIRST_COMPLETED)
            for m, task in tasks.items():
                if task in finished and (err := _failure(ids[m], task)) is not None:
                    await _stop(job, ids, tasks)
                    return {}, err
        return {m: t.result() for m, t in tasks.items()}, None
    except StratosError as exc:
        await _stop(job, ids, tasks)
        return {}, exc
    except asyncio.CancelledError:
        await asyncio.shield(_stop(job, ids, tasks))
        raise


def _port_reader(port: asyncio.Future[int]) -> Callable[[Any], Awaitable[None]]:
    async def cb(msg: Any) -> None:
        try:
            event = decode_or_error(EVENT_DECODER, msg.data)
        except StratosError:
            return
        if isinstance(event, JobProgress) and RDZV_METRIC in event.metrics and not port.done():
            port.set_result(int(event.metrics[RDZV_METRIC]))
    return cb


def _failure(job_id: str, task: asyncio.Task[Outcome]) -> StratosError | None:
    """The error a member's finished wait stands for (None: it completed)."""
    exc = task.exception()
    if exc is not None:
        return exc if isinstance(exc, StratosError) else \
            AgentUnavailable(f"job {job_id}: {exc}", hint="the group restarts")
    outcome = task.result()
    if outcome.state == "completed" and outcome.result.get("stopped"):
        # its ranks stopped together before the end: a member's launcher died (the daemon
        # cancels through the agents, and a cancelled job does not complete)
        return AgentUnavailable(f"job {job_id} stopped at step {outcome.result.get('steps')} "
                                "before the end: a member of the group left",
                                hint="the group restarts from the last checkpoint")
    if outcome.state == "completed":
        return None
    if outcome.state == "failed" and outcome.error is not None:
        return job_error(job_id, outcome.error)
    return AgentUnavailable(f"job {job_id} ended as {outcome.state}", hint="the group restarts")


async def _send(job: GroupJob, agent_id: str, job_id: str, group: dict[str, Any],
                inputs: dict[str, str]) -> None:
    """Send one member's job; while the agent still holds its devices for the previous
    round's job (it refuses with `conflict`), wait for them."""
    step = RunStep(job_id=job_id, run_id=job.run_id, step="train",
                   args={**job.args, "group": group}, inputs=inputs, source="stratosd")
    deadline = time.monotonic() + job.settle_s
    while True:
        try:
            await job.dispatch.send(agent_id, step)
            return
        except RemoteError as exc:
            if exc.remote_code != "conflict" or time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def _stop(job: GroupJob, ids: dict[str, str],
                tasks: dict[str, asyncio.Task[Outcome]]) -> None:
    """Cancel what is left of a failed round and wait (bounded) until it has stopped, so the
    devices are free for the next round."""
    running = [m for m, t in tasks.items() if not t.done()]
    for m in running:
        if job.fleet.is_up(m):
            await job.dispatch.cancel(m, ids[m])
    waiting = [tasks[m] for m in running]
    if waiting:
        await asyncio.wait(waiting, timeout=job.settle_s)
    for task in tasks.values():
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()  # retrieved: the failure is reported by the caller


async def _lost(job: GroupJob, members: list[str], failure: StratosError) -> list[str]:
    """Members the fleet sees down within the grace; none: an ordinary failure, raised (the
    stage's retry resumes from the checkpoint on the same group)."""
    if isinstance(failure, JobRejected):  # permanent: a restart would fail the same way
        raise failure
    deadline = time.monotonic() + job.down_grace_s
    while True:
        lost = [m for m in members if not job.fleet.is_up(m)]
        if lost or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    if not lost:
        raise failure
    return lost


def _replacements(fleet: Fleet, members: list[str], lost: list[str]) -> list[str]:
    """Free live agents that can stand in for lost members: same region and hardware."""
    known = [fleet.offer(m) for m in members if m in fleet.agents]
    if not known:
        return []
    ref = known[0]
    return [o.id for o in fleet.offers()
            if o.id not in members and not o.busy and o.region == ref.region
            and same_hardware(o, ref)]


def _merged(job: GroupJob, members: list[str], outcomes: dict[str, Outcome]) -> Outcome:
    """The group's outcome: the model writer's (global rank 0), with the group's shape."""
    writer = next((m for m, o in outcomes.items() if MODEL_ARTIFACT in o.artifacts),
                  next((m for m, o in outcomes.items() if o.result.get("model_writer")),
                       members[0]))
    out = outcomes[writer]
    result = {**out.result, "nodes": len(members), "group": list(members), "writer": writer,
              "node_restarts": job.restarts}
    return Outcome("completed", result, dict(out.artifacts))
