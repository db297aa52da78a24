"""Every stage real (daemon + agent in this loop, tiny model): a budget stop before training,
a resume with more budget, a failure after the training job, and a resume that trains again
under a new job id and completes."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import subjects
from schemas.commands import ResumeRun, RunInfo, SubmitRun
from schemas.events import RunBudgetExhausted, RunCompleted, RunFailed
from stratosd.errors import JobFailed
from stratosd.pipeline import BudgetVerdict, StageRun
from stratosd.stages import STAGE_FUNCS
from stratosd.validate import spec_from_data
from tests.daemon.test_resume import RunEvents
from tests.e2e.jobs import tiny_spec

pytestmark = pytest.mark.slow


async def train_costs_1000(run: RunInfo, stage: str) -> BudgetVerdict | None:
    """Training needs a budget of $1000 (whatever the cost model says at submit)."""
    budget = run.spec.constraints.budget_usd or 0.0
    if stage != "train" or budget >= 1000:
        return None
    return BudgetVerdict(budget_usd=budget, spent_usd=1.0, next_usd=999.0)


@pytest.mark.timeout(600)
async def test_stop_resume_fail_resume_with_real_stages(daemon: Any, agent: Any) -> None:
    pipeline = daemon.pipeline
    pipeline.budget_check = train_costs_1000
    pipeline.retries = 0
    failed_once: list[str] = []

    async def train_then_fail_once(ctx: StageRun) -> dict[str, Any]:
        result = await STAGE_FUNCS["train"](ctx)  # the real job runs to completion
        if not failed_once:
            failed_once.append(ctx.run.jobs[f"train#{ctx.attempt}"])
            raise JobFailed("lost the result", hint="resume the run")
        return result

    pipeline.stages = {**STAGE_FUNCS, "train": train_then_fail_once}
    spec = spec_from_data(tiny_spec("resume-real"))
    run_id = (await daemon.bus.request(subjects.daemon_cmd("submit"), SubmitRun(spec=spec))).ref
    events = RunEvents()
    await daemon.bus.js.subscribe(subjects.run_events(run_id), cb=events.cb,
                                  ordered_consumer=True, stream=subjects.EVENTS_STREAM)
    await events.until(lambda: bool(events.of(RunBudgetExhausted)), 300)
    run = await daemon.store.get(run_id)
    assert (run.state, run.stage) == ("stopped", "train")
    dataset = run.results["synthesize"]["artifact"]
    assert dataset and await daemon.bus.has_artifact(dataset)  # kept for the resume

    await daemon.bus.request(subjects.daemon_cmd("resume"),
                             ResumeRun(run_id=run_id, set={"constraints.budget_usd": 1000}))
    await events.until(lambda: bool(events.of(RunFailed)), 300)
    assert (await daemon.store.get(run_id)).state == "failed"

    await daemon.bus.request(subjects.daemon_cmd("resume"), ResumeRun(run_id=run_id))
    await events.until(lambda: bool(events.of(RunCompleted)), 300)
    run = await daemon.store.get(run_id)
    assert run.state == "completed", run.error
    assert run.results["synthesize"]["artifact"] == dataset  # not synthesised again
    assert failed_once == [run.jobs["train#1"]]
    assert run.jobs["train#2"] not in failed_once  # a new job, not the failed attempt's
    assert run.results["train"]["artifact"]
    # every stage's stored result meets its contract (schemas.stages), read back typed
    from schemas.stages import STAGE_RESULTS
    from stratosd.results import stage_result

    for stage, cls in STAGE_RESULTS.items():
        got = stage_result(run, cls)
        assert got is not None, f"{stage} result missing or breaks its contract"
    assert stage_result(run, STAGE_RESULTS["train"]).artifact == run.results["train"]["artifact"]
