"""Reliability: load held without losing a job event or growing the daemon, faults survived,
bad input refused. Measures, prints, and writes docs/reliability.md.

Load: a real daemon process and nats-server; N simulated agents publish telemetry at 1 Hz
(as bench_ingest.py) while J simulated jobs publish JobProgress/JobLog events at a few Hz each
through JetStream with Nats-Msg-Id, as agents/runner.py does. Afterwards every acknowledged
event is looked for in the STRATOS_EVENTS stream, and the daemon's durable job consumer must
have taken all of them. The daemon's RSS is sampled every few seconds.

Faults and bad input: runs the fault tests (tests/e2e/test_faults.py, test_restart.py) and the
fuzz tests (tests/schemas/test_fuzz.py) as subprocesses and records their outcomes and how many
inputs were tried.

    python bench/bench_reliability.py [--seconds 300] [--agents 1000] [--jobs 20]
        [--event-hz 4] [--skip-tests] [--doc docs/reliability.md]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.chaos_report import BEGIN, END, write_doc  # noqa: E402
from schemas import subjects  # noqa: E402
from schemas.base import encode, new_id  # noqa: E402
from schemas.events import JobLog, JobProgress  # noqa: E402
from stratosd.bus import Bus, connect  # noqa: E402
from stratosd.config import StratosConfig  # noqa: E402
from stratosd.dispatch import CONSUMER  # noqa: E402
from stratosd.logging import configure_logging  # noqa: E402

SIM_AGENT = "sim-jobs"  # the simulated agent whose jobs publish the events
FAULT_TESTS = ["tests/e2e/test_faults.py", "tests/e2e/test_restart.py"]
FUZZ_TESTS = "tests/schemas/test_fuzz.py"


@dataclass
class Load:
    """What the load phase sent and what came of it."""

    seconds: float = 0.0
    telemetry_sent: int = 0
    events_sent: int = 0
    events_acked: int = 0
    events_failed: int = 0
    events_duplicate: int = 0
    events_in_stream: int = 0
    consumer_pending: int = -1
    consumer_ack_pending: int = -1
    ingest_rate: float = 0.0
    rss_mib: list[tuple[float, float]] = field(default_factory=list)
    cpu_pct: float = 0.0

    @property
    def lost(self) -> int:
        """Acknowledged events missing from the stream."""
        return max(0, self.events_acked - self.events_in_stream)


class RssSampler(threading.Thread):
    """Samples a process's RSS every interval_s until stopped."""

    def __init__(self, pid: int, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        """Sample until halted."""
        while not self.halt.is_set():
            try:
                rss = self.proc.memory_info().rss / 2**20
            except psutil.Error:
                return
            self.samples.append((time.monotonic() - self.t0, rss))
            self.halt.wait(self.interval_s)


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS over time, MiB per minute."""
    if len(samples) < 3:
        return float("nan")
    xs, ys = [s[0] for s in samples], [s[1] for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs) or 1e-9
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 60.0


async def telemetry_agents(url: str, n: int, stop: float, conns: int, load: Load) -> None:
    """The ingest bench's simulated agents, counted into load."""
    from bench.bench_ingest import simulate_agents

    def count() -> None:
        load.telemetry_sent += 1

    await simulate_agents(url, n, stop, conns, count)


async def job_streams(url: str, job_ids: list[str], hz: float, stop: float, load: Load) -> None:
    """One simulated running job per id: progress and log events at hz, acked by JetStream."""
    bus = Bus(await connect(StratosConfig(nats_url=url), "sim-jobs"))

    async def one(job_id: str) -> None:
        await asyncio.sleep(random.random() / hz)
        step = 0
        while time.monotonic() < stop:
            step += 1
            if step % 2:
                event: Any = JobProgress(job_id=job_id, run_id="bench", agent_id="sim-jobs",
                                         step="train", done=float(step), total=1e9,
                                         unit="steps", metrics={"loss": 1.0 / step},
                                         source="sim-jobs")
                name = "progress"
            else:
                event = JobLog(job_id=job_id, run_id="bench", agent_id="sim-jobs",
                               message=f"step {step}", source="sim-jobs")
                name = "log"
            load.events_sent += 1
            try:
                ack = await bus.js.publish(subjects.job_event(SIM_AGENT, job_id, name),
                                           encode(event), headers={"Nats-Msg-Id": event.id})
                load.events_acked += 1
                load.events_duplicate += bool(ack.duplicate)
            except Exception:  # noqa: BLE001 - counted: an unacked event is the agent's to retry
                load.events_failed += 1
            await asyncio.sleep(1.0 / hz)

    try:
        await asyncio.gather(*(one(j) for j in job_ids))
    finally:
        await bus.close()


async def count_stored(url: str, prefix: str, timeout_s: float = 30.0) -> tuple[int, int, int]:
    """Events of the simulated jobs in the stream, and the daemon consumer's backlog."""
    bus = Bus(await connect(StratosConfig(nats_url=url), "bench-count"))
    try:
        info = await bus.js.stream_info(subjects.EVENTS_STREAM,
                                        subjects_filter=subjects.job_events())
        stored = sum(n for subj, n in (info.state.subjects or {}).items()
                     if subj.startswith(f"{subjects.PREFIX}.evt.job.{SIM_AGENT}.{prefix}"))
        deadline = time.monotonic() + timeout_s
        while True:  # the daemon drains its backlog after the load stops
            ci = await bus.js.consumer_info(subjects.EVENTS_STREAM, CONSUMER)
            if (ci.num_pending == 0 and ci.num_ack_pending == 0) or time.monotonic() > deadline:
                return stored, int(ci.num_pending or 0), int(ci.num_ack_pending or 0)
            await asyncio.sleep(0.5)
    finally:
        await bus.close()


def run_load(args: argparse.Namespace) -> Load:
    """Start nats-server and a daemon, put the load on, measure."""
    load = Load()
    from bench.bench_ingest import daemon_on_fresh_bus, ingest_windows

    with daemon_on_fresh_bus() as (url, pid, log):
        sampler = RssSampler(pid, args.sample_s)
        sampler.start()
        proc = psutil.Process(pid)
        proc.cpu_percent(None)
        prefix = f"bench-{new_id()[-8:]}-"
        job_ids = [f"{prefix}{i:02d}" for i in range(args.jobs)]
        t0 = time.monotonic()
        stop = t0 + args.seconds

        async def both() -> None:
            await asyncio.gather(
                telemetry_agents(url, args.agents, stop, args.connections, load),
                job_streams(url, job_ids, args.event_hz, stop, load))

        asyncio.run(both())
        load.seconds = time.monotonic() - t0
        load.cpu_pct = proc.cpu_percent(None)
        stored, pending, ack_pending = asyncio.run(count_stored(url, prefix))
        load.events_in_stream = stored
        load.consumer_pending, load.consumer_ack_pending = pending, ack_pending
        time.sleep(args.sample_s)  # one more sample after the load
        sampler.halt.set()
        sampler.join()
        load.rss_mib = sampler.samples
    windows = ingest_windows(log)
    full = [w for w in windows if w.get("agents_up", 0) >= args.agents * 0.99] or windows
    load.ingest_rate = statistics.median(w["msgs_per_s"] for w in full) if full else 0.0
    return load


@dataclass
class TestRun:
    """Outcomes of one pytest invocation."""

    outcomes: dict[str, tuple[str, float]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    examples: int = 0
    seconds: float = 0.0


def run_pytest(paths: list[str], *extra: str) -> TestRun:
    """Run pytest in a subprocess; per-test outcome from its JUnit XML."""
    out = TestRun()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider",
             f"--junitxml={xml}", *extra], cwd=ROOT, capture_output=True, text=True,
            check=False)
        out.seconds = time.monotonic() - t0
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        out.summary = next((ln.strip("= ") for ln in reversed(lines)
                            if re.search(r"\d+ (passed|failed|error)", ln)), "no result")
        out.examples = sum(int(n) for n in re.findall(r"(\d+) passing", proc.stdout))
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
                state = "passed"
                for child in case:
                    if child.tag in ("failure", "error"):
                        state = "failed"
                    elif child.tag == "skipped":
                        out.reasons[name] = child.get("message") or ""
                        state = ("xfailed (known bug)" if "xfail" in (child.get("type") or "")
                                 + (child.get("message") or "") else "skipped")
                out.outcomes[name] = (state, float(case.get("time", 0.0)))
    return out


