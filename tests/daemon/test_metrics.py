"""The daemon's Prometheus endpoint: a real daemon, a real agent and a real run, scraped over
HTTP and parsed as the Prometheus text format."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas import subjects
from schemas.commands import SubmitRun
from stratosd.pipeline import STAGES, StageRun
from stratosd.stages import run_job
from stratosd.validate import spec_from_data
from tests.conftest import ROOT, daemon_config, running_daemon, start_agent

SPEC: dict[str, Any] = {
    "name": "metrics",
    "task": {"name": "mahjong-winning-tiles", "params": {"difficulty": 1}, "probe_size": 3},
    "teachers": [{"name": "oracle", "backend": "reference", "model": "reference"}],
    "students": [{"model": "config:tiny"}],
}
COST_USD = {"synthesize": 0.25, "train": 1.5}  # what the stages below report as measured


@pytest.fixture
async def metered(nats_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    """A daemon serving metrics on a free port."""
    async with running_daemon(daemon_config(nats_url, tmp_path, metrics_port=0)) as d:
        yield d


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(daemon: Any) -> Samples:
    """GET /metrics and parse it (the parser rejects anything that is not the text format)."""
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"http://127.0.0.1:{daemon.metrics.port}/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(reply.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, None when absent."""
    return samples.get((name, frozenset(labels.items())))


async def scrape_until(daemon: Any, pred: Callable[[Samples], bool],
                       timeout: float = 30) -> Samples:
    """Scrape until pred holds (the figures follow events asynchronously)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(daemon)
        if pred(samples):
            return samples
        assert asyncio.get_running_loop().time() < deadline, "metrics never got there"
        await asyncio.sleep(0.1)


def stages(agent_id: str) -> dict[str, Callable[[StageRun], Any]]:
    """Quick stages: the run goes to agent_id, probe_teachers runs a real agent job, two
    stages report a measured cost."""
    def make(stage: str) -> Callable[[StageRun], Any]:
        async def fn(ctx: StageRun) -> dict[str, Any]:
            if stage == "select_server":
                await ctx.note(agent_id=agent_id)
            if stage == "probe_teachers":
                args = {"task": SPEC["task"], "teachers": SPEC["teachers"], "probe_size": 3,
                        "seed": 0}
                return (await run_job(ctx, "probe", args)).result
            if stage in COST_USD:
                return {"cost": {"measured_usd": COST_USD[stage]}}
            return {"stage": stage}
        return fn
    return {stage: make(stage) for stage in STAGES}


async def test_metrics_are_off_by_default(daemon: Any) -> None:
    assert daemon.metrics is None


def test_a_taken_port_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "stratosd", "--metrics-port", str(port), "--log-format",
             "json"], capture_output=True, text=True, timeout=60, cwd=ROOT,
            env={**os.environ, "STRATOS_HOME": str(tmp_path / "home")}, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: cannot serve metrics on 127.0.0.1:{port}" in proc.stderr
    assert "hint: pick a free --metrics-port" in proc.stderr


async def test_fleet_and_run_metrics_follow_heartbeats_and_a_run(
        metered: Any, nats_url: str, tmp_path: Path) -> None:
    before = await scrape(metered)
    assert value(before, "stratos_agents", status="up") == 0
    assert value(before, "stratos_runs_submitted_total") == 0
    assert value(before, "process_resident_memory_bytes")  # the daemon process itself

    agent, task = await start_agent(nats_url, tmp_path, "gpu-1", price=1.5, interval=0.2)
    try:
        fleet = await scrape_until(
            metered, lambda s: value(s, "stratos_agents", status="up") == 1)
        assert value(fleet, "stratos_agent_up", agent_id="gpu-1") == 1
        assert value(fleet, "stratos_agent_price_usd_per_hour", agent_id="gpu-1") == 1.5
        assert (value(fleet, "stratos_agent_memory_total_bytes", agent_id="gpu-1") or 0) > 0
        heard = value(fleet, "stratos_telemetry_messages_total") or 0
        assert heard >= 1
        assert value(fleet, "stratos_telemetry_delay_seconds_count") == heard
        # the next heartbeat moves the counters on
        await scrape_until(
            metered, lambda s: (value(s, "stratos_telemetry_messages_total") or 0) > heard)

        metered.pipeline.stages = stages("gpu-1")
        metered.pipeline.budget_check = None
        reply = await metered.bus.request(subjects.daemon_cmd("submit"),
                                          SubmitRun(spec=spec_from_data(SPEC)))
        done = await scrape_until(
            metered, lambda s: value(s, "stratos_runs_finished_total", outcome="completed") == 1,
            timeout=50)
        run = await metered.store.get(reply.ref)
        assert run.state == "completed"
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)

    assert value(done, "stratos_runs_submitted_total") == 1
    assert value(done, "stratos_run_duration_seconds_count", outcome="completed") == 1
    for stage in STAGES:  # a loaded host may time a job out: attempts are then retries
        started = value(done, "stratos_stages_started_total", stage=stage) or 0
        assert started >= 1, stage
        assert (value(done, "stratos_stage_retries_total", stage=stage) or 0) == started - 1
        assert value(done, "stratos_stage_duration_seconds_count", stage=stage) == 1, stage
    for stage, usd in COST_USD.items():
        assert value(done, "stratos_spent_usd_total", stage=stage) == usd
    assert (value(done, "stratos_jobs_started_total", step="probe") or 0) >= 1
    assert (value(done, "stratos_jobs_finished_total", outcome="completed") or 0) >= 1
    assert (value(done, "stratos_job_duration_seconds_count", step="probe") or 0) >= 1
    assert (value(done, "stratos_event_lag_seconds_count", kind="run") or 0) >= 2 * len(STAGES)
    assert (value(done, "stratos_event_lag_seconds_count", kind="job") or 0) >= 2
    assert value(done, "stratos_agent_registrations_total") == 1
    assert value(done, "stratos_runs_active") == 0
