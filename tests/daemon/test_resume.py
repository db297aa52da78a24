"""Budget stops and `resume`: a real daemon and nats-server; the stages are small real functions.

Every stage "costs" $1 in these tests; the budget check stops a run before a stage that would
take it over constraints.budget_usd.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
import structlog

from schemas import subjects
from schemas.base import decode_or_error
from schemas.commands import CancelRun, ResumeRun, RunInfo, SubmitRun
from schemas.events import (
    EVENT_DECODER,
    RunBudgetExhausted,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunResumed,
    RunStageStarted,
)
from stratosd.errors import JobFailed, RemoteError
from stratosd.pipeline import STAGES, BudgetVerdict, StageRun
from stratosd.resume import apply_overrides
from stratosd.validate import spec_from_data

SPEC: dict[str, Any] = {
    "name": "resume",
    "task": {"name": "mahjong-winning-tiles", "params": {"difficulty": 1}},
    "teachers": [{"backend": "reference", "model": "reference"}],
    "students": [{"model": "config:tiny"}],
}


class FakeStages:
    """Stage functions that record each attempt and remember a job per attempt like run_job."""

    def __init__(self) -> None:
        self.attempts: dict[str, list[int]] = defaultdict(list)
        self.failures: dict[str, int] = {}  # stage → how many calls fail with JobFailed
        self.blocks: dict[str, asyncio.Event] = {}  # stage → wait for this before returning

    def funcs(self) -> dict[str, Callable[[StageRun], Any]]:
        """One function per stage."""
        return {stage: self._make(stage) for stage in STAGES}

    def _make(self, stage: str) -> Callable[[StageRun], Any]:
        async def fn(ctx: StageRun) -> dict[str, Any]:
            self.attempts[stage].append(ctx.attempt)
            # the job key/id rule of stratosd.stages.run_job
            await ctx.remember_job(f"{stage}#{ctx.attempt}", f"{ctx.run_id}-{stage}-{ctx.attempt}")
            if stage in self.blocks:
                await self.blocks[stage].wait()
            if self.failures.get(stage, 0) > 0:
                self.failures[stage] -= 1
                raise JobFailed(f"{stage} job failed on its agent", hint="see the job log")
            return {"stage": stage, "attempt": ctx.attempt}
        return fn


async def dollar_per_stage(run: RunInfo, stage: str) -> BudgetVerdict | None:
    """A real check: each finished stage cost $1; the rest costs $1 a stage."""
    budget = run.spec.constraints.budget_usd
    spent = float(len(run.results))
    if budget is None or spent + 1.0 <= budget:
        return None
    rest = float(len([s for s in STAGES[STAGES.index(stage):] if s not in run.results]))
    return BudgetVerdict(budget_usd=budget, spent_usd=spent, next_usd=rest,
                         message=f"{rest:.0f} stages at $1")


def use_fakes(daemon: Any, *, retries: int = 1, budget: bool = False) -> FakeStages:
    """Point the daemon's pipeline at fake stages (and the $1-a-stage budget check)."""
    fakes = FakeStages()
    daemon.pipeline.stages = fakes.funcs()
    daemon.pipeline.retries = retries
    daemon.pipeline.backoff_s = 0.01
    daemon.pipeline.budget_check = dollar_per_stage if budget else None
    return fakes


