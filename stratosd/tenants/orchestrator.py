"""A tenants job, stage by stage: signatures → student per tenant → rounds → evaluation → report.

Every piece of work on a tenant's data is a RunStep on that tenant's own agent (the first
live one in its `agents`); the daemon sees only what `schemas.tenants` declares: signatures,
candidate points, per-round updates, results. Each command and each artifact that crosses the
bus for a tenant is counted in its `TenantBytes`. A tenant whose agent is lost (or whose step
fails) leaves the job: the others' rounds go on, re-weighted over who is left.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog

from schemas.base import encode, new_id, utc_now
from schemas.commands import RunStep
from schemas.subjects import artifact_key
from schemas.tenants import (
    CandidatePoint,
    StudentPick,
    TenantBytes,
    TenantJob,
    TenantJobState,
    TenantResult,
    TenantSignature,
    TenantSpec,
)
from stratosd.api import Aggregator
from stratosd.errors import AgentUnavailable, ConfigError, StratosError
from stratosd.plugins import lookup
from stratosd.tenants import selection, similarity

log = structlog.stdlib.get_logger(__name__)
TRACK_AGG, TRACK_ALONE = "agg", "alone"
STEP_TIMEOUT_S = 1800.0


class Steps:
    """What the orchestrator needs from the daemon: run a step on an agent, move artifacts."""

    def __init__(self, bus: Any, dispatch: Any, fleet: Any) -> None:
        self.bus, self.dispatch, self.fleet = bus, dispatch, fleet

    def is_up(self, agent_id: str) -> bool:
        """True while the agent sends heartbeats."""
        return bool(self.fleet.is_up(agent_id))

    async def run(self, agent_id: str, step: RunStep) -> tuple[dict[str, Any], dict[str, str]]:
        """Send the step, wait for it; (result, artifacts) or the job's StratosError."""
        await self.dispatch.send(agent_id, step)
        outcome = await self.dispatch.wait(step.job_id, timeout=STEP_TIMEOUT_S)
        self.dispatch.raise_for(step.job_id, outcome)
        return dict(outcome.result), dict(outcome.artifacts)


