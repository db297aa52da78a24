"""The pipeline's stages: read the run, do the work (here or on an agent), return a result."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import structlog

from schemas import subjects
from schemas.base import to_builtins
from schemas.commands import RunInfo, RunStep
from schemas.events import RunProgress
from schemas.specs import Selection, ServerOffer
from schemas.stages import (
    ChooseStrategyResult,
    DeployResult,
    ProbeTeachersResult,
    ReportResult,
    SelectServerResult,
    SelectStudentResult,
    SynthesizeResult,
    TrainResult,
)
from stratosd.bus import Bus
from stratosd.config import DaemonConfig
from stratosd.costmodel.costs import STAGE_PHASE, CostModel
from stratosd.dispatch import Dispatcher, Outcome
from stratosd.errors import AgentUnavailable, ConfigError, Infeasible, RemoteError
from stratosd.fleet import Fleet
from stratosd.groupplan import Plan, plan_select
from stratosd.groups import (
    GROUP_KEYS,
    GroupJob,
    group_offer,
    nodes_asked,
    train_group,
)
from stratosd.pipeline import BudgetVerdict, StageFn, StageRun
from stratosd.plugins import Plugins
from stratosd.results import checked, stage_result

log = structlog.stdlib.get_logger(__name__)
_STAGE_PARAM_KEYS = ("synthesis", "prescreen", "evaluate", "deploy")
T = TypeVar("T")
QUEUE_POLL_S = 2.0  # a queued run looks for a free server this often


@dataclass
class Services:
    """The daemon services stages use."""

    bus: Bus
    fleet: Fleet
    dispatch: Dispatcher
    plugins: Plugins
    config: DaemonConfig
    costs: CostModel


def services(ctx: StageRun) -> Services:
    """The Services attached to the pipeline."""
    return ctx.pipeline.services  # type: ignore[attr-defined,no-any-return]


def stage_params(ctx: StageRun, key: str) -> dict[str, Any]:
    """Per-stage overrides from the job's [train.<key>] table."""
    value = ctx.spec.train.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"train.{key} must be a table", field=f"train.{key}")
    return dict(value)


async def select(ctx: StageRun, offers: Sequence[ServerOffer]) -> Any:
    """Run the job's selector over offers with the run's costing, in a thread (the work
    estimate reads the task data; big fleets take a few ms). One server: a stand-in for the
    stages after select_server, which planned the deadline (and any group) already."""
    svc = services(ctx)
    selector = svc.plugins.selectors.get(ctx.spec.selector)(ctx.spec.selector_params)
    phases = [STAGE_PHASE[s] for s in STAGE_PHASE if s not in ctx.run.results]
    constraints = msgspec.structs.replace(ctx.spec.constraints, deadline_hours=None)

    def pick() -> Any:
        costing = svc.costs.costing(ctx.spec, ctx.run, phases=phases)
        return selector.select(offers, constraints, costing=costing, seed=ctx.spec.seed)

    return await asyncio.to_thread(pick)


async def plan(ctx: StageRun, offers: Sequence[ServerOffer]) -> Plan:
    """select_server's choice: a server, or a group of them when the job asks for one
    (train.nodes) or its deadline needs one (see stratosd.groupplan)."""
    svc = services(ctx)
    selector = svc.plugins.selectors.get(ctx.spec.selector)(ctx.spec.selector_params)
    phases = [STAGE_PHASE[s] for s in STAGE_PHASE if s not in ctx.run.results]

    def pick() -> Plan:
        costing = svc.costs.costing(ctx.spec, ctx.run, phases=phases)
        return plan_select(selector, offers, ctx.spec, costing, plugins=svc.plugins)

    return await asyncio.to_thread(pick)


def offer_of(run: RunInfo, fleet: Fleet) -> ServerOffer:
    """The server a run is on now (its agent's live offer, else the one selected)."""
    selected = stage_result(run, SelectServerResult)
    if selected is None:
        raise ConfigError(f"run {run.run_id} has no server yet",
                          hint="the select_server stage runs first")
    members = [str(m) for m in (run.progress.get("group_members")
                                or selected.selection.chosen.members)]
    if len(members) > 1:  # a group: every member's price and speed, as it was scored
        live = [fleet.offer(m) for m in members if m in fleet.agents]
        return group_offer(live) if len(live) == len(members) else selected.selection.chosen
    agent = run.progress.get("agent_id") or selected.agent_id
    if agent and agent in fleet.agents:
        return fleet.offer(str(agent))
    return selected.selection.chosen


