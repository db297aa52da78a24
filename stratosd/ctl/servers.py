"""`stratosctl servers`: the live registry (agents), optionally with catalog offers."""

from __future__ import annotations

import argparse

from schemas.commands import ListServers
from stratosd.ctl.common import add_common, ago, ask, dump_json, run_async, table


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("servers", help="list agents: hardware, price, latency, last seen, status",
                       description="List the servers the daemon knows: live agents from their "
                       "telemetry, and with --offers the catalog offers too.")
    p.add_argument("--offers", action="store_true", help="include catalog offers (no agent)")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Print the server table."""
    async def go() -> int:
        reply = await ask(args, "servers", ListServers(offers=args.offers))
        if args.json:
            dump_json(reply.servers)
            return 0
        rows = []
        for s in reply.servers:
            o = s.offer
            hw = f"{o.gpu_count}x {o.gpu_model} {o.gpu_mem_mib // 1024}GiB" if o.gpu_count else \
                f"cpu x{o.cpu_count} {o.ram_mib // 1024}GiB"
            rows.append([o.id, o.source, hw, f"${o.price_usd_per_hour:.2f}/h",
                         f"{o.latency_ms:.1f} ms", o.region or "-",
                         ago(s.last_seen) if s.last_seen else "-", o.status,
                         len(s.running_jobs)])
        print(table(rows, ["ID", "SOURCE", "HARDWARE", "PRICE", "LATENCY", "REGION",
                           "LAST SEEN", "STATUS", "JOBS"]))
        return 0
    return run_async(go)
