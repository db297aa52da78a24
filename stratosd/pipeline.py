"""The run state machine: one stage at a time, each persisted to KV and announced as an event."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog

from schemas import subjects
from schemas.base import Message, new_id, utc_now
from schemas.commands import RunInfo
from schemas.events import (
    JobProgress,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunProgress,
    RunStageCompleted,
    RunStageStarted,
    RunSubmitted,
)
from schemas.specs import RunSpec
from stratosd.errors import (
    AgentUnavailable,
    Conflict,
    JobFailed,
    NotFound,
    StratosError,
)
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
RETRYABLE = (AgentUnavailable, JobFailed)
StageFn = Callable[["StageRun"], Awaitable[dict[str, Any]]]


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
    ) -> None:
        self.store = store
        self.stages = stages
        self.publish = publish
        self.retries = retries
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.live: dict[str, StageRun] = {}
        self.job_run: dict[str, tuple[str, str]] = {}

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
        self.tasks[run_id] = asyncio.create_task(self._drive(run_id), name=f"run-{run_id}",
                                                 context=contextvars.Context())

    async def resume_all(self) -> list[str]:
        """Restart every queued/running run from its stored stage."""
        resumed = []
        for run in await self.store.list():
            if run.state in ("queued", "running"):
                log.info("run_resumed", run_id=run.run_id, stage=run.stage)
                self.start(run.run_id)
                resumed.append(run.run_id)
        return resumed

    async def cancel(self, run_id: str) -> RunInfo:
        """Cancel a run: stop its task (the stage cancels its agent job) and mark it."""
        run = await self.store.get(run_id)
        if run.state in ("completed", "failed", "cancelled"):
            raise Conflict(f"run {run_id} already {run.state}", hint="nothing to cancel")
        task = self.tasks.get(run_id)
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        run = await self.store.get(run_id)
        run = await self.store.save(run, state="cancelled")
        await self.publish(subjects.run_event(run_id, "cancelled"),
                           RunCancelled(run_id=run_id, stage=run.stage, source="stratosd"))
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

    async def _drive(self, run_id: str) -> None:
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            try:
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
            while True:
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
                        if attempt > self.retries:
                            await self._fail(run, stage, exc)
                            return
                        log.warning("stage_retry", attempt=attempt, error=exc.message)
                        await asyncio.sleep(min(30.0, 2.0**attempt))  # backoff before retrying
                        attempt += 1
                        continue
                    except StratosError as exc:
                        run = await self.store.get(run_id)
                        await self._fail(run, stage, exc)
                        return
                    duration = time.monotonic() - t0
                    run = await self.store.get(run_id)
                    run = await self.store.save(run, results={**run.results, stage: result})
                    await self.publish(
                        subjects.run_event(run_id, "stage_completed"),
                        RunStageCompleted(run_id=run_id, stage=stage,
                                          result=msgspec.to_builtins(result),
                                          duration_s=round(duration, 3), source="stratosd"))
                    log.info("stage_completed", duration_s=round(duration, 2))
                    break
        run = await self.store.save(run, state="completed", stage="done")
        summary = dict(run.results.get("report", {}))
        await self.publish(subjects.run_event(run_id, "completed"),
                           RunCompleted(run_id=run_id, summary=summary, source="stratosd"))
        log.info("run_completed")

    async def _fail(self, run: RunInfo, stage: str, exc: StratosError) -> None:
        error = {"code": exc.code, "message": exc.message, "hint": exc.hint}
        if exc.field:
            error["field"] = exc.field
        await self.store.save(run, state="failed", error=error)
        await self.publish(subjects.run_event(run.run_id, "failed"),
                           RunFailed(run_id=run.run_id, stage=stage, code=exc.code,
                                     message=exc.message, hint=exc.hint, source="stratosd"))
        log.warning("run_failed", stage=stage, code=exc.code, error=exc.message)

    async def stop(self) -> None:
        """Cancel run tasks without marking runs (they resume on the next start)."""
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
