"""`stratosctl tenants submit FILE | status [ID] | report ID`: per-tenant customisation jobs."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from schemas import subjects
from schemas.base import Message, decode_or_error, encode
from schemas.errors import ErrorReply
from schemas.tenants import (
    TENANT_REPLY_DECODER,
    GetTenantJob,
    ListTenantJobs,
    SubmitTenantJob,
    TenantJob,
    TenantJobList,
    TenantJobState,
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


def print_job(job: TenantJobState) -> None:
    """A job's per-tenant table."""
    print(f"{job.job_id}  {job.name}  {job.state}  stage {job.stage}"
          + (f"\nerror: {job.error}" if job.error else ""))
    rows = []
    for name, r in sorted(job.results.items()):
        acc = (f"{r.accuracy_alone:.3f}" if r.accuracy_alone is not None else "-",
               f"{r.accuracy_aggregated:.3f}" if r.accuracy_aggregated is not None else "-")
        sent = r.bytes.to_agent + r.bytes.from_agent
        rows.append([name, r.state, r.agent, r.student or "-", r.rounds_done, *acc, sent,
                     r.bytes.raw_data])
    print(table(rows, ["tenant", "state", "agent", "student", "rounds", "acc alone",
                       "acc agg", "bytes sent", "raw bytes"]))


def main_status(args: argparse.Namespace) -> int:
    """One job, or the list."""
    async def go() -> int:
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
            print(table([[j.job_id, j.name, j.state, j.stage, len(j.spec.tenants)]
                         for j in listing.jobs], ["job", "name", "state", "stage", "tenants"]))
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
