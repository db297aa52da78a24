"""Shared stratosctl plumbing: connect, request the daemon, print tables or JSON.

Imports only the standard library at module level: every subcommand imports this module, and
`stratosctl X --help` must not pay for nats, msgspec or asyncio (they load when a command runs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.base import Message
    from stratosd.bus import Bus
    from stratosd.config import StratosConfig


def add_common(p: argparse.ArgumentParser) -> None:
    """Flags every subcommand takes."""
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")


def config_from(args: argparse.Namespace) -> StratosConfig:
    """Config from --config/--nats/--home, env and files."""
    from stratosd.config import StratosConfig, load_config

    return load_config(StratosConfig, args.config,
                       {"nats_url": args.nats_url, "home": getattr(args, "home", None)})


async def open_bus(args: argparse.Namespace) -> Bus:
    """A connection to the daemon's NATS."""
    from stratosd.bus import Bus, connect

    cfg = config_from(args)
    return Bus(await connect(cfg, "stratosctl"))


async def ask(args: argparse.Namespace, verb: str, msg: Message, timeout: float = 10.0) -> Any:
    """One request to the daemon; unreachable → BusUnavailable (exit 3)."""
    from schemas import subjects
    from stratosd.errors import BusUnavailable, NotFound

    bus = await open_bus(args)
    try:
        return await bus.request(subjects.daemon_cmd(verb), msg, timeout=timeout)
    except NotFound as exc:
        raise BusUnavailable(
            "the daemon is not running on this bus",
            hint="start it with `stratosd` (or check --nats / STRATOS_NATS_URL)") from exc
    finally:
        await bus.close()


def run_async(fn: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """asyncio.run for a subcommand coroutine."""
    import asyncio

    return asyncio.run(fn())


def dump_json(obj: Any) -> None:
    """Structs/dicts as indented JSON on stdout."""
    import json

    import msgspec

    sys.stdout.write(json.dumps(msgspec.to_builtins(obj), indent=2, default=str) + "\n")


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """An aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ago(ts: datetime | None) -> str:
    """'3s ago' style age."""
    if ts is None:
        return "-"
    s = (datetime.now(UTC) - ts).total_seconds()
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def bar(done: float, total: float | None, width: int = 24) -> str:
    """A text progress bar."""
    if not total:
        return f"{done:g}"
    frac = max(0.0, min(1.0, done / total))
    full = int(frac * width)
    return f"[{'#' * full}{'.' * (width - full)}] {frac:5.1%} {done:g}/{total:g}"
