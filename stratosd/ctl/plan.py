"""`stratosctl plan JOB.toml`: a dry run of server selection; nothing is started."""

from __future__ import annotations

import argparse
from pathlib import Path

from stratosd.ctl.common import add_common, ask, dump_json, run_async


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser(
        "plan", help="dry-run server selection: Pareto set, estimates, the pick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Select a server for a job without running anything, over what `submit` "
        "would use: the live agents. --catalog adds the offers one could rent (marked "
        "'catalog (no agent)': submit cannot use them until an agent serves one). Every "
        "estimate comes from the cost model: the job's work (training tokens, generations), "
        "each server's measured speed (else the capacity table, marked estimated) and the "
        "efficiency learned from past runs, printed with its interval ('±x% from N runs'). "
        "--plot draws the candidates, the Pareto front and the pick.",
        epilog="examples:\n  stratosctl plan examples/mahjong-demo.toml\n"
               "  stratosctl plan job.toml --catalog --plot plan.png\n"
               "  stratosctl plan job.toml --selector cost-first --json\n"
               "  stratosctl plan job.toml --offline   # no daemon: catalog offers, priors only")
    p.add_argument("file", help="job TOML file")
    p.add_argument("--selector", help="override the job's selector (e.g. cost-first)")
    p.add_argument("--plot", help="write a PNG of candidates, front and pick")
    p.add_argument("--catalog", action="store_true",
                   help="also plan over catalog offers one could rent (no agent yet)")
    p.add_argument("--force", action="store_true",
                   help="accept an est_train_hours that disagrees with the cost model")
    p.add_argument("--offline", action="store_true",
                   help="no daemon: plan over catalog offers on this machine (no learned "
                        "history: prior estimates only)")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Print the plan table (and write the plot)."""
    from schemas.commands import PlanRun
    from stratosd import planning
    from stratosd.validate import parse_spec_toml

    spec = parse_spec_toml(args.file)

    async def go() -> int:
        from stratosd.costmodel.costs import CostModel
        from stratosd.groupplan import plan_select
        from stratosd.plugins import Plugins

        plugins = Plugins()
        costs = CostModel(plugins)
        if args.offline:
            offers = plugins.catalog_offers()
            name = args.selector or spec.selector
            selector = plugins.selectors.get(name)(
                spec.selector_params if name == spec.selector else {})
            costs.check_given(spec, offers, force=args.force)
            costing = costs.costing(spec)
            planned = plan_select(selector, offers, spec, costing, plugins=plugins)
            selection, offers = planned.selection, list(planned.offers)
            rows = planning.plan_rows(selection, offers, spec.constraints, costing)
            work, estimate = costing.work, costing.estimate(selection.chosen)
            notes = ["offline: catalog offers only, prior estimates (no learned history)"]
        else:
            reply = await ask(args, "plan", PlanRun(spec=spec, selector=args.selector,
                                                    catalog=args.catalog, force=args.force))
            selection, rows = reply.selection, reply.rows
            work, estimate, notes = reply.work, reply.estimate, reply.notes
            offers = None
        if args.json:
            dump_json({"selection": selection, "rows": rows, "work": work,
                       "estimate": estimate, "notes": notes})
        else:
            print(planning.format_plan(selection, rows, work, estimate, notes))
        if args.plot:
            if offers is None:
                offers = [selection.chosen] + [o for o in plugins.catalog_offers()
                                               if args.catalog]
            costing = costs.costing(spec, work=work) if work is not None else None
            path = planning.plot_plan(offers, selection, Path(args.plot), costing=costing)
            print(f"plot: {path}")
        return 0
    return run_async(go)
