"""Measured mini-study: the same small job on local agents of really different capacity.

Starts an embedded NATS server, the daemon and two local agents whose jobs get 1 and 2 torch
threads and that charge different prices; each agent calibrates itself at start (matmul,
memory, disk, upload). Then, for each round and each agent, submits the same small job (the
demo job at --fast sizes) pinned to that agent by region, waits for it to finish, and prints
the cost model's estimate (made before each phase ran, with its 90% interval and source)
against the measurement: per phase and for the whole job, time and $. Runs go one at a time
so they do not slow each other down. Round 1 starts from priors (fresh bus store); later
rounds use what the earlier rounds taught the model. `--trainer grpo` runs the same job with
GRPO (its SFT warm start, then rollouts and updates), the demo's full SFT otherwise.

    .venv/bin/python bench/bench_ministudy.py [--rounds 2] [--trainer grpo] [--max-steps N]
                                              [--home DIR] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec  # noqa: E402

from schemas import subjects  # noqa: E402
from schemas.commands import GetRun, ListServers, SubmitRun  # noqa: E402
from schemas.costs import Estimate  # noqa: E402
from schemas.stages import STAGE_RESULTS, SelectServerResult, TrainResult  # noqa: E402
from stratosd.costmodel.costs import STAGE_PHASE  # noqa: E402
from stratosd.ctl.demo import (  # noqa: E402
    FAST,
    ROOT,
    Stack,
    UsersEndpoint,
    _merge,
    _wait_daemon,
)
from stratosd.results import stage_result  # noqa: E402
from stratosd.validate import parse_spec_toml, spec_from_data  # noqa: E402

# (id, $/h, region, torch threads per job): twice the threads at 2.5x the price
AGENTS = (("cpu-1t", 0.40, "study-1t", 1), ("cpu-2t", 1.00, "study-2t", 2))


def job_for(region: str, round_no: int, trainer: str | None = None,
            max_steps: int | None = None) -> Any:
    """The demo job at --fast sizes, pinned to one agent by region, nothing deployed."""
    spec = parse_spec_toml(ROOT / "examples" / "mahjong-demo.toml")
    data = _merge(msgspec.to_builtins(spec), FAST)
    data = _merge(data, {"name": f"ministudy-{region}-r{round_no}", "deploy": False,
                         "constraints": {"region": region, "budget_usd": 5.0,
                                         "max_latency_ms": None, "target_accuracy": 0.0}})
    if trainer:
        data["trainer"] = trainer
    if max_steps:
        data["train"]["max_steps"] = max_steps
    return spec_from_data(data, origin="bench_ministudy")


def _iv(e: Estimate | None, fmt: str) -> str:
    if e is None:
        return "n/a"
    hist = f" from {e.n} runs" if e.n else ""
    return f"{fmt.format(e.value)} [{fmt.format(e.low)}-{fmt.format(e.high)}] {e.source}{hist}"


def _ratio(measured: float | None, est: Estimate | None) -> float | None:
    if measured is None or est is None or est.value <= 0:
        return None
    return measured / est.value


def rows_of(run: Any) -> dict[str, Any]:
    """Per phase and whole job: estimate vs measurement, from the run's typed results."""
    phases = []
    spent_s = spent_usd = 0.0
    for stage, phase in STAGE_PHASE.items():
        got = stage_result(run, STAGE_RESULTS[stage])
        if got is None or got.cost is None:
            continue
        c = got.cost
        spent_s += c.measured_s or 0.0
        spent_usd += c.measured_usd or 0.0
        phases.append({"phase": phase, "est_s": _iv(c.estimated_s, "{:.1f}"),
                       "measured_s": c.measured_s,
                       "ratio_s": _ratio(c.measured_s, c.estimated_s),
                       "est_usd": _iv(c.estimated_usd, "{:.5f}"),
                       "measured_usd": c.measured_usd})
    sel = stage_result(run, SelectServerResult)
    tr = stage_result(run, TrainResult)
    job = None if sel is None or sel.estimate is None else sel.estimate
    loop = None if tr is None else tr.train_time_estimate
    return {
        "run_id": run.run_id, "state": run.state,
        "agent": None if sel is None else sel.agent_id,
        "phases": phases,
        "train_loop": {"est": _iv(loop, "{:.1f}"),
                       "measured_s": None if tr is None else tr.train_time_s,
                       "ratio": _ratio(None if tr is None else tr.train_time_s, loop)},
        "job": {"est_s": _iv(None if job is None else job.seconds, "{:.1f}"),
                "measured_s": round(spent_s, 2),
                "ratio_s": _ratio(spent_s, None if job is None else job.seconds),
                "est_usd": _iv(None if job is None else job.usd, "{:.5f}"),
                "measured_usd": round(spent_usd, 6),
                "ratio_usd": _ratio(spent_usd, None if job is None else job.usd)},
    }


