"""The run state machine: one stage at a time, each persisted to KV and announced as an event."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from schemas import subjects
from schemas.base import Message, new_id, utc_now
from schemas.commands import RunInfo
from schemas.events import (
    JobProgress,
    RunBudgetExhausted,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunProgress,
    RunResumed,
    RunStageCompleted,
    RunStageStarted,
    RunSubmitted,
)
from schemas.specs import RunSpec
from stratosd.artifacts.base import TransferInterrupted
from stratosd.degrade import Degradation, next_degradation, nothing_left
from stratosd.errors import (
    AgentUnavailable,
    Conflict,
    Infeasible,
    JobFailed,
    NotFound,
    OutOfMemory,
    StratosError,
    reported_code,
)
from stratosd.resume import apply_overrides, resume_hint
from stratosd.store import RunStore

log = structlog.stdlib.get_logger(__name__)

STAGES: tuple[str, ...] = (
    "select_server",
    "probe_teachers",
    "select_student",
    "choose_strategy",
    "synthesize",
    "train",
    "evaluate",
    "deploy",
    "report",
)
# transient failures retry; a permanent one (JobRejected, ConfigError, ...) fails the run at
# once; OutOfMemory degrades the stage's settings first (see next_degradation)
# a bus or store outage in the daemon's own stage code (e.g. the checkpoint lookup) is
# transient too: the connection comes back and the stage is tried again
RETRYABLE = (AgentUnavailable, JobFailed, TransferInterrupted)
# A lost agent (killed, frozen, restarting, not answering) is retried this many times, with a
# backoff up to 30 s, apart from the stage's retries: the fleet needs seconds to notice that an
# agent is gone and a restart takes longer, so the stage's few quick retries would all meet the
# same dead agent (seen in bench/bench_chaos.py) and fail a run a minute's wait would save.
AGENT_RETRIES = 8
# states no cancel may overwrite
FINAL = ("completed", "failed", "cancelled")
# a resume takes these up again; "cancelled" too: cancelling keeps every result and artifact
RESUMABLE = ("failed", "stopped", "cancelled")
StageFn = Callable[["StageRun"], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class BudgetVerdict:
    """Starting the next stage would exceed the run's budget (all amounts in USD)."""

    budget_usd: float  # the run's constraints.budget_usd
    spent_usd: float  # measured so far
    next_usd: float  # estimated cost of the rest of the run, from this stage on
    message: str = ""  # optional detail from the cost model (what the estimate is made of)


BudgetCheck = Callable[[RunInfo, str], Awaitable[BudgetVerdict | None]]


class StageRun:
    """What a stage function sees: the run, the daemon's services, and a progress callback."""

    def __init__(self, pipeline: Pipeline, run: RunInfo, stage: str, attempt: int) -> None:
        self.pipeline = pipeline
        self.run = run
        self.stage = stage
        self.attempt = attempt

    @property
    def spec(self) -> RunSpec:
        """The user's spec."""
        return self.run.spec

    @property
    def run_id(self) -> str:
        """The run id."""
        return self.run.run_id

    def result(self, stage: str) -> dict[str, Any]:
        """An earlier stage's result."""
        return dict(self.run.results.get(stage, {}))

    async def remember_job(self, key: str, job_id: str) -> None:
        """Persist a job id before sending it, so a restarted daemon finds it."""
        jobs = {**self.run.jobs, key: job_id}
        self.run = await self.pipeline.store.save(self.run, jobs=jobs)

    async def note(self, **progress: Any) -> None:
        """Persist run-level notes (e.g. agents to avoid after a failure)."""
        self.run = await self.pipeline.store.save(self.run,
                                                  progress={**self.run.progress, **progress})


