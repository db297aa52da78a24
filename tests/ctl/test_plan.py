"""`stratosctl plan`: a dry run on the shipped catalog, offline and through the daemon."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ROOT

JOB = str(ROOT / "examples" / "mahjong-demo.toml")


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stratosd.ctl", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)


def test_plan_offline_prints_pareto_table_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "plan.png"
    r = _ctl("plan", JOB, "--offline", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("selector pfg:")
    assert "Pareto-optimal" in r.stdout and "* " in r.stdout  # the pick is starred
    assert "Job cost = $/h x the time of phases" in r.stdout
    assert "work (from the job):" in r.stdout and "training tokens" in r.stdout
    assert "estimate on " in r.stdout and "prior, no history" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_with_another_selector_as_json() -> None:
    r = _ctl("plan", JOB, "--offline", "--selector", "cost-first", "--json")
    data = json.loads(r.stdout)
    assert data["selection"]["selector"] == "cost-first"
    chosen = data["selection"]["chosen"]["id"]
    assert any(row["chosen"] and row["id"] == chosen for row in data["rows"])


def test_plan_infeasible_names_the_constraint(tmp_path: Path) -> None:
    job = tmp_path / "poor.toml"
    job.write_text(Path(JOB).read_text().replace("budget_usd = 5.0", "budget_usd = 0.01"))
    r = _ctl("plan", str(job), "--offline")
    assert r.returncode == 4
    assert r.stderr.startswith("error: budget $0.01 too low") and "hint:" in r.stderr


async def test_plan_uses_what_submit_would_and_catalog_on_request(
        daemon: Any, nats_url: str, tmp_path: Path, users_url: str) -> None:
    from tests.conftest import start_agent, wait_latency_known

    a, task = await start_agent(nats_url, tmp_path, "gpu-1", price=2.0, calibrate=False,
                                probe_url=[f"users={users_url}"])
    try:
        await wait_latency_known(daemon, "gpu-1")
        r = await asyncio.to_thread(_ctl, "--nats", nats_url, "plan", JOB, "--json")
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["selection"]["candidates"] == 1  # the live agent only: what submit uses
        assert data["selection"]["chosen"]["id"] == "gpu-1"
        assert data["work"]["train_tokens"] > 0 and data["estimate"]["server"] == "gpu-1"
        assert any("live agent" in n for n in data["notes"])
        r = await asyncio.to_thread(_ctl, "--nats", nats_url, "plan", JOB, "--catalog",
                                    "--json")
        data = json.loads(r.stdout)
        assert data["selection"]["candidates"] == 35  # 34 catalog offers + the live agent
        kinds = {row["id"]: row["kind"] for row in data["rows"]}
        assert all(k == "catalog (no agent)" for i, k in kinds.items() if i != "gpu-1")
    finally:
        a.stop()
        await asyncio.wait_for(task, 30)


async def test_unmeasured_latency_is_unknown_not_zero(daemon: Any, agent: Any,
                                                      nats_url: str) -> None:
    await daemon.fleet.wait_up("gpu-1", timeout=10)
    assert not daemon.fleet.offer("gpu-1").latency_known  # no --probe-url: nothing measured
    r = await asyncio.to_thread(_ctl, "--nats", nats_url, "plan", JOB)
    assert r.returncode == 4
    assert "has a measured latency" in r.stderr and "--probe-url" in r.stderr