async def study(home: Path, rounds: int, trainer: str | None = None,
                max_steps: int | None = None) -> dict[str, Any]:
    """Start everything, run the job rounds x agents times, return the rows."""
    import os

    os.environ["STRATOS_HOME"] = str(home)
    stack = Stack(home)
    users = UsersEndpoint()
    out: dict[str, Any] = {"agents": {}, "runs": [], "trainer": trainer or "full-sft (the demo's)",
                           "max_steps": max_steps or FAST["train"]["max_steps"]}
    try:
        stack.spawn("daemon", "stratosd", "--log-format", "json")
        bus = await _wait_daemon(home)
        for agent_id, price, region, threads in AGENTS:  # one at a time: calibration alone
            stack.spawn(agent_id, "agents", "--id", agent_id, "--price-per-hour", str(price),
                        "--region", region, "--threads", str(threads), "--probe-url",
                        f"users={users.url}", "--interval", "1", "--log-format", "json")
            while True:
                servers = (await bus.request(subjects.daemon_cmd("servers"),
                                             ListServers())).servers
                mine = [s.offer for s in servers if s.offer.id == agent_id]
                if mine and mine[0].status == "up" and mine[0].capacity is not None:
                    cap = mine[0].capacity
                    out["agents"][agent_id] = {
                        "price_usd_per_hour": price, "threads": threads,
                        "gflops_fp32": round(cap.matmul_tflops.get("fp32", 0.0) * 1e3, 1)}
                    break
                await asyncio.sleep(0.5)
        for r in range(1, rounds + 1):
            for agent_id, _price, region, _threads in AGENTS:
                t0 = time.monotonic()
                acc = await bus.request(subjects.daemon_cmd("submit"),
                                        SubmitRun(spec=job_for(region, r, trainer, max_steps)))
                while True:
                    run = (await bus.request(subjects.daemon_cmd("run"),
                                             GetRun(run_id=acc.ref))).run
                    if run.state in ("completed", "failed", "cancelled", "stopped"):
                        break
                    await asyncio.sleep(1.0)
                row = rows_of(run)
                row.update(round=r, wall_s=round(time.monotonic() - t0, 1), pinned=agent_id,
                           error=run.error)
                out["runs"].append(row)
                print(f"  round {r} on {agent_id}: {run.state} in {row['wall_s']} s",
                      file=sys.stderr, flush=True)
        await bus.close()
    finally:
        stack.stop()
        users.close()
    return out


def _f(v: float | None, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def print_table(res: dict[str, Any]) -> None:
    """The study as text."""
    print(f"Measured mini-study: the demo job at --fast sizes on two local agents, trainer "
          f"{res['trainer']}, {res['max_steps']} steps (estimates made before each phase ran; "
          "90% interval; measured = wall time)")
    for a, info in res["agents"].items():
        print(f"  {a}: {info['threads']} torch thread(s), {info['gflops_fp32']} GFLOP/s fp32 "
              f"(calibrated at start), ${info['price_usd_per_hour']:.2f}/h")
    for row in res["runs"]:
        print(f"\nround {row['round']}, {row['pinned']} ({row['state']}, run {row['run_id']})")
        if row.get("error"):
            print(f"  error: {row['error']}")
        print(f"  {'phase':<10} {'estimated s':<34} {'measured s':>10} {'meas/est':>8}  "
              f"{'measured $':>10}")
        for p in row["phases"]:
            print(f"  {p['phase']:<10} {p['est_s']:<34} {_f(p['measured_s'], '{:.1f}'):>10} "
                  f"{_f(p['ratio_s'], '{:.2f}'):>8}  {_f(p['measured_usd'], '{:.5f}'):>10}")
        t = row["train_loop"]
        print(f"  {'loop':<10} {t['est']:<34} {_f(t['measured_s'], '{:.1f}'):>10} "
              f"{_f(t['ratio'], '{:.2f}'):>8}")
        j = row["job"]
        print(f"  job time: estimated {j['est_s']}, measured {j['measured_s']:.1f} s "
              f"(x{_f(j['ratio_s'], '{:.2f}')})")
        print(f"  job $:    estimated {j['est_usd']}, measured {j['measured_usd']:.5f} "
              f"(x{_f(j['ratio_usd'], '{:.2f}')})")


def main() -> None:
    """Run the study and print it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs per agent (round 1 from priors, later ones learned)")
    ap.add_argument("--home", default=None,
                    help="state dir (default: a fresh temporary one, so round 1 is priors)")
    ap.add_argument("--trainer", choices=("full-sft", "lora-sft", "grpo"), default=None,
                    help="the job's trainer (default: the demo's full-sft)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="training steps (default: the demo's --fast 8)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stratos-ministudy-") as tmp:
        home = Path(args.home or tmp).resolve()
        home.mkdir(parents=True, exist_ok=True)
        res = asyncio.run(study(home, args.rounds, args.trainer, args.max_steps))
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print_table(res)


if __name__ == "__main__":
    main()
