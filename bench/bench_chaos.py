"""Chaos soak through the real paths: a 3-node NATS cluster, the daemon and agents as real
processes, a steady queue of tiny pipeline runs, and a random fault every ~60 s.

Faults (a shuffled bag, so every kind comes up equally often): an agent SIGKILLed with its job
children (restarted after --agent-restart-s), an agent and its children SIGSTOPped for
--stop-s, a cluster member SIGKILLed (restarted after --node-down-s), the daemon SIGKILLed
(restarted after --daemon-restart-s). One fault at a time; each is recovered before the next.

Counted end to end, from the agents' publish calls to the daemon's state:
- published: every job event an agent put into its outbox (agents run with
  $STRATOS_OUTBOX_AUDIT, see agents/outbox.py), against the events of STRATOS_EVENTS;
  lost = put by an agent, not in the stream and not pending in its outbox at the end;
- duplicates applied: a run stage whose completion was recorded twice, or a run that ended
  twice (its run events in the stream); copies of one event id in the stream are counted too;
- runs: completed, failed cleanly (a terminal `failed` with a code and message in KV), hung
  (not terminal --drain-minutes after the soak ends; submissions stop at the end of the soak).

    python bench/bench_chaos.py [--minutes 20] [--faults-every 60] [--seed 1] [--runs 10]
        [--agents 3] [--selector random] [--drain-minutes 15] [--json] [--keep]
        [--doc docs/reliability.md] [--from-json SAVED.json]

The doc is written (a generated block between the bench_chaos markers) by default only for a
soak of 20 minutes or more; pass --doc to write it anyway, --doc '' never.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.chaos_report import (  # noqa: E402
    FAULT_KINDS,
    TERMINAL,
    Fault,
    Soak,
    doc_block,
    summary,
    table,
    write_doc,
)
from schemas import subjects  # noqa: E402
from schemas.base import new_id  # noqa: E402
from schemas.commands import SubmitRun  # noqa: E402
from stratosd.bus import Bus, connect  # noqa: E402
from stratosd.config import StratosConfig  # noqa: E402
from stratosd.dispatch import CONSUMER  # noqa: E402
from stratosd.logging import configure_logging  # noqa: E402
from stratosd.natsd import NatsCluster  # noqa: E402
from stratosd.store import RUN_DECODER  # noqa: E402
from stratosd.validate import spec_from_data  # noqa: E402
from tests.e2e.jobs import tiny_spec  # noqa: E402

RUN_ENDS = ("run_completed", "run_failed", "run_cancelled", "run_budget_exhausted")
# daemon log lines worth counting: how the faults were absorbed
DAEMON_LINES = ("agent_down", "server_reselected", "stage_retry", "job_reconciled", "job_lost",
                "run_resumed", "run_failed", "job_queued", "run_write_conflict")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Spawned:
    """A `python -m ...` process, its output appended to a log (kept across restarts)."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.args, self.log, self.env = name, args, log, env
        self.p: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start (again)."""
        with self.log.open("ab") as fh:
            self.p = subprocess.Popen(  # noqa: S603 - fixed argv
                [sys.executable, *self.args], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                preexec_fn=_die_with_parent)  # noqa: PLW1509 - no strays if the bench dies
        self.starts += 1

    def tree(self) -> list[psutil.Process]:
        """The process and its descendants (job children run in their own sessions)."""
        if self.p is None or self.p.poll() is not None:
            return []
        try:
            top = psutil.Process(self.p.pid)
            return [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal_tree(self, sig: int) -> None:
        """Send sig to the process and every descendant."""
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL with its children (a crashed host takes its jobs with it)."""
        self.signal_tree(signal.SIGKILL)
        if self.p is not None:
            self.p.wait(10)

    def stop(self, timeout: float = 40.0) -> None:
        """SIGCONT, SIGTERM and wait; SIGKILL the tree if it does not exit."""
        if self.p is None or self.p.poll() is not None:
            return
        rest = self.tree()[1:]
        self.signal_tree(signal.SIGCONT)
        self.p.terminate()
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        for proc in rest:  # never leave a job child behind
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