class RunEvents:
    """A run's events from JetStream, collected as they come."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.changed = asyncio.Event()

    async def cb(self, msg: Any) -> None:
        """Subscription callback."""
        self.items.append(decode_or_error(EVENT_DECODER, msg.data))
        self.changed.set()

    def of(self, kind: type) -> list[Any]:
        """Events of one type, in order."""
        return [e for e in self.items if isinstance(e, kind)]

    async def until(self, pred: Callable[[], bool], timeout: float = 20) -> None:
        """Wait until pred() holds (checked on each new event)."""
        async def loop() -> None:
            while not pred():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(loop(), timeout)


async def submit(daemon: Any, **over: Any) -> tuple[str, RunEvents]:
    """Submit SPEC (with overrides) and follow its events."""
    spec = spec_from_data({**SPEC, **over})
    reply = await daemon.bus.request(subjects.daemon_cmd("submit"), SubmitRun(spec=spec))
    events = RunEvents()
    await daemon.bus.js.subscribe(subjects.run_events(reply.ref), cb=events.cb,
                                  ordered_consumer=True, stream=subjects.EVENTS_STREAM)
    return str(reply.ref), events


async def resume(daemon: Any, run_id: str, **changes: Any) -> Any:
    """The resume command, as stratosctl sends it."""
    return await daemon.bus.request(subjects.daemon_cmd("resume"),
                                    ResumeRun(run_id=run_id, set=changes))


async def test_budget_stops_at_a_stage_and_resume_goes_on(daemon: Any) -> None:
    fakes = use_fakes(daemon, budget=True)
    with structlog.testing.capture_logs() as logs:
        run_id, events = await submit(daemon, constraints={"budget_usd": 5.0})
        await events.until(lambda: bool(events.of(RunBudgetExhausted)))
    stop = events.of(RunBudgetExhausted)[0]
    assert (stop.stage, stop.budget_usd, stop.spent_usd, stop.next_usd) == ("train", 5, 5, 4)
    assert "$5.00 of the $5.00 budget" in stop.message
    assert any(e["event"] == "run_budget_exhausted" and e["stage"] == "train" for e in logs)
    run = await daemon.store.get(run_id)
    assert (run.state, run.stage) == ("stopped", "train")
    assert list(run.results) == list(STAGES[:5])  # nothing is deleted
    assert len(run.jobs) == 5
    assert run.error is not None and run.error["code"] == "budget_exhausted"
    assert f"stratosctl resume {run_id} --set constraints.budget_usd=10" in run.error["hint"]
    assert "train" not in fakes.attempts  # never started

    # resuming without more budget stops again at the same safe point
    assert (await resume(daemon, run_id)).state == "running"
    await events.until(lambda: len(events.of(RunBudgetExhausted)) == 2)
    assert (await daemon.store.get(run_id)).state == "stopped"

    reply = await resume(daemon, run_id, **{"constraints.budget_usd": 12})
    assert (reply.ref, reply.state) == (run_id, "running")
    await events.until(lambda: bool(events.of(RunCompleted)))
    resumed = events.of(RunResumed)[-1]
    assert resumed.stage == "train" and resumed.changed == {"constraints.budget_usd": 12}
    run = await daemon.store.get(run_id)
    assert run.state == "completed" and run.error is None
    assert run.spec.constraints.budget_usd == 12
    assert {s: a for s, a in fakes.attempts.items()} == {s: [1] for s in STAGES}


async def test_resume_reruns_only_the_failed_stage_with_fresh_retries(daemon: Any) -> None:
    fakes = use_fakes(daemon, retries=1)
    fakes.failures["synthesize"] = 3  # attempts 1, 2 fail (run fails); after resume 3 fails
    run_id, events = await submit(daemon)
    await events.until(lambda: bool(events.of(RunFailed)))
    run = await daemon.store.get(run_id)
    assert (run.state, run.stage, run.error and run.error["code"]) == \
        ("failed", "synthesize", "job_failed")
    assert fakes.attempts["synthesize"] == [1, 2]

    assert (await resume(daemon, run_id)).state == "running"
    await events.until(lambda: bool(events.of(RunCompleted)))
    # attempt 3 failed and was retried: the retries were available again
    assert fakes.attempts["synthesize"] == [1, 2, 3, 4]
    assert all(fakes.attempts[s] == [1] for s in STAGES if s != "synthesize")
    run = await daemon.store.get(run_id)
    assert run.state == "completed" and run.error is None
    ids = [run.jobs[f"synthesize#{n}"] for n in (1, 2, 3, 4)]
    assert len(set(ids)) == 4  # a resumed attempt never meets the failed attempt's job
    assert run.progress["retry_base_synthesize"] == 2
    started = [e.attempt for e in events.of(RunStageStarted) if e.stage == "synthesize"]
    assert started == [1, 2, 3, 4]


async def test_resume_refuses_running_and_completed_runs(daemon: Any) -> None:
    fakes = use_fakes(daemon)
    fakes.blocks["train"] = asyncio.Event()
    run_id, events = await submit(daemon)
    await events.until(lambda: any(e.stage == "train" for e in events.of(RunStageStarted)))
    with pytest.raises(RemoteError) as info:
        await resume(daemon, run_id)
    assert info.value.remote_code == "conflict" and "already running" in info.value.message
    assert f"stratosctl watch {run_id}" in info.value.hint
    fakes.blocks["train"].set()
    await events.until(lambda: bool(events.of(RunCompleted)))
    with pytest.raises(RemoteError) as info:
        await resume(daemon, run_id, **{"constraints.budget_usd": 3})
    assert info.value.remote_code == "conflict" and "already completed" in info.value.message
    assert "stratosctl submit" in info.value.hint
    assert (await daemon.store.get(run_id)).spec.constraints.budget_usd is None


async def test_bad_set_is_refused_naming_the_field(daemon: Any) -> None:
    fakes = use_fakes(daemon, retries=0)
    fakes.failures["select_server"] = 1
    run_id, events = await submit(daemon)
    await events.until(lambda: bool(events.of(RunFailed)))
    before = await daemon.store.get(run_id)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"constraints.budgt": 1}, "budgt"),
        ({"constraints.budget_usd": "lots"}, "Expected"),
        ({"constraints.budget_usd": -1}, ">= 0"),
        ({"seed.x": 1}, "seed is the value 0, not a table"),
        ({"teachers.3.model": "x"}, "teachers has 1 entries"),
        ({"trainer": "magic"}, "unknown trainer"),
        ({"train.max_steps": 5, "constraints.region.x": 1}, "not set"),
    ]
    for changes, words in bad:
        with pytest.raises(RemoteError) as info:
            await resume(daemon, run_id, **changes)
        err = info.value
        assert err.remote_code == "config", changes
        assert words in err.message, (changes, err.message)
        assert err.field in changes or err.field == "trainer", (changes, err.field)
    after = await daemon.store.get(run_id)
    assert after.revision == before.revision and after.state == "failed"  # nothing changed
    assert not events.of(RunResumed)


async def test_a_cancelled_run_can_be_resumed(daemon: Any) -> None:
    fakes = use_fakes(daemon)
    fakes.blocks["train"] = asyncio.Event()
    run_id, events = await submit(daemon)
    await events.until(lambda: any(e.stage == "train" for e in events.of(RunStageStarted)))
    await daemon.bus.request(subjects.daemon_cmd("cancel"), CancelRun(run_id=run_id))
    await events.until(lambda: bool(events.of(RunCancelled)))
    fakes.blocks["train"].set()
    reply = await resume(daemon, run_id, **{"train.max_steps": 7})
    assert reply.state == "running"
    await events.until(lambda: bool(events.of(RunCompleted)))
    run = await daemon.store.get(run_id)
    assert fakes.attempts["train"] == [1, 2] and run.spec.train == {"max_steps": 7}
    assert run.jobs["train#1"] != run.jobs["train#2"]


def test_apply_overrides_paths() -> None:
    spec = spec_from_data({**SPEC, "constraints": {"budget_usd": 5.0}})
    out = apply_overrides(spec, {"constraints.budget_usd": 12, "train.synthesis.n": 3,
                                 "teachers.0.model": "other", "students.0.params.r": 8})
    assert out.constraints.budget_usd == 12.0
    assert out.train == {"synthesis": {"n": 3}}
    assert out.teachers[0].model == "other" and out.students[0].params == {"r": 8}
    assert apply_overrides(spec, {"constraints.budget_usd": None}).constraints.budget_usd is None
    assert apply_overrides(spec, {}) == spec


def test_a_restarted_daemon_reenters_the_attempt_whose_jobs_may_still_run() -> None:
    from datetime import UTC, datetime

    import msgspec

    from schemas.specs import RunSpec
    from stratosd.pipeline import reattach

    now = datetime.now(UTC)
    spec = RunSpec(name="r", task={"name": "mahjong-winning-tiles"},
                   teachers=[{"backend": "reference"}], students=[{"model": "config:tiny"}])
    run = RunInfo(run_id="01jreattach000000000000000", name="r", state="running",
                  stage="train", created=now, updated=now, spec=spec,
                  jobs={"train#2": "j2", "train#2@agent": "cpu-1"},
                  progress={"attempts_train": 2})
    assert reattach(run, "train", 2, base=0)  # the job of attempt 2 may still be running
    assert not reattach(run, "train", 2, base=2)  # `resume` counts afresh: a new attempt
    assert not reattach(run, "evaluate", 2, base=0)  # not the stage it was in
    no_job = msgspec.structs.replace(run, jobs={})
    assert not reattach(no_job, "train", 2, base=0)  # nothing sent: start a new attempt
