"""`stratosctl demo`: daemon + embedded NATS + three local agents + a real distillation run."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from schemas import subjects
from schemas.commands import GetRun, ListServers, SubmitRun
from stratosd.bus import Bus, connect
from stratosd.config import StratosConfig
from stratosd.ctl.common import add_common
from stratosd.ctl.jobs import print_run
from stratosd.errors import StratosError
from stratosd.validate import parse_spec_toml, spec_from_data

ROOT = Path(__file__).resolve().parents[2]
# (id, $/h, region, CPU threads every job gets): really different capacity and prices, so the
# selectors disagree and the report shows why PFG picked what it did
AGENTS = (("cpu-a", 0.40, "us-east", 1), ("cpu-b", 1.00, "eu-west", 2),
          ("cpu-c", 2.50, "ap-south", 2))
FAST = {"task": {"params": {"n_train": 24, "n_test": 12}, "probe_size": 6},
        "teachers": [{"name": "tiny-general", "backend": "hf",
                      "model": "config:qwen2-tiny?vocab_size=512"}],
        "students": [{"model": "config:qwen2-tiny?vocab_size=512"}],
        "train": {"max_steps": 8, "synthesis": {"tries": 1, "max_new_tokens": 16},
                  "evaluate": {"max_new_tokens": 24, "batch_size": 12}}}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser(
        "demo", help="run the whole pipeline locally: daemon, 3 agents, a Mahjong distillation",
        description="Start an embedded NATS server, the daemon and three local agents with "
        "different prices, submit examples/mahjong-demo.toml (a weak tiny teacher, so the "
        "strategy comes out as knowledge injection), follow it to the end, query the deployed "
        "student over the OpenAI API and print the report path and the measured numbers.")
    p.add_argument("--job", default=str(ROOT / "examples" / "mahjong-demo.toml"))
    p.add_argument("--fast", action="store_true",
                   help="tiny sizes (CI smoke run, ~1-2 min); shows the plumbing, not a gain")
    p.add_argument("--keep", action="store_true", help="leave everything running at the end")
    p.add_argument("--demo-home", default=str(ROOT / ".stratos" / "demo"),
                   help="state dir for this demo (wiped at start, except the bus store that "
                        "keeps the cost model's learned efficiencies)")
    p.add_argument("--fresh", action="store_true",
                   help="wipe the learned efficiencies too (the estimate starts from priors)")
    add_common(p)
    p.set_defaults(func=main)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Stack:
    """The demo's processes."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = home / "logs"

    def spawn(self, name: str, *args: str) -> None:
        """Start python -m ... with its log in home/logs/NAME.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        fh = (self.logs / f"{name}.log").open("wb")
        env = {**os.environ, "STRATOS_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        self.procs.append(subprocess.Popen([sys.executable, "-m", *args], stdout=fh,  # noqa: S603
                                           stderr=subprocess.STDOUT, env=env, cwd=ROOT))

    def stop(self) -> None:
        """SIGTERM everything (agents first, daemon last), then wait."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()


async def _wait_daemon(home: Path, timeout: float = 30) -> Bus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (home / "nats.url").exists():
            try:
                cfg = StratosConfig(home=str(home))
                bus = Bus(await connect(cfg, "stratosctl-demo"))
                await bus.request(subjects.daemon_cmd("servers"), ListServers(), timeout=2)
                return bus
            except StratosError:
                pass
        await asyncio.sleep(0.3)
    raise StratosError("the daemon did not start", hint=f"see {home}/logs/daemon.log")


