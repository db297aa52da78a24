"""`stratosctl tenants submit FILE | status [ID] | watch ID | report ID | cancel ID`.

Tenants jobs are listed here, not in `stratosctl jobs/status/watch` (those follow pipeline runs
in KV `stratos_runs`; tenants jobs live in KV `stratos_tenants` and publish their events on
`stratos.evt.tenant.{job_id}.>`)."""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from schemas import subjects
from schemas.base import Message, decode_or_error, encode
from schemas.errors import ErrorReply
from schemas.tenants import (
    TENANT_EVENT_DECODER,
    TENANT_REPLY_DECODER,
    TENANT_TERMINAL,
    CancelTenantJob,
    GetTenantJob,
    ListTenantJobs,
    SubmitTenantJob,
    TenantBudgetStopped,
    TenantDropped,
    TenantEndpointReady,
    TenantJob,
    TenantJobCancelled,
    TenantJobCompleted,
    TenantJobFailed,
    TenantJobList,
    TenantJobResumed,
    TenantJobState,
    TenantJobSubmitted,
    TenantRoundCompleted,
    TenantRoundStarted,
    TenantStageStarted,
    TenantStatus,
)
from stratosd.ctl.common import add_common, dump_json, open_bus, run_async, table
from stratosd.errors import BusUnavailable, ConfigError, RemoteError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("tenants", help="per-tenant students and adapters (ACME)",
                       description="Submit and follow tenants jobs: each tenant's data stays "
                       "on its agents; see docs/tenants.md.")
    tsub = p.add_subparsers(dest="tenants_command", metavar="ACTION")
    s = tsub.add_parser("submit", help="submit a tenants job (TOML with [[tenants]])")
    s.add_argument("file", help="job TOML file")
    s.add_argument("--job-id", help="idempotency key")
    add_common(s)
    s.set_defaults(func=main_submit)
    st = tsub.add_parser("status", help="one job's per-tenant state, or every job")
    st.add_argument("id", nargs="?", help="job id (default: list jobs)")
    add_common(st)
    st.set_defaults(func=main_status)
    w = tsub.add_parser("watch", help="follow a job's per-tenant state live",
                        description="Replay a tenants job's events from JetStream, then follow "
                        "them until it completes (exit 0) or fails (exit 1). Each round and "
                        "the end print every tenant: state, student, round, accuracy alone "
                        "vs aggregated, bytes sent.")
    w.add_argument("id", help="job id")
    w.add_argument("--timeout", type=float, default=0, help="give up after N seconds (0: never)")
    add_common(w)
    w.set_defaults(func=main_watch)
    c = tsub.add_parser("cancel", help="stop a job and undeploy its endpoints",
                        description="Stop a running tenants job (its in-flight steps are "
                        "cancelled on their agents) and stop its endpoints; for a finished "
                        "job, only its endpoints are stopped.")
    c.add_argument("id", help="job id")
    add_common(c)
    c.set_defaults(func=main_cancel)
    r = tsub.add_parser("report", help="a finished job's per-tenant report")
    r.add_argument("id", help="job id")
    add_common(r)
    r.set_defaults(func=main_report)


