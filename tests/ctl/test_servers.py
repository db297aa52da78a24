"""`stratosctl servers`: measured capacity per server, unknown latency, --calibrate round trip."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stratosd.ctl.servers import render
from tests.conftest import ROOT, start_agent


def _ctl(nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stratosd.ctl", "--nats", nats_url, *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


@pytest.mark.timeout(150)
async def test_servers_calibrate_round_trip(daemon: Any, nats_url: str, tmp_path: Path) -> None:
    agent, task = await start_agent(nats_url, tmp_path, "cpu-1", calibrate=False, job_threads=1)
    try:
        await daemon.fleet.wait_up("cpu-1", timeout=10)
        before = await asyncio.to_thread(_ctl, nats_url, "servers")
        assert before.returncode == 0, before.stderr
        header, _rule, row = before.stdout.splitlines()[:3]
        for col in ("TFLOP/S", "MEM GB/S", "DISK MB/S", "UPLOAD MB/S", "CAPACITY", "LATENCY",
                    "BUSY"):
            assert col in header
        assert "unknown" in row  # no --probe-url: latency is unknown, not "0.0 ms"
        assert "measured" not in row  # not calibrated yet

        r = await asyncio.to_thread(_ctl, nats_url, "servers", "--calibrate", "--timeout", "90")
        assert r.returncode == 0, r.stderr
        assert "calibrating 1 server(s)" in r.stderr and "calibrated 1 server(s)" in r.stderr
        row = next(line for line in r.stdout.splitlines() if line.startswith("cpu-1"))
        assert " measured " in row and " fp32 " in row

        rows = json.loads((await asyncio.to_thread(_ctl, nats_url, "servers", "--json")).stdout)
        offer = rows[0]["offer"]
        assert offer["latency_known"] is False and offer["busy"] is False
        cap = offer["capacity"]
        assert cap["source"] == "measured" and cap["threads"] == 1
        assert cap["matmul_tflops"]["fp32"] > 0 and cap["upload_mbps"] > 0

        bad = await asyncio.to_thread(_ctl, nats_url, "servers", "--calibrate", "--agent", "nope")
        assert bad.returncode == 4
        assert "'nope' is unknown" in bad.stderr and "live agents: cpu-1" in bad.stderr
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)


def test_help_shows_an_example() -> None:
    r = subprocess.run([sys.executable, "-m", "stratosd.ctl", "servers", "--help"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    assert "stratosctl servers --calibrate" in r.stdout and "unknown" in r.stdout


def test_render_marks_capacity_sources() -> None:
    from schemas.commands import ServerRow
    from schemas.specs import ServerOffer
    from schemas.telemetry import Capacity

    rows = [
        ServerRow(offer=ServerOffer(id="g", gpu_count=8, gpu_model="H200", latency_ms=20.0,
                                    capacity=Capacity(device="cuda", devices=8,
                                                      matmul_tflops={"bf16": 700.0,
                                                                     "fp32": 50.0}))),
        ServerRow(offer=ServerOffer(id="c", cpu_count=2, latency_known=False, busy=True,
                                    capacity=Capacity(matmul_tflops={"fp32": 0.2},
                                                      error="upload: no store"))),
        ServerRow(offer=ServerOffer(id="x", source="catalog",
                                    capacity=Capacity(source="estimated"))),
    ]
    lines = render(rows).splitlines()
    g, c, x = (next(ln for ln in lines if ln.startswith(k + " ")) for k in "gcx")
    assert "700 bf16" in g and "20.0 ms" in g and " measured " in g
    assert "0.2 fp32" in c and "unknown" in c and "measured*" in c and " yes " in c
    assert " estimated " in x
    assert lines[-1] == "* c: upload: no store"