class Pipeline:
    """Runs every stored run to completion; resumes unfinished runs after a restart."""

    def __init__(
        self,
        store: RunStore,
        stages: dict[str, StageFn],
        publish: Callable[[str, Message], Awaitable[None]],
        *,
        retries: int = 2,
        backoff_s: float = 2.0,
        budget_check: BudgetCheck | None = None,
        agent_retries: int = AGENT_RETRIES,
    ) -> None:
        self.store = store
        self.stages = stages
        self.publish = publish
        self.retries = retries
        self.agent_retries = agent_retries
        self.backoff_s = backoff_s
        # awaited before every stage attempt (a safe point); a verdict stops the run there
        self.budget_check = budget_check
        self.tasks: dict[str, asyncio.Task[None]] = {}  # running runs only
        self.live: dict[str, StageRun] = {}
        self._ending: set[str] = set()  # runs whose task is writing their end state
        self._settling: asyncio.Future[None] | None = None  # see _fleet_settled

    async def submit(self, spec: RunSpec, run_id: str | None = None) -> RunInfo:
        """Store a new run and start it; the same run_id twice returns the existing run."""
        run_id = run_id or new_id()
        try:
            return await self.store.get(run_id)
        except NotFound:
            pass
        now = utc_now()
        run = RunInfo(run_id=run_id, name=spec.name, state="queued", stage=STAGES[0],
                      created=now, updated=now, spec=spec)
        try:
            run = await self.store.create(run)
        except Conflict:
            return await self.store.get(run_id)
        await self.publish(subjects.run_event(run_id, "submitted"),
                           RunSubmitted(run_id=run_id, spec=spec, source="stratosd"))
        log.info("run_submitted", run_id=run_id, name=spec.name)
        self.start(run_id)
        return run

    def start(self, run_id: str) -> None:
        """Start (or restart) the run's task."""
        if run_id in self.tasks and not self.tasks[run_id].done():
            return
        # a fresh context: the submit handler's bound log fields must not follow the run
        task = asyncio.create_task(self._drive(run_id), name=f"run-{run_id}",
                                   context=contextvars.Context())
        self.tasks[run_id] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self.tasks.get(run_id) is done:  # a finished run's task is not kept
                del self.tasks[run_id]

        task.add_done_callback(forget)

    @contextlib.contextmanager
    def _writing_end(self, run_id: str) -> Iterator[None]:
        """Mark the run's task as writing its end state: a cancel then waits, never interrupts
        it (so the end state and its event are both written, or neither)."""
        self._ending.add(run_id)
        try:
            yield
        finally:
            self._ending.discard(run_id)

    async def resume_all(self) -> list[str]:
        """Restart every queued/running run from its stored stage (each run first waits for
        the fleet to settle, see _fleet_settled)."""
        self._settling = asyncio.ensure_future(self._fleet_settled())
        resumed = []
        for run in await self.store.list():
            if run.state in ("queued", "running"):
                log.info("run_resumed", run_id=run.run_id, stage=run.stage)
                self.start(run.run_id)
                resumed.append(run.run_id)
        return resumed

    async def cancel(self, run_id: str) -> RunInfo:
        """Cancel a run: stop its task (the stage cancels its agent job) and mark it.

        Atomic against the run's own end: a task already writing its end state is waited for,
        not interrupted, and the state is written only over an unfinished run (revision
        checked), so a run that completed, failed or was cancelled meanwhile stays so
        (Conflict)."""
        run = await self.store.get(run_id)
        _refuse_cancel(run)
        task = self.tasks.get(run_id)
        if task is not None and not task.done():
            if run_id not in self._ending:
                task.cancel()
            await asyncio.wait({task})  # its outcome (cancelled or ended) stays with the task
        for _ in range(5):
            run = await self.store.get(run_id)
            _refuse_cancel(run)
            try:
                run = await self.store.save(run, state="cancelled")
                break
            except Conflict:  # written in between (another cancel, a resume): look again
                continue
        else:
            raise Conflict(f"run {run_id} keeps changing; it was not cancelled",
                           hint=f"try again: stratosctl cancel {run_id}")
        await self.publish(subjects.run_event(run_id, "cancelled"),
                           RunCancelled(run_id=run_id, stage=run.stage, source="stratosd"))
        return run

    async def resume(self, run_id: str, overrides: dict[str, Any]) -> RunInfo:
        """Go on with a failed, stopped or cancelled run from its last completed stage.

        Stages with a stored result are kept and skipped. The stage that did not finish runs
        again with its retries available again; its attempt numbers keep counting upward
        (`attempts_{stage}`), so its jobs get new ids (`{key}#{attempt}`) and never meet the
        failed attempt's job. overrides: dotted spec paths → values, validated before
        anything is written (ConfigError names the path).
        """
        run = await self.store.get(run_id)
        if run.state == "completed":
            raise Conflict(f"run {run_id} already completed: nothing to resume",
                           hint="submit the job again to train anew: stratosctl submit JOB.toml")
        task = self.tasks.get(run_id)
        if task is not None and not task.done() and run.state in RESUMABLE:
            # the run's task has stored its end and is returning; let it
            await asyncio.wait({task}, timeout=10)
            run = await self.store.get(run_id)
        if run.state not in RESUMABLE or (task is not None and not task.done()):
            raise Conflict(f"run {run_id} is already running (stage {run.stage})",
                           hint=f"follow it with `stratosctl watch {run_id}`")
        spec = apply_overrides(run.spec, overrides)
        services = getattr(self, "services", None)
        if services is not None and overrides:
            from stratosd.validate import validate_spec

            validate_spec(spec, services.plugins)
        stage = run.stage if run.stage in STAGES else \
            next((s for s in STAGES if s not in run.results), STAGES[-1])
        # retries count from here; the attempt number itself goes on (new job ids)
        base = int(run.progress.get(f"attempts_{stage}", 0))
        run = await self.store.save(run, spec=spec, state="running", stage=stage, error=None,
                                    progress={**run.progress, f"retry_base_{stage}": base,
                                              f"agents_lost_{stage}": 0})
        await self.publish(subjects.run_event(run_id, "resumed"),
                           RunResumed(run_id=run_id, stage=stage, changed=dict(overrides),
                                      source="stratosd"))
        log.info("run_resumed", run_id=run_id, stage=stage, changed=sorted(overrides),
                 by="operator")
        self.start(run_id)
        return run

    async def on_job_progress(self, event: JobProgress) -> None:
        """Forward a job's progress as run progress (what `stratosctl watch` draws)."""
        stage_run = self.live.get(event.run_id)
        if stage_run is None:
            return
        await self.publish(
            subjects.run_event(event.run_id, "progress"),
            RunProgress(run_id=event.run_id, stage=stage_run.stage, done=event.done,
                        total=event.total, unit=event.unit, message=event.message,
                        metrics=event.metrics, source="stratosd"),
        )

    async def _fleet_settled(self) -> None:
        """Wait until every agent known from before a daemon restart has reported again, each
        at most its heartbeat window. Until then the fleet lists none of them: a run resumed
        (or submitted) in that second would find "no live agent" and fail, as
        bench/bench_chaos.py saw after the daemon was killed."""
        fleet = getattr(getattr(self, "services", None), "fleet", None)
        if fleet is None:
            return
        known = list(fleet.agents)
        try:
            await asyncio.gather(*(fleet.wait_up(agent_id) for agent_id in known))
        except Exception:  # noqa: BLE001 - waiting is a courtesy: the runs go on regardless
            log.warning("fleet_settle_failed", exc_info=True)
        log.info("fleet_settled", known=len(known), up=len(fleet.live()))

    async def _drive(self, run_id: str) -> None:
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            try:
                if self._settling is not None and not self._settling.done():
                    await asyncio.shield(self._settling)
                await self._drive_stages(run_id)
            except asyncio.CancelledError:
                log.info("run_task_cancelled")
                raise
            except Exception:  # noqa: BLE001 - run boundary: never kill the daemon
                log.error("run_crashed", exc_info=True)
                run = await self.store.get(run_id)
                await self._fail(run, run.stage, StratosError("internal error in the daemon",
                                                              hint="see the daemon log"))
            finally:
                self.live.pop(run_id, None)

    async def _drive_stages(self, run_id: str) -> None:
        run = await self.store.get(run_id)
        if run.state == "queued":
            run = await self.store.save(run, state="running")
        start = STAGES.index(run.stage) if run.stage in STAGES else 0
        for stage in STAGES[start:]:
            if stage in run.results:
                continue
            attempt = int(run.progress.get(f"attempts_{stage}", 0)) + 1
            base = int(run.progress.get(f"retry_base_{stage}", 0))
            if reattach(run, stage, attempt - 1, base):
                attempt -= 1  # a daemon restart: the attempt's jobs may still be running
            while True:
                if await self._over_budget(run, stage):
                    return
                run = await self.store.save(
                    run, stage=stage, progress={**run.progress, f"attempts_{stage}": attempt})
                with structlog.contextvars.bound_contextvars(stage=stage):
                    await self.publish(subjects.run_event(run_id, "stage_started"),
                                       RunStageStarted(run_id=run_id, stage=stage,
                                                       attempt=attempt, source="stratosd"))
                    log.info("stage_started", attempt=attempt)
                    t0 = time.monotonic()
                    ctx = StageRun(self, run, stage, attempt)
                    self.live[run_id] = ctx
                    try:
                        result = await self.stages[stage](ctx)
                    except RETRYABLE as exc:
                        run = await self.store.get(run_id)
                        if (again := await self._retry_lost(run, stage, exc, attempt, base)):
                            run, base, attempt = again, base + 1, attempt + 1
                            continue
                        tries = attempt - base  # since the submit or the last resume
                        if tries > self.retries:
                            await self._fail(run, stage, exc)
                            return
                        log.warning("stage_retry", attempt=attempt, error=exc.message)
                        # backoff before retrying
                        await asyncio.sleep(min(30.0, self.backoff_s * 2.0 ** (tries - 1)))
                        attempt += 1
                        continue
                    except OutOfMemory as exc:
                        run = await self.store.get(run_id)
                        step = next_degradation(run, stage, exc.detail)
                        if step is None:
                            await self._fail(run, stage, nothing_left(run, stage, exc))
                            return
                        # a degraded attempt does not use up one of the stage's retries
                        base += 1
                        run = await self._degrade(run, stage, step, base)
                        attempt += 1
                        continue
                    except StratosError as exc:
                        run = await self.store.get(run_id)
                        if (again := await self._retry_lost(run, stage, exc, attempt, base)):
                            run, base, attempt = again, base + 1, attempt + 1
                            continue
                        await self._fail(run, stage, exc)
                        return
                    duration = time.monotonic() - t0
                    run = await self.store.get(run_id)
                    if run.progress.get(f"degradations_{stage}"):  # what the report shows
                        result = {**result, "degradations":
                                  list(run.progress[f"degradations_{stage}"])}
                    run = await self.store.save(run, results={**run.results, stage: result})
                    await self.publish(
                        subjects.run_event(run_id, "stage_completed"),
                        RunStageCompleted(run_id=run_id, stage=stage,
                                          result=msgspec.to_builtins(result),
                                          duration_s=round(duration, 3), source="stratosd"))
                    log.info("stage_completed", duration_s=round(duration, 2))
                    break
        with self._writing_end(run_id):
            run = await self.store.save(run, state="completed", stage="done")
            summary = dict(run.results.get("report", {}))
            await self.publish(subjects.run_event(run_id, "completed"),
                               RunCompleted(run_id=run_id, summary=summary, source="stratosd"))
        log.info("run_completed")

    async def _retry_lost(self, run: RunInfo, stage: str, exc: StratosError, attempt: int,
                          base: int) -> RunInfo | None:
        """If the stage failed because its agent was lost (AgentUnavailable, or every other
        server was busy when the stage looked for another), wait and return the run to retry
        with, the retry base moved up (one of AGENT_RETRIES, not of the stage's retries);
        None otherwise, or when AGENT_RETRIES are used up."""
        lost = _lost(run, stage)
        busy = isinstance(exc, Infeasible) and exc.field == "constraints.busy"
        if not (isinstance(exc, AgentUnavailable) or busy) or lost >= self.agent_retries:
            return None
        wait_s = min(30.0, self.backoff_s * 2.0 ** lost)
        run = await self.store.save(run, progress={**run.progress, f"retry_base_{stage}": base + 1,
                                                   f"agents_lost_{stage}": lost + 1})
        log.warning("stage_retry", attempt=attempt, error=exc.message, agents_lost=lost + 1,
                    retry_in_s=wait_s)
        await asyncio.sleep(wait_s)
        return run

    async def _over_budget(self, run: RunInfo, stage: str) -> bool:
        """Ask the budget check before a stage attempt; on a verdict, stop the run there."""
        if self.budget_check is None:
            return False
        try:
            verdict = await self.budget_check(run, stage)
        except StratosError as exc:  # the check itself says why it cannot decide
            await self._fail(await self.store.get(run.run_id), stage, exc)
            return True
        if verdict is None:
            return False
        await self._stop_for_budget(await self.store.get(run.run_id), stage, verdict)
        return True

    async def _stop_for_budget(self, run: RunInfo, stage: str, verdict: BudgetVerdict) -> None:
        """State "stopped" at stage; results, jobs and artifacts stay for `stratosctl resume`."""
        message = budget_message(stage, verdict)
        hint = resume_hint(run.run_id, verdict.spent_usd, verdict.next_usd)
        with self._writing_end(run.run_id):
            await self.store.save(run, state="stopped", stage=stage,
                                  error={"code": "budget_exhausted", "message": message,
                                         "hint": hint})
            await self.publish(subjects.run_event(run.run_id, "budget_exhausted"),
                               RunBudgetExhausted(run_id=run.run_id, stage=stage,
                                                  budget_usd=verdict.budget_usd,
                                                  spent_usd=verdict.spent_usd,
                                                  next_usd=verdict.next_usd, message=message,
                                                  source="stratosd"))
        log.warning("run_budget_exhausted", stage=stage, budget_usd=verdict.budget_usd,
                    spent_usd=verdict.spent_usd, next_usd=verdict.next_usd)

    async def _fail(self, run: RunInfo, stage: str, exc: StratosError) -> None:
        code = reported_code(exc)  # a child's own code (config, not_found, ...) is kept
        error = {"code": code, "message": exc.message, "hint": exc.hint}
        if exc.field:
            error["field"] = exc.field
        with self._writing_end(run.run_id):
            await self.store.save(run, state="failed", error=error)
            await self.publish(subjects.run_event(run.run_id, "failed"),
                               RunFailed(run_id=run.run_id, stage=stage, code=code,
                                         message=exc.message, hint=exc.hint, source="stratosd"))
        log.warning("run_failed", stage=stage, code=code, error=exc.message)

    async def _degrade(self, run: RunInfo, stage: str, step: Degradation, base: int) -> RunInfo:
        """Apply one out-of-memory degradation to the run and record it."""
        notes = [*run.progress.get(f"degradations_{stage}", []), step.note]
        progress = {**run.progress, f"degradations_{stage}": notes, f"retry_base_{stage}": base}
        changes: dict[str, Any] = {"progress": progress}
        if step.train:
            changes["spec"] = msgspec.structs.replace(run.spec,
                                                      train={**run.spec.train, **step.train})
        if step.student:
            chosen = dict(run.results.get("select_student", {}))
            progress["oom_students"] = [*run.progress.get("oom_students", []),
                                        chosen.get("chosen")]
            chosen.update(chosen=step.student,
                          reason=f"{chosen.get('reason', '')}; then {step.note}".lstrip("; "))
            changes["results"] = {**run.results, "select_student": chosen}
            await self._drop_train_checkpoint(run.run_id)  # another model's: never resume it
        run = await self.store.save(run, **changes)
        log.warning("stage_degraded", degradation=step.note, changed=sorted(step.train),
                    student=step.student)
        await self.publish(subjects.run_event(run.run_id, "progress"),
                           RunProgress(run_id=run.run_id, stage=stage, message=step.note,
                                       source="stratosd"))
        return run

    async def _drop_train_checkpoint(self, run_id: str) -> None:
        services = getattr(self, "services", None)
        if services is None:
            return
        key = f"{run_id}/train-checkpoint.tar"  # what stratosd.stages.train resumes from
        try:
            await services.bus.delete_artifact(key)  # a missing key is no error
        except Exception:  # noqa: BLE001 - the bus may be away; the train job then fails
            log.warning("checkpoint_not_dropped", key=key, exc_info=True)

    async def stop(self) -> None:
        """Cancel run tasks without marking runs (they resume on the next start)."""
        if self._settling is not None:
            self._settling.cancel()
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _lost(run: RunInfo, stage: str) -> int:
    """How many times the stage's agent was lost (see AGENT_RETRIES)."""
    return int(run.progress.get(f"agents_lost_{stage}", 0))


def _refuse_cancel(run: RunInfo) -> None:
    if run.state in FINAL:
        raise Conflict(f"run {run.run_id} already {run.state}", hint="nothing to cancel")


def budget_message(stage: str, verdict: BudgetVerdict) -> str:
    """The plain-words reason a run stopped before stage."""
    text = (f"stopped before {stage}: ${verdict.spent_usd:.2f} of the ${verdict.budget_usd:.2f} "
            f"budget is spent and the rest of the run needs about ${verdict.next_usd:.2f}")
    return f"{text} ({verdict.message})" if verdict.message else text


def reattach(run: RunInfo, stage: str, attempt: int, base: int) -> bool:
    """Whether to re-enter `attempt` instead of starting a new one: the run was in this stage
    when the daemon stopped, the attempt sent jobs, and no `resume` started counting afresh
    (which sets the retry base to the attempt). run_job then finds each job by its key and
    waits for it, or sends it again if its agent lost it."""
    return (attempt > base and run.stage == stage
            and any(k.endswith(f"#{attempt}") for k in run.jobs))