def parse_tenant_toml(path: str) -> TenantJob:
    """A TenantJob from TOML; typos and bad values name the field."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", hint="check the file") from None
    try:
        return msgspec.convert(data, TenantJob)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}",
                          hint="see docs/tenants.md for the [[tenants]] fields") from None


async def ask(args: argparse.Namespace, msg: Message, timeout: float = 10.0) -> Any:
    """One tenants request to the daemon (its own reply decoder)."""
    import nats

    bus = await open_bus(args)
    subject = subjects.daemon_cmd(subjects.TENANT_VERBS[0])
    try:
        raw = await bus.nc.request(subject, encode(msg), timeout=timeout)
    except nats.errors.NoRespondersError:
        raise BusUnavailable("the daemon is not running on this bus (or predates tenants)",
                             hint="start or upgrade stratosd") from None
    except nats.errors.TimeoutError:
        raise BusUnavailable(f"no reply on {subject} within {timeout:.0f}s",
                             hint="the daemon may be overloaded or down") from None
    finally:
        await bus.close()
    reply = decode_or_error(TENANT_REPLY_DECODER, raw.data)
    if isinstance(reply, ErrorReply):
        raise RemoteError(reply.code, reply.message, reply.hint, reply.field)
    return reply


def main_submit(args: argparse.Namespace) -> int:
    """Submit and print the job id."""
    spec = parse_tenant_toml(args.file)

    async def go() -> int:
        reply = await ask(args, SubmitTenantJob(spec=spec, job_id=args.job_id))
        if args.json:
            dump_json(reply)
        else:
            print(reply.job.job_id)
        return 0
    return run_async(go)


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def status_rows(statuses: Mapping[str, TenantStatus], rounds: int) -> str:
    """The per-tenant table of an event or a job."""
    rows = [[name, s.state + (" (budget stop)" if s.stopped_at else ""), s.agent or "-",
             s.student or "-", f"{s.rounds_done}/{rounds}", _acc(s.accuracy_alone),
             _acc(s.accuracy_aggregated), s.bytes_sent, s.raw_bytes, f"${s.spent_usd:.4g}"]
            for name, s in sorted(statuses.items())]
    return table(rows, ["tenant", "state", "agent", "student", "round", "acc alone",
                        "acc agg", "bytes sent", "raw bytes", "spent"])


def print_job(job: TenantJobState) -> None:
    """A job's per-tenant table, then why any tenant left and each budget check."""
    print(f"{job.job_id}  {job.name}  {job.state}  stage {job.stage}"
          + (f"  (attempt {job.attempt})" if job.attempt > 1 else "")
          + (f"\nerror: {job.error}" if job.error else ""))
    statuses = {n: TenantStatus(
        state=r.state, agent=r.agent, student=r.student, rounds_done=r.rounds_done,
        accuracy_alone=r.accuracy_alone, accuracy_aggregated=r.accuracy_aggregated,
        bytes_sent=r.bytes.to_agent + r.bytes.from_agent, raw_bytes=r.bytes.raw_data,
        spent_usd=r.spent_usd, stopped_at=r.stopped_at)
        for n, r in job.results.items()}
    print(status_rows(statuses, job.spec.aggregation.rounds))
    for ep in job.endpoints:
        print(f"endpoint {ep.endpoint_id} {ep.state}: {ep.url or '-'} on {ep.agent} "
              f"({ep.deployer}, base {ep.student}); model = "
              + ", ".join(sorted(ep.names.values()))
              + "; weights moved: " + ", ".join(f"{k} {v} B"
                                                for k, v in sorted(ep.weights_bytes.items())))
    for name, r in sorted(job.results.items()):
        if r.pick is not None:
            p = r.pick
            print(f"{name} student {p.chosen} ({p.rule}; quality axis {p.quality_metric}"
                  + (f": {p.quality_note}" if p.quality_note else "") + "); baselines "
                  + ", ".join(f"{k} {v}" for k, v in sorted(p.baselines.items())))
        if r.endpoint_url:
            print(f"{name} served at {r.endpoint_url} as model={r.served_name}")
        if r.stopped_at:
            print(f"{name} stopped before {r.stopped_at}: {r.stop_reason}")
        if r.state != "ok":
            print(f"{name} {r.state} at {r.dropped_at or '-'}: {r.error}")
        if r.budget is not None:
            b = r.budget
            print(f"{name} budget: estimated ${b.estimate_usd:.4g} for {b.student} "
                  f"(${b.low_usd:.4g}-${b.high_usd:.4g}) vs budget_usd ${b.budget_usd:g}")


