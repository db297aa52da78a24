"""AsyncIOScheduler with the built-in periodic jobs (liveness, KV flush) plus plugins' jobs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from stratosd.api import PeriodicJob

log = structlog.stdlib.get_logger(__name__)


def _guarded(
    job_id: str, func: Callable[[], Awaitable[object]]
) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        try:
            await func()
        except Exception:  # noqa: BLE001 - each job logs its own failures and runs again
            log.error("periodic_job_failed", job=job_id, exc_info=True)

    return run


def build_scheduler(jobs: list[PeriodicJob]) -> AsyncIOScheduler:
    """A started-later scheduler with each job at max_instances=1, coalesced, jittered."""
    scheduler = AsyncIOScheduler(timezone="UTC")
    for job in jobs:
        scheduler.add_job(
            _guarded(job.id, job.func), IntervalTrigger(seconds=job.seconds, jitter=job.jitter),
            id=job.id, max_instances=1, coalesce=True, replace_existing=True,
        )
    return scheduler