def live_payloads() -> int:
    """How many fuzzed commands the live fuzz test fires."""
    text = (ROOT / FUZZ_TESTS).read_text()
    m = re.search(r"_live_payloads\((\d+)\)", text)
    return int(m.group(1)) if m else 0


def report(args: argparse.Namespace, load: Load, faults: TestRun | None,
           fuzz: TestRun | None) -> str:
    """docs/reliability.md, from the measured figures."""
    rss = [r for _, r in load.rss_mib] or [float("nan")]
    second_half = [s for s in load.rss_mib if s[0] >= load.seconds / 2]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    host = f"{platform.node()}, {psutil.cpu_count()} cores, Python {platform.python_version()}"
    lines = [
        "# Reliability",
        "",
        f"Measured by `bench/bench_reliability.py` on {now} ({host}); load phase "
        f"{load.seconds:.0f} s{' (shortened)' if args.seconds < 300 else ''}. "
        "Re-run it to refresh every figure on this page but the chaos soak's "
        "(`bench/bench_chaos.py`).",
        "",
        "## Summary",
        "",
        "| what | measured |",
        "|---|---|",
    ]
    if faults is not None:
        passed = sum(s == "passed" for s, _ in faults.outcomes.values())
        lines.append(f"| faults survived | {passed} of {len(faults.outcomes)} scenarios "
                     f"({faults.summary}) |")
    if fuzz is not None:
        lines.append(f"| bad inputs tried | {fuzz.examples + live_payloads():,} "
                     f"({fuzz.examples:,} generated by hypothesis, {live_payloads()} fired at a "
                     f"live daemon and agent); {fuzz.summary} |")
    lines += [
        f"| job events lost | **{load.lost}** of {load.events_acked:,} acknowledged "
        f"({load.events_in_stream:,} in the stream, {load.events_failed} publishes failed, "
        f"{load.events_duplicate} duplicates) |",
        f"| daemon consumer backlog after load | {load.consumer_pending} pending, "
        f"{load.consumer_ack_pending} unacknowledged |",
        f"| daemon RSS | start {rss[0]:.1f} MiB, end {rss[-1]:.1f} MiB, max {max(rss):.1f} MiB; "
        f"slope {slope_mib_per_min(load.rss_mib):+.2f} MiB/min overall, "
        f"{slope_mib_per_min(second_half):+.2f} MiB/min in the second half |",
        f"| telemetry | {args.agents:,} agents at 1 Hz: {load.telemetry_sent:,} messages, "
        f"daemon ingest {load.ingest_rate:,.0f} msgs/s (median 5 s window) |",
        f"| job events | {args.jobs} jobs at {args.event_hz:g} Hz: "
        f"{load.events_acked / max(load.seconds, 1e-9):,.0f} events/s through JetStream |",
        f"| daemon CPU | {load.cpu_pct:.0f} % of one core (average over the load) |",
        "",
        "## Faults",
        "",
        "Real daemon and agent processes on loopback (`tests/e2e/`), each run is the tiny "
        "Mahjong job of `tests/e2e/jobs.py` with every stage running for real.",
        "",
    ]
    if faults is not None:
        lines += ["| scenario | outcome | seconds |", "|---|---|---|"]
        for name, (state, secs) in sorted(faults.outcomes.items()):
            lines.append(f"| `{name}` | {state} | {secs:.0f} |")
        lines.append("")
    lines += [
        "- **Agent SIGKILLed mid-training** (`test_faults.py`): the daemon marks it down after "
        "3 missed heartbeats (`agent_down`), the train stage retries on the other live agent "
        "(`server_reselected`) and resumes from `{run_id}/train-checkpoint.tar` "
        "(`results.train.resumed = true`); the run completes.",
        "- **nats-server restarted mid-run** (same port and JetStream store), at once and after "
        "8 s down in the middle of training: daemon and agents reconnect; the run completes; "
        "its event history holds a started/completed pair for every stage, no duplicates, "
        "and the KV run state is intact.",
        "- **Daemon SIGKILLed mid-run** (`test_restart.py`): a new daemon resumes the run from "
        "KV and its durable job consumer; a late watcher replays every event in order.",
        "- **Teacher times out or returns garbage**: covered below the bus, where it is cheap, "
        "by `tests/plugins/test_synthesize.py::test_garbage_and_timeouts_mark_rows_failed` "
        "(retried, then the row is marked failed and the job continues) and the retry tests "
        "in `tests/plugins/test_teachers.py`.",
        "",
        "Fixed after they were seen here: a failed checkpoint upload during a bus outage is "
        "logged and skipped (the next checkpoint is uploaded) and a job that fails in the "
        "agent has its child process group stopped (`agents/runner.py`); liveness pauses "
        "while the daemon itself is disconnected, so its own outage does not mark agents "
        "down (`stratosd/fleet.py`).",
        "",
        "## Bad input",
        "",
        "`tests/schemas/test_fuzz.py`: every wire decoder (events, agent and daemon commands, "
        "replies, telemetry) through `decode_or_error` returns a typed message or raises "
        "`BadMessage` naming a field; the job-spec parser (`spec_from_data`, "
        "`parse_spec_toml`, then `validate_spec`) raises only `ConfigError`. A live daemon and "
        "agent answer fuzzed commands with valid replies or `ErrorReply` (never `internal`), "
        "keep serving and run nothing. Messages over NATS `max_payload` (2 MiB against 1 MiB) "
        "are refused with `MaxPayloadError` by the client, or `-ERR 'Maximum Payload "
        "Violation'` by the server, and the daemon keeps serving. Artifact names (`artifact_key`, "
        "`StepContext.output`) and `RunStep` input names cannot leave the job's directory (the "
        "job fails naming the bad name); tar inputs with `../` members or absolute symlinks are "
        "refused by `tarfile`'s `data` filter, and absolute member paths are re-rooted inside "
        "the input directory.",
        "",
    ]
    if fuzz is not None:
        known = [n for n, (s, _) in fuzz.outcomes.items() if s.startswith("xfailed")]
        if known:
            lines += ["Known bugs, pinned by strict `xfail` tests until fixed:", ""]
            by_reason: dict[str, list[str]] = {}
            for n in sorted(known):
                by_reason.setdefault(fuzz.reasons.get(n, ""), []).append(f"`{n}`")
            lines += [f"- {', '.join(names)}: {why}" for why, names in by_reason.items()]
            lines.append("")
    lines += [
        "## Load",
        "",
        f"{args.agents:,} simulated agents publish telemetry at 1 Hz over {args.connections} "
        f"connections, while {args.jobs} simulated jobs publish `JobProgress`/`JobLog` events "
        f"at {args.event_hz:g} Hz each through JetStream with `Nats-Msg-Id`, as "
        "`agents/runner.py` does. Every acknowledged event is counted in `STRATOS_EVENTS` "
        "afterwards, and the daemon's durable consumer (`stratosd-jobs`) must have taken "
        f"them all. The daemon's RSS is sampled every {args.sample_s:g} s:",
        "",
        "| t (s) | RSS (MiB) |",
        "|---|---|",
    ]
    step = max(1, len(load.rss_mib) // 12)
    picks = load.rss_mib[::step] + ([load.rss_mib[-1]] if load.rss_mib[-1:] else [])
    seen: set[float] = set()
    for t, r in picks:
        if t not in seen:
            seen.add(t)
            lines.append(f"| {t:.0f} | {r:.1f} |")
    lines += [
        "",
        "## Re-run",
        "",
        "```",
        "python bench/bench_reliability.py                 # ~5 min of load, then the tests",
        "python bench/bench_reliability.py --seconds 60    # shorter load",
        "python bench/bench_reliability.py --skip-tests    # load only",
        "pytest tests/e2e/test_faults.py tests/e2e/test_restart.py tests/schemas/test_fuzz.py",
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Measure, print, write the doc."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300.0, help="load duration")
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--event-hz", type=float, default=4.0, help="events per second per job")
    p.add_argument("--sample-s", type=float, default=3.0, help="RSS sampling interval")
    p.add_argument("--skip-tests", action="store_true", help="load only, no pytest runs")
    p.add_argument("--doc", default=str(ROOT / "docs" / "reliability.md"),
                   help="where to write the report ('' for none)")
    args = p.parse_args()
    configure_logging("warning", "console")  # the simulators' connect/close lines are noise

    load = run_load(args)
    rss = [r for _, r in load.rss_mib] or [float("nan")]
    print(f"load                 {load.seconds:.0f} s: {args.agents} agents at 1 Hz, "
          f"{args.jobs} jobs at {args.event_hz:g} Hz")
    print(f"telemetry            {load.telemetry_sent} sent, daemon ingest "
          f"{load.ingest_rate:.0f} msgs/s (median 5 s window)")
    print(f"job events           {load.events_sent} sent, {load.events_acked} acked, "
          f"{load.events_failed} failed, {load.events_duplicate} duplicate, "
          f"{load.events_in_stream} in stream → lost {load.lost}; "
          f"{load.events_acked / max(load.seconds, 1e-9):.0f} events/s")
    print(f"daemon consumer      {load.consumer_pending} pending, "
          f"{load.consumer_ack_pending} unacked after the load")
    print(f"daemon RSS           start {rss[0]:.1f} MiB, end {rss[-1]:.1f} MiB, max "
          f"{max(rss):.1f} MiB, slope {slope_mib_per_min(load.rss_mib):+.2f} MiB/min "
          f"({len(load.rss_mib)} samples)")
    print(f"daemon CPU           {load.cpu_pct:.0f} % of one core")

    faults = fuzz = None
    if not args.skip_tests:
        fuzz = run_pytest([FUZZ_TESTS], "--hypothesis-show-statistics")
        print(f"fuzz tests           {fuzz.summary}; {fuzz.examples} generated inputs + "
              f"{live_payloads()} live payloads ({fuzz.seconds:.0f} s)")
        faults = run_pytest(FAULT_TESTS)
        print(f"fault tests          {faults.summary} ({faults.seconds:.0f} s)")
        for name, (state, secs) in sorted(faults.outcomes.items()):
            print(f"  {state:8} {secs:5.0f} s  {name}")
    if args.doc:
        doc = Path(args.doc)
        doc.parent.mkdir(parents=True, exist_ok=True)
        old = doc.read_text() if doc.exists() else ""
        doc.write_text(report(args, load, faults, fuzz))
        if BEGIN in old and END in old:  # bench_chaos.py's section stays as it was
            write_doc(doc, BEGIN + old.split(BEGIN, 1)[1].split(END, 1)[0] + END)
        print(f"wrote                {doc}")


if __name__ == "__main__":
    main()
