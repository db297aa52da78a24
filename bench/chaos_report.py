"""What bench/bench_chaos.py measured (`Soak`) and how it is shown: the table, the JSON summary
and the generated block of docs/reliability.md (between BEGIN and END; the rest of the doc is
left as it is)."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

FAULT_KINDS = ("agent_kill", "agent_stop", "node_kill", "daemon_kill")
TERMINAL = ("completed", "failed", "cancelled", "stopped")
BEGIN, END = "<!-- bench_chaos:begin -->", "<!-- bench_chaos:end -->"


@dataclass
class Fault:
    """One injected fault."""

    t_s: float
    kind: str
    target: str
    recovered_s: float = 0.0


@dataclass
class Soak:
    """Everything measured."""

    minutes: float
    faults_every_s: float
    seed: int
    agents: int
    runs_target: int
    started: str = ""
    host: str = ""
    load_avg: list[float] = field(default_factory=list)  # 1-min load average, sampled
    in_flight: list[int] = field(default_factory=list)  # unfinished runs, sampled
    faults: list[Fault] = field(default_factory=list)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    soak_s: float = 0.0
    drain_s: float = 0.0
    events_put: int = 0
    events_acked: int = 0
    events_in_stream: int = 0
    events_pending: int = 0
    lost: list[str] = field(default_factory=list)
    acked_not_in_stream: list[str] = field(default_factory=list)
    stream_copies: int = 0  # extra copies of an event id in the stream
    stage_completed_twice: list[str] = field(default_factory=list)
    run_ended_twice: list[str] = field(default_factory=list)
    jobs_with_two_outcomes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    consumer: dict[str, int] = field(default_factory=dict)
    daemon_lines: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Soak:
        """A soak from its `--json` detail (to show or write it again)."""
        faults = [Fault(**f) for f in data.get("faults", [])]
        return cls(**{**data, "faults": faults})

    def count(self, state: str) -> int:
        """Runs that ended in state."""
        return sum(r["state"] == state for r in self.runs.values())

    @property
    def hung(self) -> list[str]:
        """Runs not terminal after the drain."""
        return [i for i, r in self.runs.items() if r["state"] not in TERMINAL]

    @property
    def duplicates_applied(self) -> int:
        """Stage completions or run ends recorded twice."""
        return len(self.stage_completed_twice) + len(self.run_ended_twice)


def summary(s: Soak) -> dict[str, Any]:
    """The headline figures (what --json prints first, and the table shows)."""
    kinds = Counter(f.kind for f in s.faults)
    failed = {i: r["error"] for i, r in s.runs.items() if r["state"] == "failed"}
    return {
        "soak_s": s.soak_s, "drain_s": s.drain_s, "runs_submitted": len(s.runs),
        "runs_completed": s.count("completed"), "runs_failed_cleanly": sum(
            bool(e and e.get("code") and e.get("message")) for e in failed.values()),
        "runs_failed_without_reason": sum(
            not (e and e.get("code") and e.get("message")) for e in failed.values()),
        "runs_stopped_or_cancelled": s.count("stopped") + s.count("cancelled"),
        "runs_hung": len(s.hung), "events_put": s.events_put, "events_acked": s.events_acked,
        "events_in_stream": s.events_in_stream, "events_pending_in_outbox": s.events_pending,
        "events_lost": len(s.lost), "acked_not_in_stream": len(s.acked_not_in_stream),
        "duplicates_applied": s.duplicates_applied, "stream_duplicate_copies": s.stream_copies,
        "faults": {k: kinds.get(k, 0) for k in FAULT_KINDS},
        "in_flight_min": min(s.in_flight, default=0),
        "in_flight_mean": round(sum(s.in_flight) / max(1, len(s.in_flight)), 1),
        "load_avg_mean": round(sum(s.load_avg) / max(1, len(s.load_avg)), 2),
        "load_avg_max": round(max(s.load_avg, default=0.0), 2),
    }


def table(s: Soak) -> str:
    """The result as a plain-text table."""
    m = summary(s)
    failed = [f"{i}: [{r['error'].get('code')}] {r['error'].get('message', '')[:120]}"
              for i, r in s.runs.items() if r["state"] == "failed" and r.get("error")]
    rows = [
        ("soak", f"{m['soak_s']:.0f} s, drain {m['drain_s']:.0f} s"),
        ("faults", ", ".join(f"{k} {n}" for k, n in m["faults"].items())),
        ("runs unfinished (sampled)", f"min {m['in_flight_min']}, mean {m['in_flight_mean']}"),
        ("runs submitted", m["runs_submitted"]),
        ("runs completed", m["runs_completed"]),
        ("runs failed cleanly", m["runs_failed_cleanly"]),
        ("runs failed without reason", m["runs_failed_without_reason"]),
        ("runs stopped/cancelled", m["runs_stopped_or_cancelled"]),
        ("runs hung", m["runs_hung"]),
        ("job events put by agents", f"{m['events_put']} ({m['events_acked']} acked)"),
        ("... in the stream", m["events_in_stream"]),
        ("... pending in an outbox", m["events_pending_in_outbox"]),
        ("events lost", m["events_lost"]),
        ("duplicates applied", m["duplicates_applied"]),
        ("duplicate copies in stream", m["stream_duplicate_copies"]),
        ("daemon consumer", ", ".join(f"{k} {v}" for k, v in s.consumer.items()) or "?"),
        ("daemon log", ", ".join(f"{k} {v}" for k, v in sorted(s.daemon_lines.items()))),
        ("load average (1 min)", f"mean {m['load_avg_mean']}, max {m['load_avg_max']}"),
    ]
    width = max(len(r[0]) for r in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]
    out += [f"  failed  {f}" for f in failed]
    out += [f"  hung    {i}: {s.runs[i].get('state')} at {s.runs[i].get('stage')}"
            for i in s.hung]
    out += [f"  lost    {i}" for i in s.lost[:20]]
    return "\n".join(out)


def doc_block(s: Soak, args: argparse.Namespace) -> str:
    """The generated section of docs/reliability.md."""
    m = summary(s)
    kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in m["faults"].items())
    reasons = Counter(str((r.get("error") or {}).get("code")) for r in s.runs.values()
                      if r["state"] == "failed")
    failed = "; ".join(f"{n} × `{c}`" for c, n in reasons.items()) or "none"
    why = sorted({f"\"{(r.get('error') or {}).get('message', '')}\"" for r in s.runs.values()
                  if r["state"] == "failed"})
    failed += f": {'; '.join(why)}" if why else ""
    retried = sum(bool(r.get("attempts")) for r in s.runs.values())
    done = [r["seconds"] for r in s.runs.values() if r["state"] == "completed" and "seconds" in r]
    lines = [
        BEGIN,
        "<!-- generated by bench/bench_chaos.py: edits between these markers are overwritten -->",
        "",
        "## Chaos soak",
        "",
        f"Measured by `bench/bench_chaos.py --minutes {args.minutes:g} --faults-every "
        f"{args.faults_every:g} --seed {args.seed}` on {s.started} ({s.host}). Real processes "
        f"on loopback: a 3-node nats-server cluster (`NatsCluster`), the daemon and "
        f"{args.agents} agents (`--threads 1`), with {args.runs} tiny runs "
        f"(`tests/e2e/jobs.py` `tiny_spec` with selector `{args.selector}`, every stage "
        "real) kept unfinished (running or "
        f"queued) for {m['soak_s'] / 60:.0f} min; submissions then stopped and the runs had up "
        f"to {args.drain_minutes:g} min to finish (they took {m['drain_s']:.0f} s). A fault "
        f"every {args.faults_every * 0.75:.0f} to {args.faults_every * 1.25:.0f} s, one at a "
        f"time, each kind equally often: {kinds}. An agent is SIGKILLed with its job children "
        f"and restarted after {args.agent_restart_s:g} s, or SIGSTOPped with them for "
        f"{args.stop_s:g} s; a cluster member is SIGKILLed and restarted after "
        f"{args.node_down_s:g} s; the daemon is SIGKILLed and restarted after "
        f"{args.daemon_restart_s:g} s. A fault meant for an agent picks one that is running "
        "jobs, if any is. Liveness: agents heartbeat every 1 s, the daemon "
        "declares one down after 5 missed. The machine was shared: the 1-minute load "
        f"average was {m['load_avg_mean']} on average (max {m['load_avg_max']}) on "
        f"{psutil.cpu_count()} cores.",
        "",
        "| what | measured |",
        "|---|---|",
        f"| runs | {m['runs_submitted']} submitted: **{m['runs_completed']} completed**, "
        f"{m['runs_failed_cleanly']} failed cleanly ({failed}), "
        f"{m['runs_failed_without_reason']} failed without a reason, "
        f"**{m['runs_hung']} hung** (not finished when the drain ended); {retried} needed "
        "a stage retry |",
        f"| unfinished runs during the soak | at least {m['in_flight_min']}, "
        f"{m['in_flight_mean']} on average (sampled every 5 s) |",
        "| completed run duration | "
        + (f"median {sorted(done)[len(done) // 2]:.0f} s, max {max(done):.0f} s "
           "(submit to end, queueing included) |" if done else "none |"),
        f"| job events | {m['events_put']:,} put into agents' outboxes "
        f"({', '.join(f'{n} {k}' for k, n in sorted(s.by_kind.items()))}); "
        f"{m['events_acked']:,} acknowledged by JetStream; {m['events_in_stream']:,} in "
        f"`STRATOS_EVENTS`, {m['events_pending_in_outbox']} still pending in an outbox, "
        f"**{m['events_lost']} lost** |",
        f"| duplicates applied | **{m['duplicates_applied']}** (a run stage completed twice "
        f"or a run ended twice); {m['stream_duplicate_copies']} extra copies of an event id "
        f"in the stream; {s.jobs_with_two_outcomes} jobs with two outcome events |",
        "| daemon job consumer after the agents stopped | "
        + (", ".join(f"{v} {k.replace('_', ' ')}" for k, v in s.consumer.items()) or "unknown")
        + " |",
        "| how the faults were absorbed (daemon log) | "
        + (", ".join(f"`{k}` {v}" for k, v in sorted(s.daemon_lines.items())) or "none")
        + " |",
        "",
        "\"Put\" is every `job_started`/outcome event an agent handed to its outbox "
        "(`agents/outbox.py`, counted through `STRATOS_OUTBOX_AUDIT`); lost means put but "
        "neither in the stream nor still on an agent's disk. Progress and log events are "
        "best effort and not counted. \"Duplicates applied\" counts, from the run events in "
        "the stream, a stage of a run completed by two distinct events, or a run ended by "
        "two. The faults, in order (t from the start of the soak):",
        "",
        "| t (s) | fault | target | restarted or resumed after (s) |",
        "|---|---|---|---|",
        *(f"| {f.t_s:.0f} | {f.kind} | {f.target} | {f.recovered_s:.0f} |" for f in s.faults),
        "",
        "Found by earlier soaks and fixed in `stratosd/pipeline.py` (tests in "
        "`tests/daemon/test_agent_lost_retry.py`): a stage whose agent was lost retried at "
        "once, three times within seconds, against the same agent (not yet declared down, or "
        "still restarting), and the run failed `agent_unavailable`; when it looked for "
        "another server and all were busy training, it failed `infeasible`. Both now wait and "
        "retry, up to 8 times with a backoff up to 30 s, apart from the stage's own retries "
        "(`AGENT_RETRIES`). And a run resumed in the second after a daemon restart, before "
        "the agents had reported to the new daemon, failed `infeasible` (\"no live agent to "
        "run on\"); resumed runs now first wait until the agents known before the restart "
        "have reported, each at most its heartbeat window.",
        "",
        "```",
        "python bench/bench_chaos.py                 # 20 min soak, writes this section",
        "python bench/bench_chaos.py --minutes 3     # a quick check (no doc unless --doc)",
        "```",
        END,
    ]
    return "\n".join(lines)


def write_doc(path: Path, block: str) -> None:
    """Replace the generated block (or insert it before "## Re-run", or append)."""
    text = path.read_text() if path.exists() else "# Reliability\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    elif "\n## Re-run" in text:
        head, tail = text.split("\n## Re-run", 1)
        text = head + "\n" + block + "\n\n## Re-run" + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
