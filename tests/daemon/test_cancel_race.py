"""Cancel is atomic against a run's own end, and finished runs leave nothing behind in the
pipeline. Real nats-server and daemon; the stages are small functions."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from schemas import subjects
from schemas.commands import CancelRun
from schemas.events import RunCancelled, RunCompleted
from stratosd.errors import RemoteError
from tests.daemon.jobstages import install, run_end, submit, until


def gate_saves(daemon: Any, monkeypatch: pytest.MonkeyPatch, state: str) -> tuple[
        asyncio.Event, asyncio.Event]:
    """Hold the run store's write of `state` until released: (entered, release)."""
    entered, release = asyncio.Event(), asyncio.Event()
    save = daemon.store.save

    async def gated(run: Any, **changes: Any) -> Any:
        if changes.get("state") == state:
            entered.set()
            await release.wait()
        return await save(run, **changes)

    monkeypatch.setattr(daemon.store, "save", gated)
    return entered, release


async def cancel(daemon: Any, run_id: str) -> Any:
    """The cancel command, as stratosctl sends it."""
    return await daemon.bus.request(subjects.daemon_cmd("cancel"), CancelRun(run_id=run_id))


async def test_a_cancel_racing_the_completion_never_overwrites_it(
    daemon: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(daemon, {})
    entered, release = gate_saves(daemon, monkeypatch, "completed")
    read = asyncio.Event()
    get = daemon.store.get

    async def noted_get(run_id: str) -> Any:
        run = await get(run_id)
        if entered.is_set():  # the cancel's first look, while the completion is being written
            read.set()
        return run

    monkeypatch.setattr(daemon.store, "get", noted_get)
    run_id = await submit(daemon)
    await asyncio.wait_for(entered.wait(), 20)  # every stage done; "completed" is in flight
    racing = asyncio.create_task(cancel(daemon, run_id))
    await asyncio.wait_for(read.wait(), 10)  # the cancel saw a running run and went on
    release.set()
    with pytest.raises(RemoteError) as info:
        await asyncio.wait_for(racing, 20)
    assert info.value.remote_code == "conflict"
    assert f"run {run_id} already completed" in info.value.message
    run, events = await run_end(daemon, run_id)
    assert run.state == "completed" and run.stage == "done"
    assert any(isinstance(e, RunCompleted) for e in events)
    assert not any(isinstance(e, RunCancelled) for e in events)


async def test_concurrent_cancels_cancel_once(daemon: Any) -> None:
    stages = install(daemon, {})
    blocked = asyncio.Event()

    async def forever(_ctx: Any) -> dict[str, Any]:
        blocked.set()
        await asyncio.Event().wait()
        return {}

    stages.jobs["train"] = forever
    run_id = await submit(daemon)
    await asyncio.wait_for(blocked.wait(), 20)
    replies = await asyncio.gather(cancel(daemon, run_id), cancel(daemon, run_id),
                                   return_exceptions=True)
    refused = [r for r in replies if isinstance(r, RemoteError)]
    assert len(refused) == 1 and refused[0].remote_code == "conflict", replies
    assert "already cancelled" in refused[0].message
    run, events = await run_end(daemon, run_id)
    assert run.state == "cancelled" and run.stage == "train"
    assert sum(isinstance(e, RunCancelled) for e in events) == 1
    assert not any(isinstance(e, RunCompleted) for e in events)


async def test_finished_runs_leave_no_task_behind(daemon: Any) -> None:
    install(daemon, {})
    run_ids = [await submit(daemon) for _ in range(3)]
    for run_id in run_ids:
        run, _ = await run_end(daemon, run_id)
        assert run.state == "completed"
    await until(lambda: not daemon.pipeline.tasks)
    assert not daemon.pipeline.live and not daemon.pipeline._ending
