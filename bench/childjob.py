"""One step job through the agent's child entry point (`python -m agents.worker job.json`, what
an agent spawns), for benchmarks that time the real step path without a daemon or bus."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_child_job(work: Path, step: str, args: dict[str, Any], *,
                  inputs: dict[str, str] | None = None,
                  what: str = "") -> tuple[dict[str, Any], float]:
    """Run `step` with `args` in a fresh child under `work` (created); return its result and
    the wall seconds from spawn to exit. Exits the benchmark, naming the child's log, when the
    child ends without a result."""
    from agents.runner import worker_argv, worker_env

    work.mkdir(parents=True)
    job = {"job_id": work.name, "run_id": "bench", "step": step, "workdir": str(work),
           "state_dir": str(work / "state"), "inputs": inputs or {}, "args": args}
    (work / "job.json").write_text(json.dumps(job))
    t0 = time.perf_counter()
    with (work / "stderr.log").open("w") as err:
        proc = subprocess.run(worker_argv(work / "job.json"), cwd=ROOT, env=worker_env(),
                              stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
    final = lines[-1] if lines else {}
    if final.get("kind") != "result":
        sys.exit(f"{what or step} failed ({final}); see {work / 'stderr.log'}")
    return dict(final["result"]), wall
