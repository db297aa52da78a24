"""Telemetry ingest: N simulated agents at 1 Hz against a real daemon process.

Prints the messages/s the daemon sustains, its CPU %, and the p50/p99 delay from publish to
registry update (measured by the daemon itself and logged as `telemetry_ingest`). Also prints the
start-up time of `stratosd --help` and `stratosctl servers --help` (no torch on those paths).

    python bench/bench_ingest.py [--agents 1000] [--seconds 30] [--connections 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from schemas import subjects  # noqa: E402
from schemas.base import encode  # noqa: E402
from schemas.telemetry import AgentTelemetry, GpuInfo  # noqa: E402
from stratosd.bus import Bus, connect  # noqa: E402
from stratosd.config import StratosConfig  # noqa: E402
from stratosd.natsd import NatsServer  # noqa: E402


def startup(cmd: list[str], n: int = 5) -> float:
    """Median wall time of a command, seconds."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def daemon_on_fresh_bus() -> Iterator[tuple[str, int, Path]]:
    """A nats-server and a `stratosd` process on it (ingest stats every 5 s) for the block:
    yields the NATS URL, the daemon's pid and its JSON log (readable after the block)."""
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats")
        url = server.start()
        log = Path(tempfile.mkstemp(prefix="stratosd-bench-", suffix=".log")[1])
        env = {**os.environ, "STRATOS_HOME": str(Path(tmp) / "home"),
               "STRATOS_INGEST_REPORT_S": "5", "STRATOS_MISSED_HEARTBEATS": "5"}
        with log.open("wb") as fh:
            daemon = subprocess.Popen([sys.executable, "-m", "stratosd", "--nats", url,
                                       "--log-format", "json"], stdout=fh,
                                      stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            try:
                deadline = time.monotonic() + 60
                while "daemon_started" not in log.read_text(errors="replace"):
                    if daemon.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"daemon did not start:\n{log.read_text()[-2000:]}")
                    time.sleep(0.2)
                yield url, daemon.pid, log
            finally:
                daemon.terminate()
                daemon.wait(30)
                server.stop()


def ingest_windows(log: Path) -> list[dict[str, Any]]:
    """The daemon's `telemetry_ingest` log lines."""
    return [json.loads(line) for line in log.read_text(errors="replace").splitlines()
            if '"telemetry_ingest"' in line]


async def simulate_agents(url: str, n: int, stop: float, conns: int,
                          on_sent: Callable[[], None] = lambda: None) -> None:
    """n agents over conns connections, each publishing telemetry at 1 Hz until stop
    (a time.monotonic() deadline); on_sent is called once per message."""
    buses = [Bus(await connect(StratosConfig(nats_url=url), f"sim-{i}")) for i in range(conns)]
    gpu = [GpuInfo(index=0, model="NVIDIA H100 80GB HBM3", mem_total_mib=81559)]

    async def one(i: int) -> None:
        bus = buses[i % conns]
        agent_id = f"sim-{i:05d}"
        subj = subjects.telemetry(agent_id)
        await asyncio.sleep(random.random())
        seq = 0
        while time.monotonic() < stop:
            seq += 1
            msg = AgentTelemetry(agent_id=agent_id, seq=seq, gpus=gpu, cpu_count=64,
                                 ram_total_mib=512_000, price_usd_per_hour=2.0 + i % 7,
                                 latency_ms=5.0, interval_s=1.0)
            await bus.nc.publish(subj, encode(msg))
            on_sent()
            await asyncio.sleep(1.0)

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for b in buses:
            await b.nc.flush()
            await b.close()


async def agents(url: str, n: int, seconds: float, conns: int) -> int:
    """Run the simulation for seconds; the number of messages published."""
    sent = [0]

    def count() -> None:
        sent[0] += 1

    await simulate_agents(url, n, time.monotonic() + seconds, conns, count)
    return sent[0]


def main() -> None:
    """Run the benchmark and print its figures."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--connections", type=int, default=10)
    args = p.parse_args()
    py = sys.executable
    print(f"stratosd --help           {startup([py, '-m', 'stratosd', '--help']) * 1000:7.0f} ms")
    print(f"stratosctl servers --help {startup([py, '-m', 'stratosd.ctl', 'servers', '--help']) * 1000:7.0f} ms")  # noqa: E501
    with daemon_on_fresh_bus() as (url, pid, log):
        proc = psutil.Process(pid)
        proc.cpu_percent(None)
        t0 = time.monotonic()
        sent = asyncio.run(agents(url, args.agents, args.seconds, args.connections))
        elapsed = time.monotonic() - t0
        cpu = proc.cpu_percent(None)
        time.sleep(6)  # one more report window for the tail of the stream
    windows = ingest_windows(log)
    full = [w for w in windows if w.get("agents_up", 0) >= args.agents * 0.99] or windows
    rate = statistics.median(w["msgs_per_s"] for w in full) if full else 0.0
    p99 = max((w.get("delay_ms_p99", 0.0) for w in full), default=float("nan"))
    p50 = statistics.median(w.get("delay_ms_p50", 0.0) for w in full) if full else float("nan")
    print(f"agents                    {args.agents} at 1 Hz over {args.connections} connections, "
          f"{elapsed:.0f} s, {sent} messages published")
    print(f"daemon ingest             {rate:7.0f} msgs/s (median of {len(full)} windows of 5 s)")
    steady = full[1:] or full
    p99_steady = max((w.get("delay_ms_p99", 0.0) for w in steady), default=float("nan"))
    print("windows (msgs/s, p99 ms): " + ", ".join(
        f"{w['msgs_per_s']:.0f}/{w.get('delay_ms_p99', 0):.1f}" for w in windows))
    print(f"daemon CPU                {cpu:7.1f} % of one core (average over the run)")
    print(f"publish→registry delay    p50 {p50:.2f} ms, p99 {p99_steady:.2f} ms steady state "
          f"(worst window after registration), {p99:.2f} ms worst window overall")
    print(f"target                    1,000 agents at 1 Hz with p99 < 100 ms: "
          f"{'met' if rate >= args.agents * 0.95 and p99_steady < 100 else 'NOT met'}")


if __name__ == "__main__":
    main()