def run_offer(ctx: StageRun) -> ServerOffer:
    """The server the run is on now."""
    return offer_of(ctx.run, services(ctx).fleet)


async def queued(ctx: StageRun, pick: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    """(pick(), seconds waited): pick() again every QUEUE_POLL_S while it finds every fitting
    server busy with another run's training, so the run queues (visibly: a progress event at
    once and every 30 s) instead of failing."""
    waited = 0.0
    while True:
        try:
            return await pick(), waited
        except Infeasible as exc:
            if exc.field != "constraints.busy":
                raise
            if waited % 30.0 == 0.0:
                log.info("run_queued", reason=exc.message, waited_s=waited)
                await ctx.pipeline.publish(
                    subjects.run_event(ctx.run_id, "progress"),
                    RunProgress(run_id=ctx.run_id, stage=ctx.stage, unit="s", done=waited,
                                message=f"queued: {exc.message}", source="stratosd"))
            await asyncio.sleep(QUEUE_POLL_S)
            waited += QUEUE_POLL_S


async def agent_for(ctx: StageRun) -> str:
    """The run's agent; if it is down, re-select among the live ones and remember that."""
    svc = services(ctx)
    selected = stage_result(ctx.run, SelectServerResult)
    current = ctx.run.progress.get("agent_id") or (selected.agent_id if selected else None)
    if current and await svc.fleet.wait_up(current):
        return str(current)
    excluded = sorted({str(a) for a in [*ctx.run.progress.get("excluded_agents", []), current]
                       if a})

    async def pick() -> Selection:
        offers = [o for o in svc.fleet.offers() if o.id not in excluded]
        if not offers:
            raise AgentUnavailable(
                f"agent {current} is down and no other live agent can take over",
                hint="start another stratos-agent; the run retries")
        chosen: Selection = await select(ctx, offers)
        return chosen

    # every other server busy with another run's training: wait for one, do not fail
    selection, _waited = await queued(ctx, pick)
    chosen = str(selection.chosen.agent_id)
    log.warning("server_reselected", previous=current, agent_id=chosen)
    await ctx.note(agent_id=chosen, excluded_agents=excluded)
    return chosen


async def run_job(
    ctx: StageRun, step: str, args: dict[str, Any], *, key: str | None = None,
    inputs: dict[str, str] | None = None,
) -> Outcome:
    """Run one step on the run's agent and wait; resumes a job sent before a daemon restart."""
    svc = services(ctx)
    key = key or step
    job_key = f"{key}#{ctx.attempt}"
    job_id = ctx.run.jobs.get(job_key)
    agent_id = ctx.run.jobs.get(f"{job_key}@agent")
    if job_id and agent_id:
        known = svc.dispatch.outcomes.get(job_id)
        if svc.dispatch.outcome_agent.get(job_id, agent_id) != agent_id:
            known = None  # only the agent the job was sent to may settle it
        if known is not None and known.state in ("completed", "serving", "failed"):
            svc.dispatch.raise_for(job_id, known)
            return known
        up = await svc.fleet.wait_up(agent_id)
        status = await svc.dispatch.status(agent_id, job_id) if up else None
        if status is not None and status.state == "completed":
            return Outcome("completed", dict(status.result), dict(status.artifacts))
        if status is None or status.state not in ("queued", "running"):
            job_id = None  # lost with its agent: send it again
        else:
            svc.dispatch.job_agent[job_id] = agent_id
    if not job_id or agent_id is None:  # never sent, or sent and lost, or its agent unknown
        agent_id = await agent_for(ctx)
        job_id = f"{ctx.run_id}-{key}-{ctx.attempt}"
        await ctx.remember_job(job_key, job_id)
        await ctx.remember_job(f"{job_key}@agent", agent_id)
        step_msg = RunStep(job_id=job_id, run_id=ctx.run_id, step=step,  # type: ignore[arg-type]
                           args=args, inputs=inputs or {}, source="stratosd")
        await send_queued(ctx, agent_id, step_msg)
    try:
        outcome = await svc.dispatch.wait(job_id)
    except asyncio.CancelledError:
        await svc.dispatch.cancel(agent_id, job_id)
        raise
    svc.dispatch.raise_for(job_id, outcome)
    return outcome


async def send_queued(ctx: StageRun, agent_id: str, step: RunStep) -> None:
    """Send a step; while the agent's devices are held by another run's training (it refuses
    with `conflict`), wait in the queue instead of failing the run."""
    svc = services(ctx)
    waited = 0.0
    while True:
        try:
            await svc.dispatch.send(agent_id, step)
            return
        except RemoteError as exc:
            if exc.remote_code != "conflict":
                raise
            if waited % 30.0 == 0.0:
                log.info("job_queued", agent_id=agent_id, reason=exc.message, waited_s=waited)
                await ctx.pipeline.publish(
                    subjects.run_event(ctx.run_id, "progress"),
                    RunProgress(run_id=ctx.run_id, stage=ctx.stage, unit="s", done=waited,
                                message=f"queued on {agent_id}: {exc.message}",
                                source="stratosd"))
            await asyncio.sleep(QUEUE_POLL_S)
            waited += QUEUE_POLL_S


def task_args(ctx: StageRun) -> dict[str, Any]:
    """The task spec as plain data."""
    return dict(to_builtins(ctx.spec.task))


async def select_server(ctx: StageRun) -> dict[str, Any]:
    """Pick a server among live agents with the job's selector; while every fitting server is
    busy with another run's training, wait in the queue instead of failing."""
    svc = services(ctx)
    nodes_asked(ctx.spec.train)  # a bad train.nodes fails here, before any queueing

    async def pick() -> tuple[Selection, Sequence[ServerOffer]]:
        offers: Sequence[ServerOffer] = svc.fleet.table()
        if not len(offers):
            raise Infeasible("no live agent to run on",
                             hint="start stratos-agent on a host (see README), then resubmit")
        planned = await plan(ctx, offers)  # groups when train.nodes or the deadline asks
        return planned.selection, planned.offers

    (selection, offers), waited = await queued(ctx, pick)
    chosen = selection.chosen
    costing = await asyncio.to_thread(svc.costs.costing, ctx.spec, ctx.run)
    estimate = costing.estimate(chosen)
    loop = svc.costs.loop_estimate(costing.work, chosen, ctx.spec.est_train_hours)
    return checked(ctx.stage, SelectServerResult(
        selection=selection, agent_id=chosen.agent_id or chosen.id, offers=list(offers),
        work=costing.work, estimate=estimate, train_loop_estimate=loop, queued_s=waited))


async def costed(ctx: StageRun, result: dict[str, Any], measured_s: float) -> dict[str, Any]:
    """Add the stage's estimate (made before it ran) and measurement; learn from them."""
    svc = services(ctx)
    offer = run_offer(ctx)
    cost = svc.costs.stage_cost(ctx.run, ctx.stage, offer, measured_s, result,
                                before=ctx.run.progress.get(f"estimate_{ctx.stage}"))
    if cost is None:
        return result
    await svc.costs.save(svc.bus, [cost.key, cost.key + ".loop"])
    return checked(ctx.stage, {**result, "cost": to_builtins(cost)})


async def note_estimate(ctx: StageRun) -> None:
    """Persist this stage's estimate on the run's server before it starts."""
    svc = services(ctx)
    phase = STAGE_PHASE.get(ctx.stage)
    if phase is None:
        return
    offer = run_offer(ctx)
    costing = await asyncio.to_thread(svc.costs.costing, ctx.spec, ctx.run, phases=(phase,))
    est = costing.estimate(offer)
    await ctx.note(**{f"estimate_{ctx.stage}": to_builtins(est)})


def timed(fn: Any) -> Any:
    """Wrap an agent stage: note its estimate, time it, attach estimate vs measurement."""
    import time

    async def wrapper(ctx: StageRun) -> dict[str, Any]:
        await note_estimate(ctx)
        t0 = time.monotonic()
        result = await fn(ctx)
        return await costed(ctx, result, time.monotonic() - t0)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


async def budget_check(run: RunInfo, stage: str, svc: Services) -> BudgetVerdict | None:
    """A verdict when starting `stage` would take the run past its budget (spent + the rest)."""
    budget = run.spec.constraints.budget_usd
    if budget is None or stage not in STAGE_PHASE or "select_server" not in run.results:
        return None
    rest = await asyncio.to_thread(svc.costs.remaining, run, stage, offer_of(run, svc.fleet))
    spent = svc.costs.spent_usd(run)
    if rest is None or spent + rest.value <= budget:
        return None
    return BudgetVerdict(
        budget_usd=budget, spent_usd=round(spent, 6), next_usd=round(rest.value, 6),
        message=(f"budget ${budget:.4g} would be exceeded: ${spent:.4g} spent (measured) + "
                 f"${rest.value:.4g} for {stage} and the stages after it "
                 f"({rest.describe('{:.4g}')})"))


async def probe_teachers(ctx: StageRun) -> dict[str, Any]:
    """Every candidate teacher answers a sample of the task (on the agent)."""
    args = {"task": task_args(ctx), "teachers": to_builtins(ctx.spec.teachers),
            "probe_size": ctx.spec.task.probe_size, "seed": ctx.spec.seed,
            "budget_usd": ctx.spec.constraints.budget_usd}
    return checked(ctx.stage, (await run_job(ctx, "probe", args)).result)


def _need(ctx: StageRun, cls: type[Any]) -> Any:
    """An earlier stage's typed result; its absence is a pipeline bug the run reports."""
    got = stage_result(ctx.run, cls)
    if got is None:
        raise ConfigError(f"stage {ctx.stage} needs the result of {cls.STAGE}, which is missing",
                          hint=f"resume the run from {cls.STAGE}")
    return got


async def select_student(ctx: StageRun) -> dict[str, Any]:
    """Fit and pre-screen the candidate students (on the agent)."""
    offer = to_builtins(_need(ctx, SelectServerResult).selection.chosen)
    args = {"task": task_args(ctx), "students": to_builtins(ctx.spec.students), "offer": offer,
            "trainer": ctx.spec.trainer, "train": _train_params(ctx), "seed": ctx.spec.seed,
            **stage_params(ctx, "prescreen")}
    result = checked(ctx.stage, (await run_job(ctx, "prescreen", args)).result)
    if not result.get("chosen"):
        raise Infeasible(f"no student passed fit and pre-screen: {result.get('reason', '')}",
                         hint="add a student that fits the server, or relax the constraints")
    return result


async def choose_strategy(ctx: StageRun) -> dict[str, Any]:
    """Alignment, injection or hybrid (or a plugin's mode), from the best teacher's probe
    accuracy and its 95% interval against the job's threshold."""
    from plugins.modes.policy import explain_mode, teacher_interval

    svc = services(ctx)
    probe: ProbeTeachersResult = _need(ctx, ProbeTeachersResult)
    best = next((s for s in probe.scores if s.name == probe.best), None)
    if best is None:
        raise Infeasible("no teacher could be probed", hint="check the teachers in the job")
    teacher_spec = next(t for t in ctx.spec.teachers if t.label == best.name)
    threshold = ctx.spec.mode_threshold
    if ctx.spec.mode != "auto":
        mode, reason = ctx.spec.mode, "set in the job"
    else:
        mode = svc.plugins.choose_mode(ctx.spec.task, best, threshold)
        reason = explain_mode(best, threshold, mode)
    svc.plugins.modes.get(mode)
    low, high = teacher_interval(best) if best.n > 0 else (None, None)
    return checked(ctx.stage, ChooseStrategyResult(
        mode=mode, teacher=best.name, teacher_spec=teacher_spec, teacher_accuracy=best.accuracy,
        threshold=threshold, reason=reason, teacher_n=best.n, teacher_ci_low=low,
        teacher_ci_high=high))


async def synthesize(ctx: StageRun) -> dict[str, Any]:
    """The teacher writes the training data with the chosen mode (on the agent)."""
    strategy: ChooseStrategyResult = _need(ctx, ChooseStrategyResult)
    args = {"task": task_args(ctx), "teacher": to_builtins(strategy.teacher_spec),
            "mode": strategy.mode, "use_reference": True, "seed": ctx.spec.seed,
            **stage_params(ctx, "synthesis")}
    out = await run_job(ctx, "synthesize", args)
    return checked(ctx.stage, {**out.result, "artifact": out.artifacts.get("dataset.jsonl", "")})


def _train_params(ctx: StageRun) -> dict[str, Any]:
    return {k: v for k, v in ctx.spec.train.items()
            if k not in _STAGE_PARAM_KEYS and k not in GROUP_KEYS}


async def train(ctx: StageRun) -> dict[str, Any]:
    """Train the chosen student; a retry resumes from the last uploaded checkpoint."""
    svc = services(ctx)
    dataset = _need(ctx, SynthesizeResult).artifact
    if not dataset:
        raise ConfigError("the synthesis stage produced no dataset", hint="see its job log")
    inputs = {"dataset": dataset}
    ckpt = f"{ctx.run_id}/train-checkpoint.tar"
    if await svc.bus.has_artifact(ckpt):
        inputs["resume"] = ckpt
    args = {"model": _need(ctx, SelectStudentResult).chosen, "trainer": ctx.spec.trainer,
            "params": _train_params(ctx), "task": task_args(ctx), "seed": ctx.spec.seed}
    work = await asyncio.to_thread(svc.costs.work, ctx.spec, ctx.run)
    loop = svc.costs.loop_estimate(work, run_offer(ctx), ctx.spec.est_train_hours)
    members = ctx.run.progress.get("group_members") or \
        _need(ctx, SelectServerResult).selection.chosen.members
    if len(members) > 1:  # a group of servers (train.nodes): see stratosd.groups
        out = await train_group(group_job(ctx, list(members), args, inputs, ckpt))
    else:
        out = await run_job(ctx, "train", args, inputs=inputs)
    return checked(ctx.stage, {**out.result, "artifact": out.artifacts.get("model.tar", ""),
                               "resumed": "resume" in inputs,
                               "train_time_estimate": to_builtins(loop)})


def group_job(ctx: StageRun, members: list[str], args: dict[str, Any],
              inputs: dict[str, str], checkpoint: str) -> GroupJob:
    """The group training job of this run's train stage (members: the rendezvous host first)."""
    svc = services(ctx)

    async def say(message: str) -> None:
        await ctx.pipeline.publish(subjects.run_event(ctx.run_id, "progress"), RunProgress(
            run_id=ctx.run_id, stage=ctx.stage, message=message, source="stratosd"))

    async def on_members(now: list[str]) -> None:
        await ctx.note(group_members=now, agent_id=now[0])

    return GroupJob(run_id=ctx.run_id, attempt=ctx.attempt, members=members,
                    min_nodes=nodes_asked(ctx.spec.train)[1], args=args, inputs=inputs,
                    dispatch=svc.dispatch, fleet=svc.fleet, bus=svc.bus, say=say,
                    on_members=on_members, resume_key=checkpoint)


async def evaluate(ctx: StageRun) -> dict[str, Any]:
    """Held-out accuracy and latency of the student before and after training."""
    student = _need(ctx, SelectStudentResult).chosen
    model_key = _need(ctx, TrainResult).artifact
    base = {"task": task_args(ctx), "model": student, "split": "test", "seed": ctx.spec.seed,
            **stage_params(ctx, "evaluate")}
    before = await run_job(ctx, "evaluate", base, key="evaluate-before")
    after = await run_job(ctx, "evaluate", base, key="evaluate-after",
                          inputs={"model": model_key} if model_key else None)
    target = ctx.spec.constraints.target_accuracy
    accuracy = float(after.result.get("accuracy", 0.0))
    if accuracy < target:
        log.warning("quality_target_missed", accuracy=accuracy, target_accuracy=target)
    strategy = stage_result(ctx.run, ChooseStrategyResult)
    # stored as the agent wrote it (with every record), validated against EvaluateResult
    return checked(ctx.stage, {
        "before": before.result, "after": after.result,
        "teacher_probe_accuracy": strategy.teacher_accuracy if strategy else None,
        "target_accuracy": target, "target_met": accuracy >= target})


async def deploy(ctx: StageRun) -> dict[str, Any]:
    """Serve the trained student on the run's agent and measure it."""
    if not ctx.spec.deploy:
        return checked(ctx.stage, DeployResult(skipped=True, reason="deploy = false in the job"))
    args = {"deployer": ctx.spec.deployer, "model": _need(ctx, SelectStudentResult).chosen,
            "served_name": ctx.spec.name, "task": task_args(ctx),  # probe with its prompts
            **stage_params(ctx, "deploy")}
    model_key = _need(ctx, TrainResult).artifact
    out = await run_job(ctx, "deploy", args, inputs={"model": model_key} if model_key else None)
    ep = out.endpoint
    if ep is None:
        return checked(ctx.stage, DeployResult(skipped=True,
                                               reason="the deploy job ended without serving"))
    return checked(ctx.stage, DeployResult(
        endpoint_id=ep.endpoint_id, url=ep.url, model=ep.model, agent_id=ep.agent_id,
        metrics=dict(ep.metrics), deployer=ep.deployer))


async def report(ctx: StageRun) -> dict[str, Any]:
    """Write the Markdown/JSON/PNG report with the multi-objective score."""
    from stratosd.report import write_report

    svc = services(ctx)
    out_dir = svc.config.home_path / "reports" / ctx.run_id
    out = await asyncio.to_thread(write_report, ctx.run, svc.plugins, out_dir, svc.costs)
    return checked(ctx.stage, ReportResult(**out))


STAGE_FUNCS: dict[str, StageFn] = {
    "select_server": select_server,
    "probe_teachers": timed(probe_teachers),
    "select_student": timed(select_student),
    "choose_strategy": choose_strategy,
    "synthesize": timed(synthesize),
    "train": timed(train),
    "evaluate": timed(evaluate),
    "deploy": timed(deploy),
    "report": report,
}
