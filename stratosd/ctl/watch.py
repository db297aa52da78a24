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
                       "on. Long stages show a progress bar with the latest metrics. A "
                       "tenants job's id follows that job (as `tenants watch`).")
    p.add_argument("id", help="run id, or tenants job id")
    p.add_argument("--timeout", type=float, default=0, help="give up after N seconds (0: never)")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Follow the run (or, for a tenants job's id, that job's events)."""
    from stratosd.ctl.common import run_async
    from stratosd.ctl.jobs import is_tenant_job
    from stratosd.errors import RemoteError

    try:
        return follow(args, args.id)
    except RemoteError as exc:
        error = exc

        async def tenant() -> int:
            return int(await is_tenant_job(args, error))

        if not run_async(tenant):
            raise
    from stratosd.ctl.tenants import main_watch

    return main_watch(args)


def follow(args: argparse.Namespace, run_id: str) -> int:
    """Replay + follow; exit 0 on completion, 1 on failure/cancel, 4 when stopped (budget)."""
    from stratosd.ctl.follow import follow as follow_run

    return follow_run(args, run_id)