@dataclass
class Tenant:
    """A tenant while its job runs."""

    spec: TenantSpec
    agent: str = ""
    student: str = ""
    pick: StudentPick | None = None
    signature: TenantSignature | None = None
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("to_agent", "from_agent", "signature", "updates", "mixes"), 0))
    state: str = "ok"
    error: str = ""
    rounds_done: int = 0
    weights: dict[str, float] = field(default_factory=dict)
    group: str = ""
    accuracy: dict[str, float] = field(default_factory=dict)
    n_test: int = 0
    adapter: str = ""
    update: dict[str, Any] = field(default_factory=dict)  # this round's tenant_train result

    @property
    def alive(self) -> bool:
        """Still in the job."""
        return self.state == "ok"

    def result(self) -> TenantResult:
        """Its section of the report."""
        raw = self.signature.raw_bytes if self.signature else 0
        return TenantResult(
            tenant=self.spec.name, agent=self.agent, student=self.student, adapter=self.adapter,
            pick=self.pick, accuracy_alone=self.accuracy.get(TRACK_ALONE),
            accuracy_aggregated=self.accuracy.get(TRACK_AGG), n_test=self.n_test,
            weights={k: round(v, 4) for k, v in self.weights.items()}, group=self.group,
            rounds_done=self.rounds_done, bytes=TenantBytes(raw_data=raw, **self.bytes),
            state=self.state, error=self.error)  # type: ignore[arg-type]


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

    # --- plumbing ------------------------------------------------------------------------

    def _base_args(self, t: Tenant) -> dict[str, Any]:
        s = t.spec
        return {"tenant": s.name, "data_path": s.data_path, "test_fraction": s.test_fraction,
                "question_field": s.question_field, "answer_field": s.answer_field,
                "split_seed": self.spec.seed}

    async def _step(self, t: Tenant, step: str, args: dict[str, Any],
                    inputs: Mapping[str, tuple[str, int]] | None = None) -> dict[str, Any]:
        """Run a step on the tenant's agent; count what crossed; a failure drops the tenant."""
        cmd = RunStep(job_id=new_id(), run_id=self.job_id, step=step, args=args,  # type: ignore[arg-type]
                      inputs={k: v[0] for k, v in (inputs or {}).items()}, source="stratosd")
        t.bytes["to_agent"] += len(encode(cmd)) + sum(v[1] for v in (inputs or {}).values())
        try:
            if not self.steps.is_up(t.agent):
                raise AgentUnavailable(f"agent {t.agent} of tenant {t.spec.name} is down",
                                       hint="start the agent that holds the tenant's data")
            result, artifacts = await self.steps.run(t.agent, cmd)
        except StratosError as exc:
            t.state = "lost" if isinstance(exc, AgentUnavailable) else "failed"
            t.error = f"{step}: {exc.message}"
            log.warning("tenant_dropped", job_id=self.job_id, tenant=t.spec.name,
                        agent_id=t.agent, step=step, error=exc.message)
            raise
        t.bytes["from_agent"] += len(encode(result))
        result["_artifacts"] = artifacts
        return result

    async def _each(self, fn: Callable[[Tenant], Awaitable[None]]) -> None:
        """fn for every live tenant at once; a tenant's failure stays its own."""
        live = [t for t in self.tenants.values() if t.alive]
        results = await asyncio.gather(*(fn(t) for t in live), return_exceptions=True)
        for t, res in zip(live, results, strict=True):
            if isinstance(res, BaseException) and not isinstance(res, StratosError):
                t.state, t.error = "failed", f"{type(res).__name__}: {res}"
                log.error("tenant_failed", job_id=self.job_id, tenant=t.spec.name,
                          exc_info=res)

    async def _stage(self, stage: str, **changes: Any) -> None:
        self.state = msgspec.structs.replace(
            self.state, stage=stage, updated=utc_now(), similarity=self.similarity,
            results={n: t.result() for n, t in self.tenants.items()}, **changes)
        await self.save(self.state)

    # --- the job -------------------------------------------------------------------------

    async def run(self) -> TenantJobState:
        """Every stage; the final state (failed with the reason when nothing is left)."""
        with structlog.contextvars.bound_contextvars(job_id=self.job_id):
            try:
                await self._stage("agents", state="running")
                for t in self.tenants.values():
                    t.agent = next((a for a in t.spec.agents if self.steps.is_up(a)), "")
                    if not t.agent:
                        t.state, t.error = "lost", f"none of {t.spec.agents} is up"
                await self._stage("signature")
                await self._each(self._signature)
                sigs = [t.signature for t in self.tenants.values() if t.signature]
                self.similarity = similarity.similarity_matrix(sigs)
                await self._stage("select")
                await self._each(self._select)
                for r in range(1, self.spec.aggregation.rounds + 1):
                    await self._stage(f"round-{r}")
                    await self._round(r)
                await self._stage("evaluate")
                await self._each(self._evaluate)
                self._check_someone_left()
                from stratosd.tenants.report import write_report

                paths = write_report(self.home / "tenants" / self.job_id, self._final())
                await self._stage("report", state="completed", report_paths=paths)
            except StratosError as exc:
                log.warning("tenant_job_failed", error=exc.message)
                await self._stage(self.state.stage, state="failed",
                                  error=f"{exc.message} (hint: {exc.hint})")
            except Exception as exc:  # noqa: BLE001 - job boundary
                log.error("tenant_job_crashed", exc_info=True)
                await self._stage(self.state.stage, state="failed",
                                  error=f"{type(exc).__name__}: {exc}")
        return self.state

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
        t.pick = selection.choose(t.spec.name, points, t.spec.limits, st.weights, st.rule,
                                  self.spec.seed)
        t.student = t.pick.chosen

    async def _round(self, r: int) -> None:
        agg = self.spec.aggregation
        sends = self.aggregator.sends

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

        await self._each(train)
        groups = similarity.group_by_student(
            {n: (t.student, agg.lora_r) for n, t in self.tenants.items() if t.alive})
        with tempfile.TemporaryDirectory(prefix="stratos-tenants-") as tmp:
            for group, members in groups.items():
                await self._mix_group(r, group, members, Path(tmp))
        for t in self.tenants.values():
            if t.alive:
                t.rounds_done = r

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

        await self._each(apply)

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
