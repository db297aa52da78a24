"""A tenants job, stage by stage: agents → signatures → student per tenant (with its budget) →
rounds → evaluation → report.

Every piece of work on a tenant's data is a RunStep on that tenant's own agent (the first
live one in its `agents`); the daemon sees only what `schemas.tenants` declares: signatures,
candidate points, per-round updates, results. Each command and each artifact that crosses the
bus for a tenant is counted in its `TenantBytes`. A tenant whose agent is lost (or whose step
fails, or whose budget no candidate fits) leaves the job with a `tenant_dropped` event: the
others' rounds go on, re-weighted over who is left.

The job's state is written to KV at every stage; step job ids are derived from (job, tenant,
step, round, track), so a restarted daemon takes the job up again at its stage (`resume`) and
every step sent before the restart is answered by the agent's own record of it, never run
twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog

from schemas import subjects
from schemas.base import Message, encode, utc_now
from schemas.commands import RunStep
from schemas.subjects import artifact_key
from schemas.tenants import (
    CandidatePoint,
    TenantBudgetStopped,
    TenantDropped,
    TenantJob,
    TenantJobCompleted,
    TenantJobFailed,
    TenantJobResumed,
    TenantJobState,
    TenantRoundCompleted,
    TenantRoundStarted,
    TenantSignature,
    TenantStageStarted,
)
from stratosd.api import Aggregator
from stratosd.costmodel.learn import EfficiencyBook
from stratosd.errors import AgentUnavailable, ConfigError, StratosError
from stratosd.plugins import lookup
from stratosd.tenants import budget, selection, similarity
from stratosd.tenants.tenant import TRACK_AGG, TRACK_ALONE, Steps, Tenant

log = structlog.stdlib.get_logger(__name__)
AGENT_WAIT_S = 30.0  # a resumed job waits this long for its tenants' agents to be heard again
__all__ = ["TRACK_AGG", "TRACK_ALONE", "Steps", "Tenant", "TenantRun"]


class TenantRun:
    """One tenants job in the daemon."""

    def __init__(self, job_id: str, spec: TenantJob, steps: Steps, plugins: Any,
                 save: Callable[[TenantJobState], Awaitable[None]], home: Path) -> None:
        self.job_id, self.spec, self.steps, self.save, self.home = job_id, spec, steps, save, home
        self.aggregator: Aggregator = lookup(plugins.aggregators, spec.aggregation.rule,
                                             "aggregation.rule")(spec.aggregation.params)
        self.tenants = {t.name: Tenant(t) for t in spec.tenants}
        self.state = TenantJobState(job_id=job_id, name=spec.name, state="queued", spec=spec)
        self.similarity: dict[str, dict[str, float]] = {}
        self.inflight: dict[str, str] = {}  # step job id → agent, while it runs

    @classmethod
    def restore(cls, state: TenantJobState, steps: Steps, plugins: Any,
                save: Callable[[TenantJobState], Awaitable[None]], home: Path) -> TenantRun:
        """The job as its stored state left it, to be resumed (`run(resume=True)`)."""
        run = cls(state.job_id, state.spec, steps, plugins, save, home)
        run.state = msgspec.structs.replace(state, attempt=state.attempt + 1)
        run.similarity = dict(state.similarity)
        for spec in state.spec.tenants:
            r = state.results.get(spec.name)
            if r is not None:
                run.tenants[spec.name] = Tenant.restore(spec, r, state.signatures.get(spec.name))
        return run

    # --- plumbing ------------------------------------------------------------------------

    def _base_args(self, t: Tenant) -> dict[str, Any]:
        s = t.spec
        return {"tenant": s.name, "data_path": s.data_path, "test_fraction": s.test_fraction,
                "question_field": s.question_field, "answer_field": s.answer_field,
                "split_seed": self.spec.seed}

    def _step_id(self, t: Tenant, step: str, args: Mapping[str, Any]) -> str:
        key = f"{t.spec.name}/{step}/{args.get('round', 0)}/{args.get('track', '')}"
        if args.get("kind") in ("export", "import"):  # the deploy stage's weight moves
            key += f"/{args['kind']}"
        return f"{self.job_id}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"  # noqa: S324

    async def _step(self, t: Tenant, step: str, args: dict[str, Any],
                    inputs: Mapping[str, tuple[str, int]] | None = None,
                    agent: str = "") -> dict[str, Any]:
        """Run a step on the tenant's agent and count what crossed and what it cost (a
        failure raises). With `agent` (the deploy stage's serving agent), it runs there and
        neither its bytes nor its time are the tenant's."""
        cmd = RunStep(job_id=self._step_id(t, step, args), run_id=self.job_id,
                      step=step, args=args,  # type: ignore[arg-type]
                      inputs={k: v[0] for k, v in (inputs or {}).items()}, source="stratosd")
        own = not agent or agent == t.agent
        where = t.agent if own else agent
        if own:
            t.bytes["to_agent"] += len(encode(cmd)) + sum(v[1] for v in (inputs or {}).values())
            t.last_step = step
        if not self.steps.is_up(where):
            raise AgentUnavailable(f"agent {where} of tenant {t.spec.name} is down",
                                   hint="start the agent that holds the tenant's data" if own
                                   else "start the serving agent, or pick another in [deploy]")
        self.inflight[cmd.job_id] = where
        try:
            result, artifacts, secs = await self.steps.run_timed(where, cmd)
        finally:
            self.inflight.pop(cmd.job_id, None)
        if own:
            t.bytes["from_agent"] += len(encode(result))
            usd = t.bill(secs, self.steps.price(where))
            log.debug("tenant_step_metered", tenant=t.spec.name, step=step, seconds=secs,
                      usd=usd, spent_usd=t.spent_usd)
        result["_artifacts"] = artifacts
        return result

    async def _emit(self, name: str, event: Message) -> None:
        await self.steps.publish(subjects.tenant_event(self.job_id, name), event)

    def _statuses(self) -> dict[str, Any]:
        return {n: t.status() for n, t in self.tenants.items()}

    async def _drop(self, t: Tenant, exc: BaseException) -> None:
        """The tenant leaves the job; the event says why and who is left."""
        lost = isinstance(exc, AgentUnavailable)
        reason = exc.message if isinstance(exc, StratosError) else f"{type(exc).__name__}: {exc}"
        t.state, t.dropped_at = ("lost" if lost else "failed"), self.state.stage
        t.error = f"{t.last_step}: {reason}" if t.last_step else reason
        left = sorted(n for n, o in self.tenants.items() if o.alive)
        if isinstance(exc, StratosError):
            log.warning("tenant_dropped", tenant=t.spec.name, agent_id=t.agent,
                        stage=t.dropped_at, step=t.last_step, error=reason, remaining=left)
        else:
            log.error("tenant_failed", tenant=t.spec.name, exc_info=exc)
        await self._emit("dropped", TenantDropped(
            job_id=self.job_id, tenant=t.spec.name, agent=t.agent, state=t.state,  # type: ignore[arg-type]
            stage=t.dropped_at, reason=t.error, remaining=left, source="stratosd"))
        await self._save()

    async def _each(self, fn: Callable[[Tenant], Awaitable[None]],
                    training: bool = False) -> None:
        """fn for every live tenant (or, training, every one still doing rounds) at once; a
        tenant's failure drops only that tenant."""
        live = [t for t in self.tenants.values() if (t.training if training else t.alive)]
        results = await asyncio.gather(*(fn(t) for t in live), return_exceptions=True)
        for t, res in zip(live, results, strict=True):
            if isinstance(res, asyncio.CancelledError):
                raise res
            if isinstance(res, BaseException) and t.alive:
                await self._drop(t, res)

    async def _save(self, **changes: Any) -> None:
        self.state = msgspec.structs.replace(
            self.state, updated=utc_now(), similarity=self.similarity,
            signatures={n: t.signature for n, t in self.tenants.items() if t.signature},
            results={n: t.result() for n, t in self.tenants.items()}, **changes)
        await self.save(self.state)

    async def _stage(self, stage: str, **changes: Any) -> None:
        await self._save(stage=stage, **changes)
        if not stage.startswith("round-") and "state" not in changes:
            await self._emit("stage_started", TenantStageStarted(
                job_id=self.job_id, stage=stage, tenants=self._statuses(), source="stratosd"))

    # --- the job -------------------------------------------------------------------------

    def stages(self) -> list[str]:
        """Every stage in order (a resumed job starts at its stored one)."""
        rounds = [f"round-{r}" for r in range(1, self.spec.aggregation.rounds + 1)]
        deploy = ["deploy"] if self.spec.deploy.enabled else []
        return ["agents", "signature", "select", *rounds, "evaluate", *deploy]

    async def run(self, resume: bool = False) -> TenantJobState:
        """Every stage from the first (or, resuming, from the stored one); the final state
        (failed with the reason when no tenant is left)."""
        order = self.stages()
        start = order.index(self.state.stage) if resume and self.state.stage in order else 0
        with structlog.contextvars.bound_contextvars(job_id=self.job_id):
            try:
                if resume:
                    await self._resumed(order[start])
                else:
                    await self._save(state="running")
                for stage in order[start:]:
                    await self._run_stage(stage)
                self._check_someone_left()
                from stratosd.tenants.report import write_report

                paths = write_report(self.home / "tenants" / self.job_id, self._final())
                await self._stage("report", state="completed", report_paths=paths)
                await self._emit("completed", TenantJobCompleted(
                    job_id=self.job_id, tenants=self._statuses(), report_paths=paths,
                    dropped=sorted(n for n, t in self.tenants.items() if not t.alive),
                    source="stratosd"))
            except StratosError as exc:
                log.warning("tenant_job_failed", error=exc.message)
                await self._failed(exc.message, exc.hint)
            except Exception as exc:  # noqa: BLE001 - job boundary
                log.error("tenant_job_crashed", exc_info=True)
                await self._failed(f"{type(exc).__name__}: {exc}", "report this as a bug")
        return self.state

    async def _failed(self, message: str, hint: str) -> None:
        await self._save(state="failed", error=f"{message} (hint: {hint})")
        await self._emit("failed", TenantJobFailed(
            job_id=self.job_id, stage=self.state.stage, message=message, hint=hint,
            tenants=self._statuses(), source="stratosd"))

    async def _resumed(self, stage: str) -> None:
        """Wait for the live tenants' agents to be heard again, then say where it resumes."""
        log.info("tenant_job_resumed", stage=stage, attempt=self.state.attempt)
        deadline = time.monotonic() + AGENT_WAIT_S
        while time.monotonic() < deadline and not all(
                self.steps.is_up(t.agent) for t in self.tenants.values() if t.alive and t.agent):
            await asyncio.sleep(0.5)
        await self._save(state="running")
        await self._emit("resumed", TenantJobResumed(job_id=self.job_id, stage=stage,
                                                     tenants=self._statuses(),
                                                     source="stratosd"))

    async def _run_stage(self, stage: str) -> None:
        if stage.startswith("round-"):
            await self._round(int(stage.removeprefix("round-")))
            return
        await self._stage(stage)
        if stage == "agents":
            for t in self.tenants.values():
                t.agent = next((a for a in t.spec.agents if self.steps.is_up(a)), "")
                if t.alive and not t.agent:
                    await self._drop(t, AgentUnavailable(f"none of {t.spec.agents} is up"))
        elif stage == "signature":
            await self._each(self._signature)
            sigs = [t.signature for t in self.tenants.values() if t.signature and t.alive]
            self.similarity = similarity.similarity_matrix(sigs)
        elif stage == "select":
            await self._each(self._select)
        elif stage == "evaluate":
            await self._each(self._evaluate)
        elif stage == "deploy":
            from stratosd.tenants.deploy import deploy_endpoints

            self._check_someone_left()
            await deploy_endpoints(self)

    def _check_someone_left(self) -> None:
        if not any(t.alive for t in self.tenants.values()):
            raise ConfigError("every tenant failed or was lost",
                              hint="see each tenant's error in the job state")

    def _final(self) -> TenantJobState:
        return msgspec.structs.replace(
            self.state, similarity=self.similarity,
            results={n: t.result() for n, t in self.tenants.items()})

    async def _signature(self, t: Tenant) -> None:
        res = await self._step(t, "tenant_signature", self._base_args(t))
        t.signature = msgspec.convert(res["signature"], TenantSignature)
        t.bytes["signature"] = len(encode(res["signature"]))

    async def _select(self, t: Tenant) -> None:
        if t.pick is not None:  # resumed after it was chosen
            return
        st, agg = self.spec.students, self.spec.aggregation
        args = {**self._base_args(t), "candidates": st.candidates, "measure": st.measure,
                "probe_size": st.probe_size, "fit_steps": st.fit_steps, "lora_r": agg.lora_r,
                "learning_rate": agg.learning_rate, "params": agg.params,
                "seed": self.spec.seed, "trainer": self.spec.trainer}
        if len(st.candidates) == 1 and st.fit_steps == 0 and not t.spec.limits.max_latency_ms:
            args["measure"] = []  # nothing to choose between: count it, measure it
        res = await self._step(t, "tenant_probe", args)
        points = [msgspec.convert(p, CandidatePoint) for p in res["points"]]
        measured = [p for p in points if not p.predicted]
        points = [p if not p.predicted else selection.predict(measured, p.model, p.params)
                  for p in points]
        verdicts = self._budget(t, points)
        over = {m: budget.why_over(b) for m, b in verdicts.items() if not b.fits}
        t.pick = selection.choose(t.spec.name, points, t.spec.limits, st.weights, st.rule,
                                  self.spec.seed, over_budget=over)
        t.student = t.pick.chosen
        t.budget = verdicts.get(t.student)

    def _budget(self, t: Tenant, points: list[CandidatePoint]) -> dict[str, Any]:
        """budget_usd against the core cost model, per candidate (none when no budget)."""
        limit = t.spec.limits.budget_usd
        if limit is None:
            return {}
        costs = self.steps.costs
        book = costs.book if costs is not None else EfficiencyBook()
        verdicts = budget.check(self.spec, limit, {p.model: p.params for p in points},
                                t.signature, self.steps.offer(t.agent), book,
                                rounds_left=self.spec.aggregation.rounds)
        for v in verdicts.values():
            log.info("tenant_budget_checked", tenant=t.spec.name, student=v.student,
                     estimate_usd=v.estimate_usd, budget_usd=v.budget_usd, fits=v.fits)
        return verdicts

    async def _budget_boundary(self, t: Tenant, r: int) -> None:
        """Before round r: stop the tenant's rounds when its measured spend, the next round
        and its evaluation would exceed budget_usd (it keeps what it has and is evaluated)."""
        limit = t.spec.limits.budget_usd
        if limit is None:
            return
        costs = self.steps.costs
        book = costs.book if costs is not None else EfficiencyBook()
        params = next((p.params for p in (t.pick.points if t.pick else [])
                       if p.model == t.student), 0)
        try:
            offer = self.steps.offer(t.agent)
        except AgentUnavailable:
            return  # its next step finds the agent gone and drops the tenant
        check = budget.next_round(self.spec, limit, t.spent_usd, t.round_usd, t.student,
                                  t.signature, offer, book, params)
        log.info("tenant_budget_metered", tenant=t.spec.name, round=r, fits=check.fits,
                 spent_usd=round(t.spent_usd, 6), projected_usd=round(check.projected_usd, 6),
                 budget_usd=limit)
        if check.fits:
            return
        t.stopped_at = f"round-{r}"
        t.stop_reason = f"budget: {check.reason}"
        await self._emit("budget_stopped", TenantBudgetStopped(
            job_id=self.job_id, tenant=t.spec.name, round=r,
            spent_usd=round(check.spent_usd, 6), projected_usd=round(check.projected_usd, 6),
            budget_usd=limit, reason=t.stop_reason, source="stratosd"))
        await self._save()

    async def _round(self, r: int) -> None:
        agg = self.spec.aggregation
        sends = self.aggregator.sends
        t0 = time.monotonic()
        await self._stage(f"round-{r}")
        for t in self.tenants.values():
            if t.training and t.spec.limits.budget_usd is not None:
                await self._budget_boundary(t, r)
        if not any(t.training for t in self.tenants.values()):
            log.info("tenant_round_skipped", round=r, reason="no tenant left to train")
            return
        await self._emit("round_started", TenantRoundStarted(
            job_id=self.job_id, round=r, rounds=agg.rounds, tenants=self._statuses(),
            source="stratosd"))
        before = {n: t.spent_usd for n, t in self.tenants.items()}

        async def train(t: Tenant) -> None:
            common = {**self._base_args(t), "model": t.student, "round": r,
                      "steps": agg.local_steps, "lora_r": agg.lora_r,
                      "learning_rate": agg.learning_rate, "params": agg.params,
                      "seed": self.spec.seed, "trainer": self.spec.trainer}
            res = await self._step(t, "tenant_train", {**common, "track": TRACK_AGG,
                                                         "send": sends})
            t.update = res
            if self.spec.alone_baseline:
                await self._step(t, "tenant_train", {**common, "track": TRACK_ALONE,
                                                       "send": "none", "apply_own": True})

        await self._each(train, training=True)
        groups = similarity.group_by_student(
            {n: (t.student, agg.lora_r) for n, t in self.tenants.items() if t.training})
        with tempfile.TemporaryDirectory(prefix="stratos-tenants-") as tmp:
            for group, members in groups.items():
                await self._mix_group(r, group, members, Path(tmp))
        for n, t in self.tenants.items():
            if t.training:
                t.rounds_done = r
                t.round_usd = t.spent_usd - before.get(n, 0.0)
        await self._save()
        await self._emit("round_completed", TenantRoundCompleted(
            job_id=self.job_id, round=r, rounds=agg.rounds, tenants=self._statuses(),
            weights={n: dict(t.weights) for n, t in self.tenants.items() if t.training},
            duration_s=round(time.monotonic() - t0, 3), source="stratosd"))

    async def _load_update(self, t: Tenant, tmp: Path) -> dict[str, Any]:
        res = t.update
        if self.aggregator.sends == "importance":
            t.bytes["updates"] += len(encode(res.get("importance", {})))
            return {m: np.asarray(v) for m, v in res["importance"].items()}
        key = next(iter(res["_artifacts"].values()))
        path = await self.steps.bus.get_artifact(key, tmp / f"{t.spec.name}-update.npz")
        size = path.stat().st_size
        t.bytes["from_agent"] += size
        t.bytes["updates"] += size
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    async def _mix_group(self, r: int, group: str, members: list[str], tmp: Path) -> None:
        agg = self.spec.aggregation
        updates: dict[str, dict[str, Any]] = {}
        for name in members:
            updates[name] = await self._load_update(self.tenants[name], tmp)
        names = sorted(updates)
        if agg.weighting == "uniform":
            weights = similarity.uniform_weights(names)
        else:
            weights = similarity.softmax_weights(self.similarity, names, agg.temperature)
        mixes = await asyncio.to_thread(self.aggregator.aggregate, updates, weights)
        for name in names:
            t = self.tenants[name]
            t.weights, t.group = dict(weights[name]), group
        returns = self.aggregator.returns

        async def apply(t: Tenant) -> None:
            if t.spec.name not in mixes:
                return
            args = {"tenant": t.spec.name, "model": t.student, "track": TRACK_AGG, "round": r,
                    "kind": returns, "keep": agg.keep_ranks}
            if returns == "importance":
                mixed = {m: [round(float(x), 6) for x in np.asarray(v)]
                         for m, v in mixes[t.spec.name].items()}
                t.bytes["mixes"] += len(encode(mixed))
                await self._step(t, "tenant_apply", {**args, "importance": mixed})
                return
            path = tmp / f"mix-{t.spec.name}-r{r}.npz"
            arrays: dict[str, Any] = {m: np.asarray(v, dtype=np.float32)
                                      for m, v in mixes[t.spec.name].items()}
            with path.open("wb") as fh:
                np.savez(fh, **arrays)
            key = artifact_key(self.job_id, path.name)
            await self.steps.bus.put_artifact(key, path)
            size = path.stat().st_size
            t.bytes["mixes"] += size
            await self._step(t, "tenant_apply", args, inputs={"mix": (key, size)})

        await self._each(apply, training=True)

    async def _evaluate(self, t: Tenant) -> None:
        tracks = [TRACK_AGG] + ([TRACK_ALONE] if self.spec.alone_baseline else [])
        for track in tracks:
            res = await self._step(t, "tenant_evaluate", {
                **self._base_args(t), "model": t.student, "track": track,
                "limit": self.spec.eval_limit, "seed": self.spec.seed})
            t.accuracy[track] = float(res["accuracy"])
            t.n_test = int(res["n"])
            if track == TRACK_AGG:
                t.adapter = f"{t.agent}:{res['model']}"
