"""`stratosctl servers`: the live registry (agents) with their measured capacity, optionally
with catalog offers; `--calibrate` has the agents measure again first."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING

from stratosd.ctl.common import add_common, ago, dump_json, open_bus, run_async, table

if TYPE_CHECKING:
    from schemas.commands import ServerList, ServerRow
    from schemas.telemetry import Capacity
    from stratosd.bus import Bus

EPILOG = """\
examples:
  stratosctl servers                        # hardware, price, measured capacity, latency
  stratosctl servers --calibrate            # every live agent measures again, then the table
  stratosctl servers --calibrate --agent gpu-1 --timeout 120
  stratosctl servers --offers --json        # with catalog offers, machine-readable

columns: TFLOP/S is the dense matmul speed per device in the dtype training uses there (bf16
on GPUs, fp32 on CPUs, at the agent's job thread count); MEM GB/S, DISK MB/S and UPLOAD MB/S
are memory bandwidth, disk write with fsync and upload to the bus. CAPACITY says where they
come from: `measured` (the agent's benchmarks; `measured*` when one failed, see the note
under the table), `estimated` (a table) or `-` (not calibrated yet). LATENCY is what users
see (the agent's --probe-url targets, worst one); `unknown` when nothing measured it. BUSY:
a training job holds the server's devices.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("servers", help="list agents: hardware, price, measured capacity, "
                       "latency, last seen, status",
                       description="List the servers the daemon knows: live agents from their "
                       "telemetry (with the capacity they measured), and with --offers the "
                       "catalog offers too.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--offers", action="store_true", help="include catalog offers (no agent)")
    p.add_argument("--calibrate", action="store_true",
                   help="have the agents re-run their benchmarks first, and wait for the new "
                   "figures")
    p.add_argument("--agent", action="append", default=[], metavar="ID",
                   help="with --calibrate: only this agent (repeatable; default: every live one)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="with --calibrate: wait at most S seconds for the figures (default 60)")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Print the server table (after a calibration round with --calibrate)."""
    async def go() -> int:
        bus = await open_bus(args)
        try:
            late: list[str] = []
            if args.calibrate:
                late = await _calibrate(bus, args.agent, args.timeout)
            reply = await _list(bus, args.offers)
        finally:
            await bus.close()
        if args.json:
            dump_json(reply.servers)
        else:
            print(render(reply.servers))
        if late:
            sys.stderr.write(f"error: no new capacity from {', '.join(late)} within "
                             f"{args.timeout:g} s; their rows show the previous figures\n"
                             "hint: see the agent's log (calibration_incomplete), or raise "
                             "--timeout\n")
            return 1
        return 0
    return run_async(go)


async def _list(bus: Bus, offers: bool = False) -> ServerList:
    from schemas import subjects
    from schemas.commands import ListServers, ServerList
    from stratosd.errors import BusUnavailable, NotFound

    try:
        reply = await bus.request(subjects.daemon_cmd("servers"), ListServers(offers=offers),
                                  timeout=10.0)
    except NotFound as exc:
        raise BusUnavailable(
            "the daemon is not running on this bus",
            hint="start it with `stratosd` (or check --nats / STRATOS_NATS_URL)") from exc
    assert isinstance(reply, ServerList)
    return reply


def _stamp(row: ServerRow) -> datetime | None:
    cap = row.offer.capacity
    return cap.measured_at if cap is not None else None


async def _calibrate(bus: Bus, agent_ids: list[str], timeout_s: float) -> list[str]:
    """Send CalibrateServers, then wait until each agent asked reports a capacity other than
    the one it had before (agents' clocks are not compared with ours); return the late ones."""
    import asyncio

    from schemas import subjects
    from schemas.commands import Accepted, CalibrateServers

    servers = (await _list(bus)).servers
    before = {r.offer.id: _stamp(r) for r in servers}
    requested = agent_ids or [r.offer.id for r in servers if r.offer.status == "up"]
    reply = await bus.request(subjects.daemon_cmd("calibrate"),
                              CalibrateServers(agent_ids=agent_ids), timeout=10.0)
    assert isinstance(reply, Accepted)
    asked = [str(a) for a in reply.detail.get("agents", [])]
    skipped = sorted(set(requested) - set(asked))
    if skipped:
        sys.stderr.write(f"not calibrating {', '.join(skipped)} (busy; see the daemon log)\n")
    deadline = time.monotonic() + timeout_s
    waiting = list(asked)
    shown = ""
    while waiting:
        line = (f"calibrating {len(asked)} server(s): {len(asked) - len(waiting)} done, "
                f"waiting for {', '.join(waiting)}")
        if line != shown:
            sys.stderr.write(line + "\n")
            shown = line
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.5)
        rows = {r.offer.id: r for r in (await _list(bus)).servers}
        waiting = [a for a in waiting
                   if a not in rows or _stamp(rows[a]) in (None, before.get(a))]
    if asked and not waiting:
        sys.stderr.write(f"calibrated {len(asked)} server(s)\n")
    return waiting


def _capacity_cells(cap: Capacity | None, gpu: bool) -> list[str]:
    if cap is None:
        return ["-", "-", "-", "-", "-"]
    dtype = "bf16" if gpu else "fp32"
    tflops = cap.matmul_tflops.get(dtype)
    if tflops is None and cap.matmul_tflops:
        dtype, tflops = next(iter(cap.matmul_tflops.items()))
    source = cap.source + ("*" if cap.error else "")
    return [f"{tflops:.3g} {dtype}" if tflops is not None else "-", _num(cap.mem_bw_gbps),
            _num(cap.disk_write_mbps), _num(cap.upload_mbps), source]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def render(servers: list[ServerRow]) -> str:
    """The server table, with a note per capacity that could not be fully measured."""
    rows = []
    notes = []
    for s in servers:
        o = s.offer
        hw = f"{o.gpu_count}x {o.gpu_model} {o.gpu_mem_mib // 1024}GiB" if o.gpu_count else \
            f"cpu x{o.cpu_count} {o.ram_mib // 1024}GiB"
        latency = f"{o.latency_ms:.1f} ms" if o.latency_known else "unknown"
        agent = o.source == "agent"
        rows.append([o.id, o.source, hw, f"${o.price_usd_per_hour:.2f}/h", latency,
                     o.region or "-", *_capacity_cells(o.capacity, o.gpu_count > 0),
                     ("yes" if o.busy else "no") if agent else "-",
                     ago(s.last_seen) if s.last_seen else "-", o.status, len(s.running_jobs)])
        if o.capacity is not None and o.capacity.error:
            notes.append(f"* {o.id}: {o.capacity.error}")
    out = table(rows, ["ID", "SOURCE", "HARDWARE", "PRICE", "LATENCY", "REGION", "TFLOP/S",
                       "MEM GB/S", "DISK MB/S", "UPLOAD MB/S", "CAPACITY", "BUSY", "LAST SEEN",
                       "STATUS", "JOBS"])
    return "\n".join([out, *notes]) if notes else out
