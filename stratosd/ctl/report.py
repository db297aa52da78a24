"""`stratosctl report ID`: where a run's report is, and its headline numbers."""

from __future__ import annotations

import argparse

from stratosd.ctl.common import add_common, ask, dump_json, run_async


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("report", help="a finished run's report (Markdown, JSON, plots)",
                       description="Print the paths of a run's report and its Markdown body.")
    p.add_argument("id", help="run id")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Print the report."""
    from schemas.commands import GetReport

    async def go() -> int:
        reply = await ask(args, "report", GetReport(run_id=args.id))
        if args.json:
            dump_json(reply)
            return 0
        md = reply.paths.get("markdown")
        if md:
            try:
                with open(md) as fh:
                    print(fh.read())
            except OSError:
                pass
        for kind, path in reply.paths.items():
            print(f"{kind}: {path}")
        return 0
    return run_async(go)
