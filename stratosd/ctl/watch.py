"""`stratosctl watch ID`: replay a run's events from JetStream, then follow them live."""

from __future__ import annotations

import argparse

from stratosd.ctl.common import add_common


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("watch", help="follow a run's events live (replays its history first)",
                       description="Print a run's events from the start (they are kept in "
                       "JetStream), then follow until it completes, fails, is cancelled or "
                       "stops at its budget (exit 4). A run resumed after that is followed "
                       "on. Long stages show a progress bar with the latest metrics.")
    p.add_argument("id", help="run id")
    p.add_argument("--timeout", type=float, default=0, help="give up after N seconds (0: never)")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Follow the run."""
    return follow(args, args.id)


def follow(args: argparse.Namespace, run_id: str) -> int:
    """Replay + follow; exit 0 on completion, 1 on failure/cancel, 4 when stopped (budget)."""
    from stratosd.ctl.follow import follow as follow_run

    return follow_run(args, run_id)
