"""Offers carry what agents measured: user-facing latency (or that it is unknown), capacity,
and whether a training job holds the server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agents.telemetry import parse_probe_target, parse_probe_targets, worst_latency
from schemas import subjects
from schemas.telemetry import AgentTelemetry, Capacity
from stratosd.errors import ConfigError
from tests.conftest import ROOT, free_port, start_agent


async def _until(pred: Any, timeout: float = 15.0) -> None:
    async def loop() -> None:
        while not pred():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(loop(), timeout)


def test_probe_targets_parse_labels_and_keep_urls_whole() -> None:
    assert parse_probe_target("us-east=https://h.example/health") == \
        ("us-east", "https://h.example/health")
    assert parse_probe_target("https://h.example/p?a=b") == \
        ("https://h.example/p?a=b", "https://h.example/p?a=b")
    assert parse_probe_target("eu=http://h:8080/p?x=1=2") == ("eu", "http://h:8080/p?x=1=2")
    for bad in ("ftp://h/", "us-east=", "just-a-label", "eu=h.example"):
        with pytest.raises(ConfigError) as info:
            parse_probe_target(bad)
        assert info.value.field == "probe_url" and "LABEL=URL" in info.value.hint
    with pytest.raises(ConfigError, match="given twice"):
        parse_probe_targets(["a=http://x", "a=http://y"])
    assert worst_latency({}) is None
    assert worst_latency({"a": 3.0, "b": 40.0}) == 40.0


def test_bad_probe_url_flag_is_a_config_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "agents", "--id", "x", "--nats",
                        "nats://127.0.0.1:9", "--probe-url", "ftp://h/"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    assert r.returncode == 2
    assert "is not an http(s) URL" in r.stderr and "hint:" in r.stderr


async def test_unknown_latency_is_never_a_known_zero(daemon: Any, nats_url: str,
                                                    tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    started = [await start_agent(nats_url, tmp_path, "none", calibrate=False),
               await start_agent(nats_url, tmp_path, "dead", calibrate=False,
                                 probe_url=[f"gone={dead}"])]
    try:
        await _until(lambda: daemon.fleet.is_up("none") and daemon.fleet.is_up("dead"))
        dead_agent = started[1][0]
        await dead_agent.measure_latency()
        seq = dead_agent.seq
        await _until(lambda: daemon.fleet.agents["dead"].telemetry.seq > seq)
        for agent_id in ("none", "dead"):
            tlm = daemon.fleet.agents[agent_id].telemetry
            assert tlm.latency_ms is None and tlm.user_latency_ms == {}
            offer = daemon.fleet.offer(agent_id)
            assert offer.latency_known is False
    finally:
        for a, task in started:
            a.stop()
            await asyncio.wait_for(task, 30)


async def test_probe_targets_give_user_latency(daemon: Any, nats_url: str, tmp_path: Path,
                                               users_url: str) -> None:
    # users_url: a real HTTP server on loopback, the users' side of the probe
    dead = f"http://127.0.0.1:{free_port()}/"
    agent, task = await start_agent(
        nats_url, tmp_path, "edge", calibrate=False,
        probe_url=[f"local={users_url}health", f"{users_url}?a=b", f"gone={dead}"])
    try:
        await _until(lambda: daemon.fleet.is_up("edge")
                     and len(daemon.fleet.agents["edge"].telemetry.user_latency_ms) == 2)
        tlm = daemon.fleet.agents["edge"].telemetry
        assert set(tlm.user_latency_ms) == {"local", f"{users_url}?a=b"}  # "gone" left out
        assert all(ms > 0 for ms in tlm.user_latency_ms.values())
        assert tlm.latency_ms == max(tlm.user_latency_ms.values())  # the worst target
        offer = daemon.fleet.offer("edge")
        assert offer.latency_known is True and offer.latency_ms == tlm.latency_ms
        assert agent.daemon_rtt_ms is None or agent.daemon_rtt_ms > 0  # debug figure only
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)


async def test_offer_carries_capacity_and_busy(daemon: Any) -> None:
    cap = Capacity(threads=2, job_threads=2, matmul_tflops={"fp32": 0.1}, mem_bw_gbps=10.0)
    tlm = AgentTelemetry(agent_id="spoke", latency_ms=12.5, capacity=cap,
                         training_jobs=["j1"], running_jobs=["j1"], source="spoke")
    await daemon.bus.publish(subjects.telemetry("spoke"), tlm)
    await _until(lambda: daemon.fleet.is_up("spoke"))
    offer = daemon.fleet.offer("spoke")
    assert offer.capacity == cap and offer.busy is True
    assert offer.latency_known is True and offer.latency_ms == 12.5