def event_line(ev: Any) -> str:
    """One tenant event as a line."""
    if isinstance(ev, TenantJobSubmitted):
        return (f"submitted  {ev.name}: {len(ev.tenants)} tenants ({', '.join(ev.tenants)}), "
                f"{ev.rounds} rounds of {ev.rule}")
    if isinstance(ev, TenantStageStarted):
        return f"▶ {ev.stage}"
    if isinstance(ev, TenantRoundStarted):
        live = sorted(n for n, s in ev.tenants.items() if s.state == "ok")
        return f"▶ round {ev.round}/{ev.rounds}: {', '.join(live)}"
    if isinstance(ev, TenantRoundCompleted):
        return f"✓ round {ev.round}/{ev.rounds} {ev.duration_s:.1f}s"
    if isinstance(ev, TenantDropped):
        return (f"✗ tenant {ev.tenant} {ev.state} at {ev.stage} (agent {ev.agent or '-'}): "
                f"{ev.reason}; the others go on, re-weighted: {', '.join(ev.remaining) or '-'}")
    if isinstance(ev, TenantJobResumed):
        return f"↻ resumed at {ev.stage}"
    if isinstance(ev, TenantBudgetStopped):
        return (f"$ tenant {ev.tenant} stops before round {ev.round}: spent "
                f"${ev.spent_usd:.4g}, projected ${ev.projected_usd:.4g} > budget "
                f"${ev.budget_usd:g} ({ev.reason})")
    if isinstance(ev, TenantEndpointReady):
        e = ev.endpoint
        return (f"⇄ endpoint {e.endpoint_id} serves {', '.join(sorted(e.names.values()))} at "
                f"{e.url} ({e.deployer} on {e.agent})")
    if isinstance(ev, TenantJobCancelled):
        return "job cancelled" + (f"; undeployed {', '.join(ev.undeployed)}"
                                  if ev.undeployed else "")
    if isinstance(ev, TenantJobCompleted):
        return "job completed" + (f" without {', '.join(ev.dropped)}" if ev.dropped else "") \
            + "".join(f"\n{k}: {v}" for k, v in sorted(ev.report_paths.items()))
    if isinstance(ev, TenantJobFailed):
        return f"✗ job failed in {ev.stage}: {ev.message}" + \
            (f"\n  hint: {ev.hint}" if ev.hint else "")
    return type(ev).__name__


def main_watch(args: argparse.Namespace) -> int:
    """Replay + follow a job's events; 0 when it completes, 1 when it fails."""
    import contextlib

    from stratosd.ctl.follow import replay_and_follow

    async def go() -> int:
        job: TenantJobState = (await ask(args, GetTenantJob(job_id=args.id))).job
        rounds = job.spec.aggregation.rounds
        end: Any = None
        events = replay_and_follow(args, subjects.tenant_events(args.id),
                                   TENANT_EVENT_DECODER, args.timeout or 0)
        async with contextlib.aclosing(events):
            try:
                async for ev, pending in events:
                    if ev is None:
                        continue
                    if args.json:
                        print(msgspec.json.encode(ev).decode(), flush=True)
                    else:
                        print(event_line(ev), flush=True)
                        if isinstance(ev, TenantRoundCompleted | TenantJobCompleted):
                            print(status_rows(ev.tenants, rounds), flush=True)
                    if isinstance(ev, TENANT_TERMINAL):
                        end = ev
                    elif isinstance(ev, TenantJobResumed):
                        end = None
                    if end is not None and not pending:
                        return 0 if isinstance(end, TenantJobCompleted) else 1
            except TimeoutError:
                pass
        print("watch: timed out", file=sys.stderr)
        return 1
    return run_async(go)


def main_status(args: argparse.Namespace) -> int:
    """One job, or the list."""
    return run_async(lambda: show_status(args))


async def show_status(args: argparse.Namespace) -> int:
    """Print one job (args.id), or the list of jobs."""
    if args.id:
        reply = await ask(args, GetTenantJob(job_id=args.id))
        if args.json:
            dump_json(reply)
        else:
            print_job(reply.job)
        return 0
    listing: TenantJobList = await ask(args, ListTenantJobs())
    if args.json:
        dump_json(listing)
    else:
        print(table([[j.job_id, j.name, j.state, j.stage,
                      f"{sum(r.state == 'ok' for r in j.results.values())}"
                      f"/{len(j.spec.tenants)}"]
                     for j in listing.jobs], ["job", "name", "state", "stage",
                                              "tenants ok"]))
    return 0


def main_cancel(args: argparse.Namespace) -> int:
    """Cancel a job (and undeploy its endpoints)."""
    async def go() -> int:
        reply = await ask(args, CancelTenantJob(job_id=args.id), timeout=60)
        if args.json:
            dump_json(reply)
        else:
            job = reply.job
            stopped = [e.endpoint_id for e in job.endpoints if e.state == "stopped"]
            print(f"{job.job_id} {job.state}"
                  + (f"; endpoints stopped: {', '.join(stopped)}" if stopped else ""))
        return 0
    return run_async(go)


def main_report(args: argparse.Namespace) -> int:
    """The Markdown report of a finished job."""
    from stratosd.tenants.report import render_markdown

    async def go() -> int:
        reply = await ask(args, GetTenantJob(job_id=args.id))
        if args.json:
            dump_json(reply)
            return 0
        sys.stdout.write(render_markdown(reply.job) + "\n")
        for kind, path in reply.job.report_paths.items():
            print(f"{kind}: {path}")
        return 0
    return run_async(go)