async def _run(args: argparse.Namespace) -> int:
    home = Path(args.demo_home).resolve()
    if args.fresh:
        shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    for child in home.iterdir():  # keep nats/: the learned efficiencies live in its KV
        if child.name not in ("nats", "nats.port"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    os.environ["STRATOS_HOME"] = str(home)  # watch and the agents find the embedded server here
    args.home = str(home)
    spec = parse_spec_toml(args.job)
    if args.fast:
        import msgspec

        spec = spec_from_data(_merge(msgspec.to_builtins(spec), FAST), origin="demo --fast")
    stack = Stack(home)
    t0 = time.monotonic()
    print(f"demo home: {home}")
    stack.spawn("daemon", "stratosd", "--log-format", "json")
    users = UsersEndpoint()
    try:
        bus = await _wait_daemon(home)
        print("starting the agents one by one: each measures its capacity (matmul, memory, "
              "disk, upload) alone, so the measurements do not disturb each other ...")
        for agent_id, price, region, threads in AGENTS:
            stack.spawn(agent_id, "agents", "--id", agent_id, "--price-per-hour", str(price),
                        "--region", region, "--threads", str(threads), "--probe-url",
                        f"users={users.url}", "--interval", "1", "--log-format", "json")
            while True:
                servers = (await bus.request(subjects.daemon_cmd("servers"),
                                             ListServers())).servers
                mine = [s for s in servers if s.offer.id == agent_id]
                if mine and mine[0].offer.status == "up" and mine[0].offer.capacity \
                        is not None and mine[0].offer.latency_known:
                    break
                await asyncio.sleep(0.5)
        print(f"daemon + {len(AGENTS)} agents up in {time.monotonic() - t0:.1f}s:")
        for s in servers:
            cap = s.offer.capacity
            speed = f"{cap.matmul_tflops.get('fp32', 0) * 1000:.0f} GFLOP/s fp32 on " \
                    f"{cap.threads} thread(s)" if cap else "not calibrated"
            print(f"  {s.offer.id}  ${s.offer.price_usd_per_hour:.2f}/h  {s.offer.region}  "
                  f"{speed} (measured)  user latency {s.offer.latency_ms:.2f} ms (measured, "
                  "loopback)")
        accepted = await bus.request(subjects.daemon_cmd("submit"), SubmitRun(spec=spec))
        run_id = accepted.ref
        print(f"submitted run {run_id}; following it (stratosctl watch {run_id})")
        await bus.close()
        from stratosd.ctl import watch

        rc = await asyncio.to_thread(watch.follow, args, run_id)
        bus = await _wait_daemon(home)
        run = (await bus.request(subjects.daemon_cmd("run"), GetRun(run_id=run_id))).run
        print()
        print_run(run)
        summary = await _summary(run)
        summary["wall_s"] = round(time.monotonic() - t0, 1)
        print("\nmeasured:")
        for k, v in summary.items():
            print(f"  {k:<26} {v}")
        (home / "demo-summary.json").write_text(json.dumps(summary, indent=2))
        await bus.close()
        return rc
    finally:
        if not args.keep:
            stack.stop()
            users.close()


class UsersEndpoint:
    """A loopback HTTP server standing in for the users' region: agents time GETs to it
    (`--probe-url`). The demo, the mini-study bench and the tests use it."""

    def __init__(self) -> None:
        import http.server
        import threading

        class Quiet(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()



def _estimates(r: dict[str, Any]) -> dict[str, Any]:
    """Training time and job $: the estimate made before training vs the measurement."""
    out: dict[str, Any] = {}
    tr = r.get("train", {})
    est = tr.get("train_time_estimate") or {}
    meas = tr.get("train_time_s")
    if est and meas:
        src = est.get("source")
        hist = f" from {est.get('n')} earlier runs" if src == "calibrated" else ""
        out["train_time_estimated_s"] = (f"{est['value']:.1f} (90%: {est['low']:.1f}-"
                                         f"{est['high']:.1f}, {src}{hist})")
        out["train_time_measured_s"] = f"{meas:.1f} (measured/estimated = "\
                                       f"{meas / est['value']:.2f})"
    spent = sum(float((r.get(s, {}).get("cost") or {}).get("measured_usd") or 0)
                for s in ("probe_teachers", "select_student", "synthesize", "train", "evaluate",
                          "deploy"))
    job = ((r.get("select_server", {}).get("estimate") or {}).get("usd") or {})
    if job:
        out["job_usd_estimated"] = f"{job['value']:.4f} ({job['low']:.4f}-{job['high']:.4f})"
        out["job_usd_measured"] = f"{spent:.4f}"
    return out


async def _summary(run: Any) -> dict[str, Any]:
    r = run.results
    ev = r.get("evaluate", {})
    out: dict[str, Any] = {
        "run_id": run.run_id, "state": run.state,
        "server": r.get("select_server", {}).get("agent_id"),
        "strategy": r.get("choose_strategy", {}).get("mode"),
        "teacher_probe_accuracy": r.get("choose_strategy", {}).get("teacher_accuracy"),
        "student_accuracy_before": ev.get("before", {}).get("accuracy"),
        "student_accuracy_after": ev.get("after", {}).get("accuracy"),
        "student_partial_after": ev.get("after", {}).get("partial"),
        "rows_synthesised": r.get("synthesize", {}).get("kept"),
        "train_loss": f"{r.get('train', {}).get('first_loss')} -> "
                      f"{r.get('train', {}).get('final_loss')}",
        "report": r.get("report", {}).get("paths", {}).get("markdown"),
        **_estimates(r),
    }
    dep = r.get("deploy", {})
    if dep.get("url"):
        out["endpoint"] = dep["url"]
        out["endpoint_answer"] = await _ask(dep["url"], dep.get("model", ""), run)
    return out


async def _ask(url: str, model: str, run: Any) -> str:
    import httpx

    from stratosd.plugins import get_plugins

    task = get_plugins().task(run.spec.task.name, run.spec.task.params)
    ex = task.examples("test")[0]
    body = {"model": model, "messages": [{"role": "user", "content": task.prompt(ex.question)}],
            "max_tokens": 96, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as client:
        resp = await client.post(f"{url.rstrip('/')}/chat/completions", json=body)
    text = resp.json()["choices"][0]["message"]["content"]
    return f"Q: {ex.question!r} gold {ex.answer!r} → {text.strip()[-80:]!r}"


def main(args: argparse.Namespace) -> int:
    """Run the demo."""
    return asyncio.run(_run(args))
