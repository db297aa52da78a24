"""A stage whose agent is lost waits and retries apart from the stage's own retries
(stratosd.pipeline.AGENT_RETRIES): a few quick retries against an agent that is restarting, or
frozen and not yet declared down, must not fail the run; and runs resumed after a daemon
restart wait until the agents known before it have reported (both seen in
bench/bench_chaos.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from schemas.base import new_id, utc_now
from schemas.commands import RunInfo
from stratosd.errors import AgentUnavailable, Infeasible, JobFailed
from stratosd.pipeline import STAGES, StageRun
from stratosd.validate import spec_from_data
from tests.conftest import start_agent
from tests.daemon.jobstages import SPEC, install, run_end, submit, until


def failing(errors: list[Exception]) -> Any:
    """A stage function that raises each of errors in turn, then succeeds."""
    async def fn(ctx: StageRun) -> dict[str, Any]:
        if errors:
            raise errors.pop(0)
        return {"ok": True}
    return fn


async def test_a_lost_agent_uses_none_of_the_stages_retries(daemon: Any) -> None:
    lost = [AgentUnavailable(f"agent gpu-1 did not take job j-{i}: nobody serves it")
            for i in range(5)]
    busy = Infeasible("every server is busy training another run", field="constraints.busy")
    stages = install(daemon, {"train": failing([*lost, busy])}, retries=0)
    run, _ = await run_end(daemon, await submit(daemon))
    assert run.state == "completed", run.error
    assert stages.attempts["train"] == [1, 2, 3, 4, 5, 6, 7]
    assert run.progress["agents_lost_train"] == 6


async def test_lost_agent_retries_run_out_and_the_stages_retries_follow(daemon: Any) -> None:
    daemon.pipeline.agent_retries = 2
    errors: list[Exception] = [AgentUnavailable(f"agent gpu-1 is gone ({i})") for i in range(9)]
    stages = install(daemon, {"train": failing(errors)}, retries=1)
    run, _ = await run_end(daemon, await submit(daemon))
    assert run.state == "failed" and (run.error or {})["code"] == "agent_unavailable"
    assert stages.attempts["train"] == [1, 2, 3, 4]  # 2 for lost agents, then 1 + 1 retry


async def test_a_failed_job_keeps_the_stages_retries(daemon: Any) -> None:
    errors: list[Exception] = [JobFailed("train job crashed") for _ in range(3)]
    stages = install(daemon, {"train": failing(errors)}, retries=1)
    run, _ = await run_end(daemon, await submit(daemon))
    assert run.state == "failed" and (run.error or {})["code"] == "job_failed"
    assert stages.attempts["train"] == [1, 2]
    assert "agents_lost_train" not in run.progress


async def test_an_infeasible_run_that_is_not_waiting_for_a_server_fails_at_once(
        daemon: Any) -> None:
    nothing_fits = Infeasible("no server fits the budget", field="constraints.budget_usd")
    stages = install(daemon, {"synthesize": failing([nothing_fits])}, retries=2)
    run, _ = await run_end(daemon, await submit(daemon))
    assert run.state == "failed" and (run.error or {})["code"] == "infeasible"
    assert stages.attempts["synthesize"] == [1]


async def test_a_run_resumed_after_a_restart_waits_for_the_known_agents(
        daemon: Any, nats_url: str, tmp_path: Path) -> None:
    agent, task = await start_agent(nats_url, tmp_path, "gpu-1", interval=0.5)
    try:
        await until(lambda: daemon.fleet.is_up("gpu-1"))
        seen: list[bool] = []

        async def select_server(ctx: StageRun) -> dict[str, Any]:
            seen.append(daemon.fleet.is_up("gpu-1"))
            return {}

        install(daemon, {"select_server": select_server})
        now = utc_now()
        run = await daemon.store.create(RunInfo(
            run_id=new_id(), name="restarted", state="running", stage=STAGES[0], created=now,
            updated=now, spec=spec_from_data(SPEC)))
        # what a restarted daemon knows: the agent from KV, down until it reports again
        state = daemon.fleet.agents["gpu-1"]
        state.status, state.last_seen = "down", float("-inf")
        daemon.fleet._table = None
        assert await daemon.pipeline.resume_all() == [run.run_id]
        ended, _ = await run_end(daemon, run.run_id)
        assert ended.state == "completed", ended.error
        assert seen == [True]  # the stage ran once the agent was back, not before
    finally:
        agent.stop()
        await task


async def test_a_stand_in_for_a_lost_agent_queues_while_the_others_are_busy(
        daemon: Any, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import msgspec

    from schemas.events import RunProgress
    from stratosd import stages as stage_fns

    monkeypatch.setattr(stage_fns, "QUEUE_POLL_S", 0.2)
    lost, lost_task = await start_agent(nats_url, tmp_path, "gpu-1", interval=0.3)
    other, other_task = await start_agent(nats_url, tmp_path, "gpu-2", interval=3.0)
    try:
        await until(lambda: daemon.fleet.is_up("gpu-1") and daemon.fleet.is_up("gpu-2"))
        picked: list[str] = []

        async def train(ctx: StageRun) -> dict[str, Any]:
            # gpu-1 is gone; gpu-2 is training another run until its next heartbeat (<= 3 s)
            lost.stop()
            await lost_task
            daemon.fleet.agents["gpu-1"].status = "down"
            st = daemon.fleet.agents["gpu-2"]
            st.telemetry = msgspec.structs.replace(st.telemetry, training_jobs=["other-run"])
            daemon.fleet._table = None
            picked.append(await stage_fns.agent_for(ctx))
            return {"agent": picked[-1]}

        stages = install(daemon, {"train": train}, retries=0)
        run, events = await run_end(daemon, await submit(daemon))
        assert run.state == "completed", run.error
        assert picked == ["gpu-2"] and stages.attempts["train"] == [1]  # queued, not retried
        assert run.progress["agent_id"] == "gpu-2"
        assert "gpu-1" in run.progress["excluded_agents"]
        assert any(isinstance(e, RunProgress) and e.message.startswith("queued:") and
                   "busy" in e.message for e in events)
    finally:
        other.stop()
        await other_task
