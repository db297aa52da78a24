"""`stratosctl jobs` and `stratosctl status ID`: submitted runs and one run's state."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from stratosd.ctl.common import add_common, ago, ask, dump_json, run_async, table

if TYPE_CHECKING:
    from schemas.commands import RunInfo
    from stratosd.errors import RemoteError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `jobs` and `status`."""
    p = sub.add_parser("jobs", help="list submitted jobs (runs), newest first",
                       description="List runs: id, name, state, current stage, age.")
    p.add_argument("--limit", type=int, default=50)
    add_common(p)
    p.set_defaults(func=main_list)
    s = sub.add_parser("status", help="one run's state, stage results and error",
                       description="Show a run: its state, each finished stage's key result, "
                       "and for a failed or stopped run what happened and what to do. A "
                       "tenants job's id shows its per-tenant state (as `tenants status`).")
    s.add_argument("id", help="run id (from `stratosctl jobs`) or tenants job id")
    add_common(s)
    s.set_defaults(func=main_status)


def main_list(args: argparse.Namespace) -> int:
    """Print the runs table."""
    from schemas.commands import ListRuns

    async def go() -> int:
        reply = await ask(args, "runs", ListRuns(limit=args.limit))
        if args.json:
            dump_json(reply.runs)
            return 0
        rows = [[r.run_id, r.name, r.state, r.stage, ago(r.created), ago(r.updated)]
                for r in reply.runs]
        print(table(rows, ["ID", "NAME", "STATE", "STAGE", "CREATED", "UPDATED"]))
        stopped = [r.run_id for r in reply.runs if r.state == "stopped"]
        if stopped:
            print(f"\n{len(stopped)} run(s) stopped at their budget with every result kept; "
                  f"`stratosctl status {stopped[0]}` shows what the rest needs and how to resume")
        return 0
    return run_async(go)


def summarize(stage: str, result: dict[str, Any]) -> str:
    """One line per stage result."""
    if stage == "select_server":
        sel = result.get("selection", {})
        return f"server {result.get('agent_id')} ({sel.get('selector')}, " \
            f"{len(sel.get('pareto_ids', []))} Pareto-optimal of {sel.get('candidates')})"
    if stage == "probe_teachers":
        return "; ".join(f"{s['name']}: {s['accuracy']:.1%}" for s in result.get("scores", []))
    if stage == "select_student":
        return f"student {result.get('chosen')}"
    if stage == "choose_strategy":
        return f"{result.get('mode')} ({result.get('reason')})"
    if stage == "synthesize":
        return f"{result.get('kept', result.get('rows'))} rows"
    if stage == "train":
        return f"loss {result.get('first_loss', '?')} → {result.get('final_loss', '?')}, " \
            f"{result.get('steps', '?')} steps"
    if stage == "evaluate":
        b, a = result.get("before", {}), result.get("after", {})
        met = result.get("target_met")
        target = "" if met is None else \
            f" (target {result.get('target_accuracy', 0):.0%} {'met' if met else 'NOT met'})"
        return f"accuracy {b.get('accuracy', 0):.1%} → {a.get('accuracy', 0):.1%}{target}"
    if stage == "deploy":
        return str(result.get("url", "skipped"))
    if stage == "report":
        return str(result.get("paths", {}).get("markdown", ""))
    return ""


def print_run(run: RunInfo) -> None:
    """Human view of a run."""
    print(f"run      {run.run_id}  ({run.name})")
    print(f"state    {run.state}   stage {run.stage}")
    for stage, result in run.results.items():
        print(f"  {stage:<16} {summarize(stage, result)}")
    if run.error:
        label = "budget  " if run.state == "stopped" else "error   "
        print(f"{label} {run.error.get('message')}")
        if run.error.get("hint"):
            print(f"hint     {run.error['hint']}")
    if run.state == "stopped":
        print(f"kept     every finished stage and its artifacts; resume goes on from {run.stage}")
    elif run.state in ("failed", "cancelled"):
        print(f"resume   stratosctl resume {run.run_id}  (finished stages are kept; "
              f"goes on from {run.stage})")


def main_status(args: argparse.Namespace) -> int:
    """Print one run (or, for a tenants job's id, that job's per-tenant state)."""
    from schemas.commands import GetRun
    from stratosd.errors import RemoteError

    async def go() -> int:
        try:
            reply = await ask(args, "run", GetRun(run_id=args.id))
        except RemoteError as exc:
            if not await is_tenant_job(args, exc):
                raise
            from stratosd.ctl.tenants import show_status

            return await show_status(args)
        if args.json:
            dump_json(reply.run)
        else:
            print_run(reply.run)
        return 0
    return run_async(go)


async def is_tenant_job(args: argparse.Namespace, run_error: RemoteError) -> bool:
    """True when the id that is no run is a tenants job's (status and watch show those too)."""
    if run_error.remote_code != "not_found":
        return False
    from schemas.tenants import GetTenantJob
    from stratosd.ctl.tenants import ask as ask_tenants
    from stratosd.errors import BusUnavailable, RemoteError

    try:
        await ask_tenants(args, GetTenantJob(job_id=args.id))
    except (RemoteError, BusUnavailable):
        return False
    return True
