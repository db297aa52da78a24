"""Telemetry ingest: N simulated agents at 1 Hz against a real daemon process; CLI start-up.

The simulated agents publish real `AgentTelemetry` messages on their own `stratos.tlm.{id}`
subjects through nats (from `--procs` worker processes, so that the simulator is not the
bottleneck); the daemon is a real `stratosd` process on a fresh nats-server. Prints the
messages/s the daemon sustains, its CPU (% of one core) and RSS, and the p50/p95/p99 delay from
publish to registry update (measured by the daemon itself, logged as `telemetry_ingest` every
5 s). Also prints the start-up time of `stratosd --help`, `stratosctl --help` and
`stratosctl servers --help` (median of `--cli-runs` runs of the installed entry points).

    python bench/bench_ingest.py [--agents 1000] [--seconds 30] [--connections 10] [--procs N]
    python bench/bench_ingest.py --agents 10000 --seconds 60
    python bench/bench_ingest.py --cli-only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
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

SLOTS = 50  # publish ticks per second; each agent keeps its own phase within the second
REPORT_S = 5  # the daemon's ingest report window in this bench
TARGET_P99_MS = 100.0


def startup(cmd: list[str], n: int = 5) -> float:
    """Median wall time of a command, seconds."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def entry_point(name: str, module: str) -> list[str]:
    """The installed console script next to this Python (what an operator types), else
    `python -m module`."""
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def cli_timings(runs: int) -> list[tuple[str, float]]:
    """(command, median seconds) for the `--help` paths an operator types all day."""
    stratosd = entry_point("stratosd", "stratosd")
    ctl = entry_point("stratosctl", "stratosd.ctl")
    cmds = [("stratosd --help", [*stratosd, "--help"]), ("stratosctl --help", [*ctl, "--help"]),
            ("stratosctl servers --help", [*ctl, "servers", "--help"])]
    startup(cmds[1][1], 1)  # warm the page cache: the first run reads every .pyc from disk
    return [(label, startup(cmd, runs)) for label, cmd in cmds]


@contextlib.contextmanager
def daemon_on_fresh_bus(
    env_extra: dict[str, str] | None = None,
) -> Iterator[tuple[str, int, Path]]:
    """A nats-server and a `stratosd` process on it (ingest stats every 5 s) for the block:
    yields the NATS URL, the daemon's pid and its JSON log (readable after the block)."""
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats")
        url = server.start()
        log = Path(tempfile.mkstemp(prefix="stratosd-bench-", suffix=".log")[1])
        env = {**os.environ, "STRATOS_HOME": str(Path(tmp) / "home"),
               "STRATOS_INGEST_REPORT_S": str(REPORT_S), "STRATOS_MISSED_HEARTBEATS": "5",
               **(env_extra or {})}
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
                daemon.wait(60)
                server.stop()


def ingest_windows(log: Path) -> list[dict[str, Any]]:
    """The daemon's `telemetry_ingest` log lines."""
    return [json.loads(line) for line in log.read_text(errors="replace").splitlines()
            if '"telemetry_ingest"' in line]


async def simulate_agents(url: str, n: int, stop: float, conns: int,
                          on_sent: Callable[[], None] = lambda: None, first: int = 0) -> None:
    """Agents first..first+n-1 over conns connections, each publishing its telemetry at 1 Hz
    until stop (a time.monotonic() deadline); on_sent is called once per message.

    One loop ticks SLOTS times a second and publishes the agents whose phase falls in that
    tick: per-agent tasks and timers would cost the simulator more than the daemon."""
    buses = [Bus(await connect(StratosConfig(nats_url=url), f"sim-{first}-{i}"))
             for i in range(conns)]
    gpu = [GpuInfo(index=0, model="NVIDIA H100 80GB HBM3", mem_total_mib=81559)]
    slots: list[list[int]] = [[] for _ in range(SLOTS)]
    for i in range(first, first + n):
        slots[random.randrange(SLOTS)].append(i)
    ids = {i: f"sim-{i:05d}" for i in range(first, first + n)}
    subj = {i: subjects.telemetry(a) for i, a in ids.items()}
    seq = dict.fromkeys(ids, 0)
    t0 = time.monotonic()
    tick = 0
    try:
        while (target := t0 + tick / SLOTS) < stop:
            wait = target - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            for i in slots[tick % SLOTS]:
                seq[i] += 1
                msg = AgentTelemetry(agent_id=ids[i], seq=seq[i], gpus=gpu, cpu_count=64,
                                     cpu_pct=random.random() * 100, ram_total_mib=512_000,
                                     price_usd_per_hour=2.0 + i % 7, latency_ms=5.0,
                                     interval_s=1.0)
                await buses[i % conns].nc.publish(subj[i], encode(msg))
                on_sent()
            tick += 1
    finally:
        for b in buses:
            await b.nc.flush()
            await b.close()


