"""Capacity calibration: the benchmark child, the agent's telemetry, the daemon's offer."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agents.calibrate import CAPACITY_DECODER, calibrate
from schemas import subjects
from schemas.commands import Accepted, Calibrate, CalibrateServers
from stratosd.bus import Bus, connect
from stratosd.config import StratosConfig
from stratosd.errors import RemoteError
from tests.conftest import ROOT, start_agent


async def _until(pred: Any, timeout: float = 60.0) -> None:
    async def loop() -> None:
        while not pred():
            await asyncio.sleep(0.1)

    await asyncio.wait_for(loop(), timeout)


def test_child_prints_a_positive_capacity(tmp_path: Path) -> None:
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, "-m", "agents.calibrate", "--threads", "1",
                        "--work-dir", str(work), "--budget-s", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=50, check=False)
    assert r.returncode == 0, r.stderr
    cap = CAPACITY_DECODER.decode(r.stdout.strip().splitlines()[-1])
    assert cap.source == "measured" and cap.error is None, cap.error
    assert cap.device == "cpu" and cap.devices == 1
    assert cap.threads == 1 and cap.job_threads == 1
    assert cap.matmul_tflops["fp32"] > 0
    assert all(v > 0 for v in cap.matmul_tflops.values())
    assert cap.mem_bw_gbps is not None and cap.mem_bw_gbps > 0
    assert cap.disk_write_mbps is not None and cap.disk_write_mbps > 0
    assert cap.upload_mbps is None  # measured by the agent, which holds the bus
    assert cap.measured_at is not None
    assert list(work.iterdir()) == []  # the disk test cleans up after itself


@pytest.mark.timeout(120)
async def test_agent_reports_capacity_and_the_offer_carries_it(
    daemon: Any, nats_url: str, tmp_path: Path
) -> None:
    agent, task = await start_agent(nats_url, tmp_path, "cpu-1", calibrate=True, job_threads=1)
    try:
        # ready before the benchmarks finish: registered with capacity unknown first
        await _until(lambda: daemon.fleet.is_up("cpu-1"), 10)
        await _until(lambda: daemon.fleet.offer("cpu-1").capacity is not None, 90)
        offer = daemon.fleet.offer("cpu-1")
        cap = offer.capacity
        assert cap is not None and cap.error is None, cap
        assert cap.source == "measured" and cap.threads == 1 and cap.job_threads == 1
        assert cap.matmul_tflops["fp32"] > 0
        assert cap.upload_mbps is not None and cap.upload_mbps > 0
        assert cap.duration_s > 0
        assert agent.capacity == cap
        assert not await daemon.bus.has_artifact("_calibration/cpu-1")  # blob deleted

        # the daemon's calibrate command reaches the agent, which measures again
        reply = await daemon.bus.request(subjects.daemon_cmd("calibrate"), CalibrateServers())
        assert isinstance(reply, Accepted) and reply.detail["agents"] == ["cpu-1"]
        first = cap.measured_at
        await _until(lambda: (c := daemon.fleet.offer("cpu-1").capacity) is not None
                     and c.measured_at != first, 90)

        with pytest.raises(RemoteError) as info:
            await daemon.bus.request(subjects.daemon_cmd("calibrate"),
                                     CalibrateServers(agent_ids=["nope"]))
        assert info.value.remote_code == "not_found"
        assert "cpu-1" in info.value.hint
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)


async def test_no_calibrate_flag_leaves_capacity_unknown(
    daemon: Any, nats_url: str, tmp_path: Path
) -> None:
    agent, task = await start_agent(nats_url, tmp_path, "cpu-2", calibrate=False)
    try:
        await _until(lambda: daemon.fleet.is_up("cpu-2"), 10)
        seq = agent.seq
        await _until(lambda: agent.seq >= seq + 2, 10)
        assert agent.snapshot().capacity is None
        assert daemon.fleet.offer("cpu-2").capacity is None
        # the command still works: it answers at once and measures in the background
        reply = await daemon.bus.request(subjects.agent_cmd("cpu-2", "calibrate"), Calibrate())
        assert isinstance(reply, Accepted) and reply.state == "calibrating"
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)  # stopping kills the benchmark child


@pytest.mark.timeout(90)
async def test_failed_benchmark_is_an_error_not_a_crash(nats_url: str, tmp_path: Path) -> None:
    # no daemon: the object store does not exist, so the upload benchmark cannot run
    bus = Bus(await connect(StratosConfig(nats_url=nats_url), "test"))
    try:
        cap = await calibrate(bus, "lonely", tmp_path / "work", threads=1, budget_s=1.0)
    finally:
        await bus.close()
    assert cap.upload_mbps is None
    assert cap.error is not None and cap.error.startswith("upload:")
    assert cap.matmul_tflops["fp32"] > 0 and cap.disk_write_mbps  # the others still report


def test_job_threads_cap_reaches_job_children_and_trainer_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agents.runner import worker_env
    from plugins.trainers.hparams import COMMON_PARAMS, resolve_params, size_defaults

    env = worker_env(3)
    assert env["STRATOS_JOB_THREADS"] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    monkeypatch.delenv("STRATOS_JOB_THREADS", raising=False)
    assert "STRATOS_JOB_THREADS" not in worker_env(0)
    assert size_defaults(1_000, "lora-sft")["cpu_threads"] == 1  # no cap: tiny → one thread

    monkeypatch.setenv("STRATOS_JOB_THREADS", "3")  # what a job child of `--threads 3` sees
    assert size_defaults(1_000, "lora-sft")["cpu_threads"] == 3
    assert size_defaults(10**9, "sft")["cpu_threads"] == 3
    for asked, got in ((2, 2), (8, 3), (0, 3)):  # the cap holds against overrides
        params = resolve_params("sft", 1_000, {"cpu_threads": asked}, COMMON_PARAMS)
        assert params["cpu_threads"] == got
