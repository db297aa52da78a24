"""`stratosctl cancel ID`: stop a run and its agent job."""

from __future__ import annotations

import argparse

from stratosd.ctl.common import add_common, ask, dump_json, run_async


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("cancel", help="cancel a run (its running job is stopped)",
                       description="Cancel a run. The agent job gets SIGTERM (it checkpoints), "
                       "then SIGKILL after the grace period.")
    p.add_argument("id", help="run id")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Cancel and print the new state."""
    from schemas.commands import CancelRun

    async def go() -> int:
        reply = await ask(args, "cancel", CancelRun(run_id=args.id), timeout=60)
        if args.json:
            dump_json(reply)
        else:
            print(f"{reply.ref} {reply.state}")
        return 0
    return run_async(go)
