"""Test support: a real daemon whose stages are small functions, some of which run real agent
jobs through `stratosd.stages.run_job` (the path every agent stage takes)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from schemas import subjects
from schemas.base import decode_or_error
from schemas.commands import RunInfo, SubmitRun
from schemas.events import EVENT_DECODER, RunCancelled, RunCompleted, RunFailed
from stratosd.pipeline import STAGES, StageRun
from stratosd.stages import run_job
from stratosd.validate import spec_from_data

SPEC: dict[str, Any] = {
    "name": "jobstages",
    "task": {"name": "mahjong-winning-tiles", "params": {"difficulty": 1}, "probe_size": 3},
    "teachers": [{"name": "oracle", "backend": "reference", "model": "reference"}],
    "students": [{"model": "config:tiny"}],
}
JobFn = Callable[[StageRun], Awaitable[dict[str, Any]]]


class Stages:
    """One function per stage: select_server puts the run on `agent_id`; stages in `jobs`
    run their function; the others return at once. Every attempt is recorded."""

    def __init__(self, agent_id: str, jobs: dict[str, JobFn]) -> None:
        self.agent_id = agent_id
        self.jobs = jobs
        self.attempts: dict[str, list[int]] = defaultdict(list)

    def funcs(self) -> dict[str, Callable[[StageRun], Any]]:
        """The pipeline's stage table."""
        return {stage: self._make(stage) for stage in STAGES}

    def _make(self, stage: str) -> Callable[[StageRun], Any]:
        async def fn(ctx: StageRun) -> dict[str, Any]:
            self.attempts[stage].append(ctx.attempt)
            if stage == "select_server":
                await ctx.note(agent_id=self.agent_id)  # where run_job sends its jobs
            if stage in self.jobs:
                return await self.jobs[stage](ctx)
            return {"stage": stage}
        return fn


def install(daemon: Any, jobs: dict[str, JobFn], *, agent_id: str = "gpu-1",
            retries: int = 2) -> Stages:
    """Point the daemon's pipeline at Stages (no budget check, a short backoff)."""
    stages = Stages(agent_id, jobs)
    daemon.pipeline.stages = stages.funcs()
    daemon.pipeline.retries = retries
    daemon.pipeline.backoff_s = 0.01
    daemon.pipeline.budget_check = None
    return stages


async def probe_job(ctx: StageRun) -> dict[str, Any]:
    """A real, quick agent job: the reference teacher answers a probe of the task."""
    args = {"task": {"name": "mahjong-winning-tiles", "params": {"difficulty": 1}},
            "teachers": [{"name": "oracle", "backend": "reference", "model": "reference"}],
            "probe_size": 3, "seed": 0}
    return (await run_job(ctx, "probe", args)).result


async def submit(daemon: Any, **over: Any) -> str:
    """Submit SPEC (with overrides) the way stratosctl does; the run id."""
    spec = spec_from_data({**SPEC, **over})
    reply = await daemon.bus.request(subjects.daemon_cmd("submit"), SubmitRun(spec=spec))
    return str(reply.ref)


async def run_end(daemon: Any, run_id: str, timeout: float = 90) -> tuple[RunInfo, list[Any]]:
    """Wait for the run's end event (replayed from the stream); the stored run and its events."""
    events: list[Any] = []
    ended = asyncio.Event()

    async def cb(msg: Any) -> None:
        event = decode_or_error(EVENT_DECODER, msg.data)
        events.append(event)
        if isinstance(event, RunCompleted | RunFailed | RunCancelled):
            ended.set()

    sub = await daemon.bus.js.subscribe(subjects.run_events(run_id), cb=cb,
                                        ordered_consumer=True, stream=subjects.EVENTS_STREAM)
    try:
        await asyncio.wait_for(ended.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return await daemon.store.get(run_id), events


async def until(pred: Callable[[], bool], timeout: float = 20, interval: float = 0.05) -> None:
    """Wait until pred() holds (in-process state that no event announces)."""
    async def loop() -> None:
        while not pred():
            await asyncio.sleep(interval)
    await asyncio.wait_for(loop(), timeout)
