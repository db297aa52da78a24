"""`stratosctl plan JOB.toml`: a dry run of server selection; nothing is started."""

from __future__ import annotations

import argparse
from pathlib import Path

from schemas.commands import PlanRun
from stratosd.ctl.common import add_common, ask, dump_json, run_async
from stratosd.validate import parse_spec_toml


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("plan", help="dry-run server selection: Pareto set, estimates, the pick",
                       description="Select a server for a job without running anything: live "
                       "agents plus catalog offers, the job's constraints, and the selector "
                       "(default: the job's, usually pfg). --plot draws the candidates, the "
                       "Pareto front and the pick.")
    p.add_argument("file", help="job TOML file")
    p.add_argument("--selector", help="override the job's selector (e.g. cost-first)")
    p.add_argument("--plot", help="write a PNG of candidates, front and pick")
    p.add_argument("--offline", action="store_true",
                   help="no daemon: plan over catalog offers on this machine")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Print the plan table (and write the plot)."""
    from stratosd import planning

    spec = parse_spec_toml(args.file)

    async def go() -> int:
        if args.offline:
            from stratosd.plugins import Plugins

            plugins = Plugins()
            offers = plugins.catalog_offers()
            name = args.selector or spec.selector
            selector = plugins.selectors.get(name)(
                spec.selector_params if name == spec.selector else {})
            selection = selector.select(offers, spec.constraints,
                                        est_train_hours=spec.est_train_hours, seed=spec.seed)
            rows = planning.plan_rows(selection, offers, spec.constraints, spec.est_train_hours)
        else:
            reply = await ask(args, "plan", PlanRun(spec=spec, selector=args.selector))
            selection, rows = reply.selection, reply.rows
            offers = None
        if args.json:
            dump_json({"selection": selection, "rows": rows})
        else:
            print(planning.format_plan(selection, rows))
        if args.plot:
            if offers is None:
                from stratosd.plugins import Plugins

                offers = Plugins().catalog_offers()
            path = planning.plot_plan(offers, selection, Path(args.plot))
            print(f"plot: {path}")
        return 0
    return run_async(go)