async def agents(url: str, n: int, seconds: float, conns: int, first: int = 0) -> int:
    """Run the simulation for seconds; the number of messages published."""
    sent = [0]

    def count() -> None:
        sent[0] += 1

    await simulate_agents(url, n, time.monotonic() + seconds, conns, count, first)
    return sent[0]


def worker(args: argparse.Namespace) -> None:
    """One simulator process: its share of the agents from --start-at (a wall-clock time, so
    all workers begin together), then the count of messages sent as JSON on stdout."""
    delay = args.start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    sent = asyncio.run(agents(args.url, args.agents, args.seconds, args.connections, args.first))
    print(json.dumps({"sent": sent}))


def renice(pids: list[int], nice: int) -> None:
    """Set the scheduling priority of pids (negative: higher, needs root); 0 leaves them."""
    for pid in pids if nice else []:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except OSError as exc:
            raise SystemExit(f"--nice {nice}: {exc}") from None


def run_workers(url: str, n: int, seconds: float, conns: int, procs: int, nice: int = 0) -> int:
    """Spread n agents over procs simulator processes; total messages published."""
    start_at = time.time() + 3.0  # time to start the interpreters and connect
    share = math.ceil(n / procs)
    children = []
    for p in range(procs):
        first, count = p * share, min(share, n - p * share)
        if count <= 0:
            break
        children.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--url", url, "--first", str(first),
             "--agents", str(count), "--seconds", str(seconds), "--start-at", str(start_at),
             "--connections", str(max(1, conns // procs))],
            stdout=subprocess.PIPE, text=True, cwd=ROOT))
    renice([c.pid for c in children], nice)
    sent = 0
    for child in children:
        out, _ = child.communicate(timeout=seconds + 120)
        if child.returncode != 0:
            raise SystemExit(f"simulator process failed ({child.returncode})")
        sent += json.loads(out.strip().splitlines()[-1])["sent"]
    return sent


