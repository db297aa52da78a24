"""How `stratosctl watch` (and `submit --watch`, `resume --watch`) follow a run: replay its
events from JetStream, then print them live. Imported only when a run is followed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from nats.js import api as js_api

from schemas import subjects
from schemas.base import decode_or_error
from schemas.commands import GetRun
from schemas.events import (
    EVENT_DECODER,
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
from stratosd.ctl.common import ask, bar, open_bus, run_async
from stratosd.ctl.jobs import summarize
from stratosd.errors import StratosError
from stratosd.resume import resume_hint

TERMINAL = (RunCompleted, RunFailed, RunCancelled, RunBudgetExhausted)
EXIT_STOPPED = 4  # stopped by its budget: waits for `stratosctl resume`


def _line(event: object) -> str | None:
    if isinstance(event, RunSubmitted):
        return f"submitted  {event.spec.name}"
    if isinstance(event, RunStageStarted):
        return f"▶ {event.stage}" + (f" (attempt {event.attempt})" if event.attempt > 1 else "")
    if isinstance(event, RunStageCompleted):
        return f"✓ {event.stage:<16} {event.duration_s:6.1f}s  " \
            f"{summarize(event.stage, event.result)}"
    if isinstance(event, RunCompleted):
        return "run completed"
    if isinstance(event, RunFailed):
        return f"✗ run failed in {event.stage}: {event.message}" + \
            (f"\n  hint: {event.hint}" if event.hint else "")
    if isinstance(event, RunCancelled):
        return "run cancelled"
    if isinstance(event, RunBudgetExhausted):
        return (f"■ run stopped before {event.stage}: budget ${event.budget_usd:.2f}, "
                f"spent ${event.spent_usd:.2f}, the rest needs about ${event.next_usd:.2f}"
                f"\n  every finished stage is kept\n  hint: "
                f"{resume_hint(event.run_id, event.spent_usd, event.next_usd)}")
    if isinstance(event, RunResumed):
        changed = " ".join(f"{k}={json.dumps(v)}" for k, v in event.changed.items())
        return f"↻ resumed at {event.stage}" + (f" with {changed}" if changed else "")
    return None


async def replay_and_follow(args: argparse.Namespace, subject: str, decoder: Any,
                            timeout_s: float = 0) -> AsyncGenerator[tuple[Any, int], None]:
    """Every event on `subject` from the start of the stream, then live, as (the event
    decoded with `decoder`, or None for a type this version does not know; events still
    pending after it). Raises TimeoutError when timeout_s (0: never) has passed."""
    bus = await open_bus(args)
    queue: asyncio.Queue[tuple[bytes, int]] = asyncio.Queue()

    async def cb(msg: object) -> None:
        pending = msg.metadata.num_pending  # type: ignore[attr-defined]
        await queue.put((msg.data, int(pending or 0)))  # type: ignore[attr-defined]

    sub = await bus.js.subscribe(subject, ordered_consumer=True,
                                 deliver_policy=js_api.DeliverPolicy.ALL, cb=cb,
                                 stream=subjects.EVENTS_STREAM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s if timeout_s else None
    try:
        while True:
            timeout = None if deadline is None else max(0.01, deadline - loop.time())
            data, pending = await asyncio.wait_for(queue.get(), timeout)
            try:
                yield decode_or_error(decoder, data), pending
            except StratosError:
                yield None, pending  # a newer event type: skipped
    finally:
        await sub.unsubscribe()
        await bus.close()


def follow(args: argparse.Namespace, run_id: str) -> int:
    """Replay + follow; exit 0 on completion, 1 on failure/cancel, 4 when stopped (budget).

    An end that later events follow (the run was resumed) does not end the watch."""
    async def go() -> int:
        await ask(args, "run", GetRun(run_id=run_id))  # NotFound names the id
        tty = sys.stdout.isatty()
        progress_shown = False
        end: object | None = None  # the last terminal event, until a later one resumes
        events = replay_and_follow(args, subjects.run_events(run_id), EVENT_DECODER,
                                   getattr(args, "timeout", 0) or 0)
        async with contextlib.aclosing(events):
            try:
                async for event, pending in events:
                    if event is not None:
                        progress_shown = _show(event, args.json, tty, progress_shown)
                    if isinstance(event, TERMINAL):
                        end = event
                    elif isinstance(event, RunResumed | RunStageStarted):
                        end = None  # the run went on after an end seen in the replay
                    if end is not None and not pending:
                        if isinstance(end, RunBudgetExhausted):
                            return EXIT_STOPPED
                        return 0 if isinstance(end, RunCompleted) else 1
            except TimeoutError:
                pass
        print("watch: timed out", file=sys.stderr)
        return 1
    return run_async(go)


def _show(event: object, as_json: bool, tty: bool, progress_shown: bool) -> bool:
    """Print one event; returns whether a progress line is left open (tty redraws)."""
    if as_json:
        print(json.dumps(msgspec.to_builtins(event)), flush=True)
        return progress_shown
    if isinstance(event, RunProgress):
        metrics = " ".join(f"{k}={v:.4g}" for k, v in list(event.metrics.items())[:4])
        text = f"  {event.stage:<14} {bar(event.done, event.total)} {event.unit} " \
            f"{metrics} {event.message}".rstrip()
        if tty:
            print(f"\r\033[K{text}", end="", flush=True)
            return True
        print(text, flush=True)
        return progress_shown
    line = _line(event)
    if line:
        if progress_shown:
            print()
        print(line, flush=True)
        return False
    return progress_shown