class Chaos:
    """The processes, the run queue and the fault injector."""

    def __init__(self, args: argparse.Namespace, root: Path, soak: Soak) -> None:
        self.args, self.root, self.soak = args, root, soak
        self.rng = random.Random(args.seed)
        self.cluster = NatsCluster(root / "nats", 3)
        self.env = {"STRATOS_HOME": str(root / "home"), "STRATOS_LIVENESS_CHECK_S": "1",
                    "STRATOS_MISSED_HEARTBEATS": "5", "HF_HUB_OFFLINE": "1",
                    "STRATOS_MODEL_CACHE": str(ROOT / ".stratos" / "test-models")}
        self.daemon: Spawned | None = None
        self.agents: list[Spawned] = []
        self.bus: Bus | None = None
        self.t0 = time.monotonic()
        self.bag: list[str] = []

    # --- processes --------------------------------------------------------------------------

    def start_processes(self) -> None:
        """Cluster, daemon, agents."""
        (self.root / "logs").mkdir(parents=True)
        (self.root / "audit").mkdir()
        url = ",".join(self.cluster.start())
        self.daemon = Spawned("daemon", ["-m", "stratosd", "--nats", url, "--log-format",
                                         "json"], self.root / "logs" / "daemon.log", self.env)
        self.daemon.start()
        for i in range(self.args.agents):
            agent_id = f"chaos-{i + 1}"
            env = {**self.env, "STRATOS_OUTBOX_AUDIT": str(self.root / "audit" /
                                                           f"{agent_id}.jsonl")}
            agent = Spawned(agent_id, [
                "-m", "agents", "--id", agent_id, "--nats", url, "--interval", "1",
                "--price-per-hour", "1.0", "--no-calibrate", "--threads", "1",
                "--work-dir", str(self.root / "agents" / agent_id), "--log-format", "json"],
                self.root / "logs" / f"{agent_id}.log", env)
            agent.start()
            self.agents.append(agent)

    def stop_processes(self) -> None:
        """Agents first (they finish their outboxes), then the daemon; the cluster last."""
        for agent in self.agents:
            agent.stop()
        if self.daemon is not None:
            self.daemon.stop()

    async def ready(self, timeout: float = 120) -> None:
        """The daemon answers and lists every agent as up."""
        from schemas.commands import ListServers

        assert self.bus is not None
        want = {a.name for a in self.agents}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = await self.bus.request(subjects.daemon_cmd("servers"), ListServers(),
                                               timeout=2)
                if want <= {s.offer.id for s in reply.servers if s.offer.status == "up"}:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            await asyncio.sleep(1)
        raise TimeoutError("daemon and agents did not come up")

    # --- faults -----------------------------------------------------------------------------

    async def inject(self) -> None:
        """One fault, recovered before returning."""
        if not self.bag:
            self.bag = list(FAULT_KINDS)
            self.rng.shuffle(self.bag)
        kind = self.bag.pop()
        t = time.monotonic() - self.t0
        a = self.args
        if kind in ("agent_kill", "agent_stop"):
            # an agent running jobs, where there is one: an idle agent's fault tests little
            working = [x for x in self.agents if len(x.tree()) > 1]
            agent = self.rng.choice(working or self.agents)
            fault = Fault(round(t, 1), kind, agent.name)
            if kind == "agent_kill":
                agent.kill()
                await asyncio.sleep(a.agent_restart_s)
                agent.start()
            else:
                agent.signal_tree(signal.SIGSTOP)
                await asyncio.sleep(a.stop_s)
                agent.signal_tree(signal.SIGCONT)
        elif kind == "node_kill":
            index = self.rng.randrange(len(self.cluster.nodes))
            fault = Fault(round(t, 1), kind, f"n{index + 1}")
            self.cluster.kill(index)
            await asyncio.sleep(a.node_down_s)
            await asyncio.to_thread(self._restart_node, index)
        else:
            assert self.daemon is not None
            fault = Fault(round(t, 1), kind, "daemon")
            self.daemon.kill()
            await asyncio.sleep(a.daemon_restart_s)
            self.daemon.start()
        fault.recovered_s = round(time.monotonic() - self.t0 - t, 1)
        self.soak.faults.append(fault)
        print(f"  t={t:6.0f}s  {kind:12} {fault.target:8} recovered in "
              f"{fault.recovered_s:.0f}s", file=sys.stderr)

    def _restart_node(self, index: int) -> None:
        # the restart thread must not be the server's parent for PR_SET_PDEATHSIG: the pool
        # thread may exit; the bench stops the cluster itself at the end
        node = self.cluster.nodes[index]
        node.tie_to_parent = False
        self.cluster.restart(index)

    async def faults(self, until: float) -> None:
        """A fault every ~faults_every seconds (±25 %) until the soak ends."""
        every = self.args.faults_every
        while True:
            wait = every * self.rng.uniform(0.75, 1.25)
            if time.monotonic() + wait >= until:
                return
            await asyncio.sleep(wait)
            await self.inject()

    # --- runs -------------------------------------------------------------------------------

    async def run_state(self, run_id: str) -> dict[str, Any] | None:
        """The run as the daemon keeps it in KV (None: not there, or the bus is away)."""
        assert self.bus is not None
        try:
            entry = await (await self.bus.kv(subjects.RUNS_BUCKET)).get(run_id)
        except Exception:  # noqa: BLE001 - not stored yet, or a member is down
            return None
        if entry.value is None:
            return None
        run = RUN_DECODER.decode(entry.value)
        return {"state": run.state, "stage": run.stage, "error": run.error,
                "created": run.created.isoformat(), "updated": run.updated.isoformat(),
                "seconds": round((run.updated - run.created).total_seconds(), 1),
                "attempts": {k[9:]: v for k, v in run.progress.items()
                             if k.startswith("attempts_") and v > 1}}

    async def submit(self, run_id: str, n: int) -> bool:
        """Submit a tiny run with our own id (a resend after a lost reply is harmless)."""
        assert self.bus is not None
        spec = spec_from_data(tiny_spec(f"chaos-{n}", selector=self.args.selector,
                                        seed=self.args.seed * 100_000 + n))
        try:
            await self.bus.request(subjects.daemon_cmd("submit"),
                                   SubmitRun(spec=spec, run_id=run_id), timeout=10)
        except Exception:  # noqa: BLE001 - the daemon may be down: try again
            return False
        return True

    async def queue(self, until: float) -> None:
        """Keep runs_target runs unfinished (in flight or queued) until the soak ends."""
        n = 0
        unsent: list[str] = []
        while time.monotonic() < until:
            for run_id in list(self.soak.runs):
                if self.soak.runs[run_id]["state"] not in TERMINAL:
                    self.soak.runs[run_id] = await self.run_state(run_id) or \
                        self.soak.runs[run_id]
            active = sum(r["state"] not in TERMINAL for r in self.soak.runs.values())
            while active + len(unsent) < self.args.runs:
                unsent.append(new_id())
            for run_id in list(unsent):
                n += 1
                if not await self.submit(run_id, n):
                    break
                unsent.remove(run_id)
                self.soak.runs[run_id] = {"state": "queued", "stage": "", "error": None}
            self.soak.in_flight.append(
                sum(r["state"] not in TERMINAL for r in self.soak.runs.values()))
            self.soak.load_avg.append(os.getloadavg()[0])
            await asyncio.sleep(5)
        for run_id in unsent:  # a submit whose reply was lost may still have been stored
            if (state := await self.run_state(run_id)) is not None:
                self.soak.runs[run_id] = state

    async def drain(self, timeout: float) -> None:
        """Wait until every run is terminal (or timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run_id in list(self.soak.runs):
                self.soak.runs[run_id] = await self.run_state(run_id) or self.soak.runs[run_id]
            left = len(self.soak.hung)
            self.soak.load_avg.append(os.getloadavg()[0])
            if not left:
                return
            print(f"  drain: {left} runs unfinished", file=sys.stderr)
            await asyncio.sleep(10)

    async def soak_all(self) -> None:
        """Start, soak, drain, stop, count."""
        a = self.args
        self.start_processes()
        self.bus = Bus(await connect(StratosConfig(nats_url=self.cluster.url), "bench-chaos",
                                     retry_for_s=10))
        try:
            await self.ready()
            self.t0 = time.monotonic()
            until = self.t0 + a.minutes * 60
            print(f"soak: {a.minutes:g} min, a fault every ~{a.faults_every:g} s, "
                  f"{a.runs} runs kept going, {a.agents} agents", file=sys.stderr)
            await asyncio.gather(self.queue(until), self.faults(until))
            self.soak.soak_s = round(time.monotonic() - self.t0, 1)
            t_drain = time.monotonic()
            await self.drain(a.drain_minutes * 60)
            self.soak.drain_s = round(time.monotonic() - t_drain, 1)
            await asyncio.to_thread(self.stop_agents)
            await asyncio.sleep(3)  # the daemon takes the agents' last events
            await self.consumer_state()
            if self.daemon is not None:
                await asyncio.to_thread(self.daemon.stop)
            await self.count_events()
        finally:
            await self.bus.close()

    def stop_agents(self) -> None:
        """SIGTERM every agent (their outboxes drain for up to 5 s)."""
        for agent in self.agents:
            agent.stop()

    # --- counting ---------------------------------------------------------------------------

    async def consumer_state(self) -> None:
        """The daemon's durable job-event consumer: nothing left undelivered or unacked."""
        assert self.bus is not None
        try:
            ci = await self.bus.js.consumer_info(subjects.EVENTS_STREAM, CONSUMER)
            self.soak.consumer = {"pending": int(ci.num_pending or 0),
                                  "ack_pending": int(ci.num_ack_pending or 0),
                                  "redelivered": int(ci.num_redelivered or 0)}
        except Exception as exc:  # noqa: BLE001 - reported as unknown
            print(f"consumer info failed: {exc}", file=sys.stderr)

    async def stream_events(self) -> list[dict[str, Any]]:
        """Every message of STRATOS_EVENTS, replayed in order."""
        assert self.bus is not None
        seen: list[dict[str, Any]] = []
        done = asyncio.Event()

        async def cb(msg: Any) -> None:
            ev = json.loads(msg.data)
            ev["_subject"] = msg.subject
            seen.append(ev)
            if msg.metadata.num_pending == 0:
                done.set()

        sub = await self.bus.js.subscribe(subjects.EVENTS_SUBJECTS[0], cb=cb,
                                          ordered_consumer=True)
        try:
            await asyncio.wait_for(done.wait(), 120)
        finally:
            await sub.unsubscribe()
        return seen

    async def count_events(self) -> None:
        """Agents' outbox audit against the stream; run events for duplicates applied."""
        s = self.soak
        put: dict[str, str] = {}  # id → kind
        acked: set[str] = set()
        for path in sorted((self.root / "audit").glob("*.jsonl")):
            for line in path.read_bytes().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of a killed agent
                if rec["op"] == "put":
                    put[rec["id"]] = rec.get("kind", "")
                else:
                    acked.add(rec["id"])
        pending: set[str] = set()
        for journal in (self.root / "agents").glob("*/outbox/job-events.log"):
            state: dict[str, bool] = {}
            for line in journal.read_bytes().splitlines():
                with contextlib.suppress(json.JSONDecodeError, KeyError):
                    rec = json.loads(line)
                    state[rec["id"]] = rec["op"] == "add"
            pending |= {i for i, add in state.items() if add}
        events = await self.stream_events()
        copies = Counter(e["id"] for e in events)
        s.stream_copies = sum(n - 1 for n in copies.values())
        in_stream = set(copies)
        s.events_put, s.events_acked = len(put), len(acked & set(put))
        s.events_in_stream = len(set(put) & in_stream)
        s.events_pending = len((set(put) - in_stream) & pending)
        s.lost = sorted(set(put) - in_stream - pending)
        s.acked_not_in_stream = sorted((acked & set(put)) - in_stream)
        s.by_kind = dict(Counter(put.values()))
        stage_done: dict[tuple[str, str], set[str]] = {}  # distinct event ids
        ends: dict[str, set[str]] = {}
        outcomes: dict[str, set[str]] = {}
        for e in events:
            if e.get("run_id") in s.runs and e["type"] == "run_stage_completed":
                stage_done.setdefault((e["run_id"], e["stage"]), set()).add(e["id"])
            if e.get("run_id") in s.runs and e["type"] in RUN_ENDS:
                ends.setdefault(e["run_id"], set()).add(e["id"])
            if e["_subject"].startswith(f"{subjects.PREFIX}.evt.job.") and e["type"] in (
                    "job_completed", "job_failed", "job_cancelled", "job_interrupted"):
                outcomes.setdefault(e["job_id"], set()).add(e["id"])
        s.stage_completed_twice = sorted(f"{r}/{st}" for (r, st), ids in stage_done.items()
                                         if len(ids) > 1)
        s.run_ended_twice = sorted(r for r, ids in ends.items() if len(ids) > 1)
        s.jobs_with_two_outcomes = sum(len(v) > 1 for v in outcomes.values())
        lines: Counter[str] = Counter()
        daemon_log = self.root / "logs" / "daemon.log"
        for text in daemon_log.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                name = json.loads(text).get("event")
                if name in DAEMON_LINES:
                    lines[name] += 1
        s.daemon_lines = dict(lines)