class Sampler(threading.Thread):
    """The daemon's CPU time and RSS, sampled every second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float, float]] = []  # monotonic t, CPU s, RSS MiB
        self.halt = threading.Event()

    def run(self) -> None:
        """Sample until halted."""
        proc = psutil.Process(self.pid)
        while not self.halt.is_set():
            with contextlib.suppress(psutil.Error):
                cpu = proc.cpu_times()
                self.samples.append((time.monotonic(), cpu.user + cpu.system,
                                     proc.memory_info().rss / 2**20))
            self.halt.wait(1.0)

    def cpu_pct(self, since: float, until: float) -> float:
        """Average CPU between two monotonic times, % of one core."""
        inside = [s for s in self.samples if since <= s[0] <= until]
        if len(inside) < 2:
            return float("nan")
        (t0, c0, _), (t1, c1, _) = inside[0], inside[-1]
        return (c1 - c0) / max(t1 - t0, 1e-9) * 100.0


class Probe(threading.Thread):
    """A plain subscriber to a sample of the agents' telemetry, on its own connection and
    event loop: the publish→delivery delay of the bus alone, to set beside the daemon's."""

    def __init__(self, url: str, agent_ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.agent_ids = agent_ids
        self.delays_ms: list[tuple[float, float]] = []  # monotonic arrival, delay
        self.halt = threading.Event()

    def run(self) -> None:
        """Subscribe, record delays until halted."""
        asyncio.run(self._main())

    async def _main(self) -> None:
        from datetime import UTC, datetime

        from schemas.telemetry import TELEMETRY_DECODER

        bus = Bus(await connect(StratosConfig(nats_url=self.url), "bench-probe"))

        async def cb(msg: Any) -> None:
            tlm = TELEMETRY_DECODER.decode(msg.data)
            self.delays_ms.append((time.monotonic(),
                                   (datetime.now(UTC) - tlm.ts).total_seconds() * 1000))

        for agent_id in self.agent_ids:
            await bus.nc.subscribe(subjects.telemetry(agent_id), cb=cb)
        while not self.halt.is_set():
            await asyncio.sleep(0.2)
        await bus.close()

    def percentiles(self) -> tuple[float, float, float]:
        """p50, p95, p99 as the daemon's figures are made: per REPORT_S window, the median
        over the windows, leaving out the first two (registration) and the last."""
        if not self.delays_ms:
            return math.nan, math.nan, math.nan
        t0 = self.delays_ms[0][0]
        windows: dict[int, list[float]] = {}
        for t, d in self.delays_ms:
            windows.setdefault(int((t - t0) // REPORT_S), []).append(d)
        steady = [sorted(w) for _, w in sorted(windows.items())][2:-1] or \
            [sorted(d for _, d in self.delays_ms)]

        def q(p: float) -> float:
            return float(statistics.median(w[min(len(w) - 1, int(len(w) * p))] for w in steady))

        return q(0.5), q(0.95), q(0.99)


class Scraper(threading.Thread):
    """Scrapes the daemon's /metrics every interval_s, as Prometheus would."""

    def __init__(self, url: str, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.interval_s = interval_s
        self.scrapes: list[tuple[float, int, int]] = []  # seconds, bytes, samples
        self.halt = threading.Event()

    def run(self) -> None:
        """Scrape until halted."""
        import urllib.request

        while not self.halt.wait(self.interval_s):
            t0 = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=30) as reply:  # noqa: S310 - loopback
                body = reply.read()
            took = time.perf_counter() - t0
            samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
            self.scrapes.append((took, len(body), samples))


def metrics_url(log: Path) -> str:
    """The daemon's metrics endpoint, from its `metrics_serving` log line."""
    for line in log.read_text(errors="replace").splitlines():
        if '"metrics_serving"' in line:
            return f"http://127.0.0.1:{json.loads(line)['port']}/metrics"
    raise SystemExit("the daemon logged no metrics_serving line")


def summarize(windows: list[dict[str, Any]], n: int) -> dict[str, float]:
    """Steady-state figures from the daemon's report windows: those with the whole fleet up,
    after the one in which they registered."""
    full = [w for w in windows if w.get("agents_up", 0) >= n * 0.99] or windows
    steady = full[1:-1] or full  # the last window holds the end of the stream
    if not steady:
        return {}

    def med(key: str) -> float:
        return float(statistics.median(float(w.get(key, math.nan)) for w in steady))

    return {"windows": len(steady), "msgs_per_s": med("msgs_per_s"),
            "p50": med("delay_ms_p50"), "p95": med("delay_ms_p95"), "p99": med("delay_ms_p99"),
            "p99_worst": max(w.get("delay_ms_p99", math.nan) for w in steady),
            "max": max(w.get("delay_ms_max", math.nan) for w in steady)}


def main() -> None:
    """Run the benchmark and print its figures."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--procs", type=int, default=0,
                   help="simulator processes (default: one per 5,000 agents)")
    p.add_argument("--cli-runs", type=int, default=9, help="runs per CLI start-up timing")
    p.add_argument("--scrape-s", type=float, default=0.0,
                   help="serve the daemon's Prometheus metrics and scrape them every S seconds "
                   "during the run (default 0: metrics off)")
    p.add_argument("--nice", type=int, default=0,
                   help="scheduling priority of nats-server, the daemon and the simulator "
                   "(e.g. -5 on a shared host, as root; default 0: unchanged)")
    p.add_argument("--cli-only", action="store_true", help="only the CLI start-up timings")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"CLI start-up, median of {args.cli_runs} runs of the installed entry points:")
    for label, seconds in cli_timings(args.cli_runs):
        print(f"  {label:28s}{seconds * 1000:7.0f} ms")
    if args.cli_only:
        return
    procs = args.procs or max(1, math.ceil(args.agents / 5000))
    env = {"STRATOS_METRICS_PORT": "0"} if args.scrape_s else None
    scraper = None
    with daemon_on_fresh_bus(env) as (url, pid, log):
        if args.scrape_s:
            scraper = Scraper(metrics_url(log), args.scrape_s)
            scraper.start()
        renice([pid, *(c.pid for c in psutil.Process().children() if c.pid != pid)], args.nice)
        sampler = Sampler(pid)
        sampler.start()
        probe = Probe(url, [f"sim-{i:05d}" for i in range(0, args.agents, 50)])
        probe.start()
        nats = [c for c in psutil.Process().children() if "nats-server" in c.name()]
        nats_cpu0 = sum(c.cpu_times().user + c.cpu_times().system for c in nats)
        sims0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        sent = run_workers(url, args.agents, args.seconds, args.connections, procs, args.nice)
        elapsed = time.monotonic() - t0
        sims1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        nats_pct = (sum(c.cpu_times().user + c.cpu_times().system for c in nats)
                    - nats_cpu0) / elapsed * 100
        sim_pct = (sims1.ru_utime + sims1.ru_stime - sims0.ru_utime - sims0.ru_stime) \
            / elapsed * 100
        time.sleep(REPORT_S + 1)  # one more report window for the tail of the stream
        sampler.halt.set()
        sampler.join()
        probe.halt.set()
        probe.join()
        if scraper is not None:
            scraper.halt.set()
            scraper.join()
    windows = ingest_windows(log)
    s = summarize(windows, args.agents)
    steady_from = t0 + 3.0 + 2 * REPORT_S  # start-up delay of the workers + registration
    cpu_steady = sampler.cpu_pct(steady_from, t0 + 3.0 + args.seconds)
    cpu_all = sampler.cpu_pct(t0, t0 + elapsed)
    rss = [r for _, _, r in sampler.samples]
    print(f"agents                    {args.agents} at 1 Hz from {procs} process(es) over "
          f"{args.connections} connections, {args.seconds:.0f} s: {sent} messages published")
    print("windows (msgs/s / p99 ms): " + ", ".join(
        f"{w['msgs_per_s']:.0f}/{w.get('delay_ms_p99', 0):.1f}" for w in windows))
    if not s:
        print("no ingest report from the daemon")
        return
    print(f"daemon ingest             {s['msgs_per_s']:7.0f} msgs/s (median of {s['windows']:.0f}"
          f" steady windows of {REPORT_S} s)")
    print(f"publish→registry delay    p50 {s['p50']:.2f} ms, p95 {s['p95']:.2f} ms, "
          f"p99 {s['p99']:.2f} ms (medians over the steady windows); worst window p99 "
          f"{s['p99_worst']:.2f} ms, max {s['max']:.1f} ms")
    b50, b95, b99 = probe.percentiles()
    print(f"bus alone                 p50 {b50:.2f} ms, p95 {b95:.2f} ms, p99 {b99:.2f} ms "
          f"(a plain subscriber to {len(probe.agent_ids)} of the agents, same method)")
    print(f"daemon CPU                {cpu_steady:7.1f} % of one core steady state "
          f"({cpu_all:.1f} % over the whole run, registration included)")
    print(f"the rest of the bench      nats-server {nats_pct:.0f} %, simulator {sim_pct:.0f} % "
          f"of one core (over the run)")
    if scraper is not None and scraper.scrapes:
        took, size, samples = sorted(scraper.scrapes)[len(scraper.scrapes) // 2]
        print(f"metrics scrape            {took * 1000:7.0f} ms for {samples:,} samples, "
              f"{size / 2**20:.1f} MiB (median of {len(scraper.scrapes)}, every "
              f"{args.scrape_s:g} s; slowest {max(scraper.scrapes)[0] * 1000:.0f} ms)")
    if rss:
        print(f"daemon RSS                {rss[-1]:7.1f} MiB at the end (max {max(rss):.1f} MiB)")
    print(f"host                      {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} (1 min) at the end: the simulator, nats-server and "
          f"anything else running share them" + (f"; bench processes at nice {args.nice}"
                                                   if args.nice else ""))
    met = (s["msgs_per_s"] >= args.agents * 0.95 and s["p99"] < TARGET_P99_MS
           and cpu_steady < 100.0)
    print(f"target                    {args.agents:,} agents at 1 Hz, p99 < "
          f"{TARGET_P99_MS:.0f} ms, under one core: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
