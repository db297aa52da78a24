"""`stratosctl watch ID`: replay a run's events from JetStream, then follow them live."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import msgspec
from nats.js import api as js_api

from schemas import subjects
from schemas.base import decode_or_error
from schemas.commands import GetRun
from schemas.events import (
    EVENT_DECODER,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunProgress,
    RunStageCompleted,
    RunStageStarted,
    RunSubmitted,
)
from stratosd.ctl.common import add_common, ask, bar, open_bus, run_async
from stratosd.ctl.jobs import summarize
from stratosd.errors import StratosError

TERMINAL = (RunCompleted, RunFailed, RunCancelled)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("watch", help="follow a run's events live (replays its history first)",
                       description="Print a run's events from the start (they are kept in "
                       "JetStream), then follow until it completes, fails or is cancelled. "
                       "Long stages show a progress bar with the latest metrics.")
    p.add_argument("id", help="run id")
    p.add_argument("--timeout", type=float, default=0, help="give up after N seconds (0: never)")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Follow the run."""
    return follow(args, args.id)


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
    return None


def follow(args: argparse.Namespace, run_id: str) -> int:
    """Replay + follow; exit 0 on completion, 1 on failure/cancel."""
    async def go() -> int:
        await ask(args, "run", GetRun(run_id=run_id))  # NotFound names the id
        bus = await open_bus(args)
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        async def cb(msg: object) -> None:
            await queue.put(msg.data)  # type: ignore[attr-defined]

        sub = await bus.js.subscribe(subjects.run_events(run_id), ordered_consumer=True,
                                     deliver_policy=js_api.DeliverPolicy.ALL, cb=cb,
                                     stream=subjects.EVENTS_STREAM)
        tty = sys.stdout.isatty()
        progress_shown = False
        loop = asyncio.get_running_loop()
        timeout_s = getattr(args, "timeout", 0) or 0
        deadline = loop.time() + timeout_s if timeout_s else None
        try:
            while True:
                timeout = None if deadline is None else max(0.01, deadline - loop.time())
                try:
                    data = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    print("watch: timed out", file=sys.stderr)
                    return 1
                try:
                    event = decode_or_error(EVENT_DECODER, data)
                except StratosError:
                    continue
                if args.json:
                    print(json.dumps(msgspec.to_builtins(event)), flush=True)
                elif isinstance(event, RunProgress):
                    metrics = " ".join(f"{k}={v:.4g}" for k, v in list(event.metrics.items())[:4])
                    text = f"  {event.stage:<14} {bar(event.done, event.total)} {event.unit} " \
                        f"{metrics} {event.message}".rstrip()
                    if tty:
                        print(f"\r\033[K{text}", end="", flush=True)
                        progress_shown = True
                    else:
                        print(text, flush=True)
                else:
                    line = _line(event)
                    if line:
                        if progress_shown:
                            print()
                            progress_shown = False
                        print(line, flush=True)
                if isinstance(event, TERMINAL):
                    return 0 if isinstance(event, RunCompleted) else 1
        finally:
            await sub.unsubscribe()
            await bus.close()
    return run_async(go)