def main(argv: list[str] | None = None) -> int:
    """Soak, print, write the doc."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="soak duration")
    p.add_argument("--faults-every", type=float, default=60.0, help="seconds between faults")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int, default=10, help="unfinished runs kept going")
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--selector", default="random",
                   help="the runs' server selector (default random: spreads the runs over the "
                   "agents; with pfg and equal prices a burst of runs lands on one agent)")
    p.add_argument("--drain-minutes", type=float, default=15.0,
                   help="after the soak: how long runs may take to finish before they count "
                   "as hung")
    p.add_argument("--stop-s", type=float, default=30.0, help="how long a SIGSTOP lasts")
    p.add_argument("--agent-restart-s", type=float, default=5.0)
    p.add_argument("--node-down-s", type=float, default=10.0)
    p.add_argument("--daemon-restart-s", type=float, default=3.0)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--doc", default=None, help="where to write the generated block (default: "
                   "docs/reliability.md for a soak of >= 20 min; '' for none)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) afterwards")
    p.add_argument("--from-json", metavar="PATH",
                   help="no soak: show (and with --doc write) the result a --json run saved")
    args = p.parse_args(argv)
    configure_logging("error", "console")

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # `timeout` sends SIGTERM: stop every process we started

    signal.signal(signal.SIGTERM, interrupted)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        soak = Soak.from_dict(data["detail"])
        saved = data.get("args") or {"minutes": soak.minutes, "seed": soak.seed,
                                     "faults_every": soak.faults_every_s,
                                     "agents": soak.agents, "runs": soak.runs_target}
        args = argparse.Namespace(**{**vars(args), **saved, "doc": args.doc,
                                     "json": args.json})
        return report(soak, args)
    soak = Soak(args.minutes, args.faults_every, args.seed, args.agents, args.runs,
                started=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                host=f"{platform.node()}, {psutil.cpu_count()} cores, "
                f"Python {platform.python_version()}")
    tmp = tempfile.mkdtemp(prefix="stratos-chaos-")
    root = Path(tmp)
    chaos = Chaos(args, root, soak)
    try:
        asyncio.run(chaos.soak_all())
    finally:
        chaos.stop_processes()
        chaos.cluster.stop()
        print(f"work dir {root}" + ("" if args.keep else " (removed)"), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return report(soak, args)


def report(soak: Soak, args: argparse.Namespace) -> int:
    """Print the table (or JSON), write the doc block; 0 when the targets are met: every run
    completed, none hung, no event lost, none applied twice."""
    if args.json:
        saved = {k: v for k, v in vars(args).items() if k not in ("doc", "json", "from_json")}
        print(json.dumps({**summary(soak), "args": saved, "detail": asdict(soak)}, indent=1,
                         default=str))
    else:
        print(table(soak))
    doc = args.doc if args.doc is not None else (
        str(ROOT / "docs" / "reliability.md") if args.minutes >= 20 else "")
    if doc:
        write_doc(Path(doc), doc_block(soak, args))
        print(f"wrote {doc}", file=sys.stderr)
    m = summary(soak)
    ok = (soak.runs and not soak.hung and not soak.lost and not soak.duplicates_applied
          and m["runs_completed"] == m["runs_submitted"])
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
