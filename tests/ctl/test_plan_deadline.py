"""A deadline no single server meets: the daemon's plan (`stratosctl plan`) and the run's
select_server propose a group of the two live agents, and say why."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from schemas import subjects
from schemas.commands import SubmitRun
from schemas.events import RunCompleted, RunFailed
from stratosd.groupplan import deadline_groups
from stratosd.pipeline import StageRun
from stratosd.stages import STAGE_FUNCS
from stratosd.validate import parse_spec_toml
from tests.conftest import start_agent
from tests.ctl.test_plan import JOB, _ctl
from tests.daemon.test_resume import RunEvents


@pytest.fixture
async def two_agents(nats_url: str, tmp_path: Path, daemon: Any) -> AsyncIterator[None]:
    """cpu-1 and cpu-2 in region eu, alike (this machine, nothing calibrated); a slow
    heartbeat, so that a loaded machine does not see them down while the CLI starts."""
    started = [await start_agent(nats_url, tmp_path, name, price=1.0, region="eu",
                                 interval=3.0)
               for name in ("cpu-1", "cpu-2")]
    for name in ("cpu-1", "cpu-2"):
        await daemon.fleet.wait_up(name, timeout=20)
    try:
        yield
    finally:
        for a, task in started:
            a.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)


def _deadline_job(daemon: Any, tmp_path: Path) -> tuple[Path, float, float]:
    """The demo job with a deadline between one agent's time and the pair's."""
    text = Path(JOB).read_text().replace("max_latency_ms = 500", "")
    base = tmp_path / "base.toml"
    base.write_text(text)
    costing = daemon.costs.costing(parse_spec_toml(base))
    offers = daemon.fleet.table()
    single = float(costing.columns(offers).seconds.min()) / 3600
    pair = deadline_groups(offers, 0.0, costing, max_nodes=2)[0].hours
    assert pair < single
    deadline = round((single + pair) / 2, 6)
    job = tmp_path / "deadline.toml"
    job.write_text(text.replace("[constraints]", f"[constraints]\ndeadline_hours = {deadline}"))
    return job, single, deadline


async def test_plan_proposes_a_group_only_when_the_deadline_needs_it(
        daemon: Any, two_agents: None, nats_url: str, tmp_path: Path) -> None:
    job, single, deadline = _deadline_job(daemon, tmp_path)
    r = await asyncio.to_thread(_ctl, "--nats", nats_url, "plan", str(job), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    chosen = data["selection"]["chosen"]
    assert chosen["members"] == ["cpu-1", "cpu-2"] and chosen["region"] == "eu"
    assert data["estimate"]["server"] == "cpu-1+cpu-2"
    assert data["selection"]["explanation"].startswith(
        f"Deadline {deadline:g} h: no single server meets it")
    assert any(row["chosen"] and row["kind"] == "group of 2 agents" for row in data["rows"])
    assert any("group(s) of live agents" in n for n in data["notes"])
    r = await asyncio.to_thread(_ctl, "--nats", nats_url, "plan", str(job))
    assert r.returncode == 0, r.stderr
    assert "no single server meets it" in r.stdout and "group cpu-1+cpu-2" in r.stdout
    assert "group of 2 agents" in r.stdout

    loose = tmp_path / "loose.toml"
    loose.write_text(job.read_text().replace(f"deadline_hours = {deadline}",
                                             f"deadline_hours = {single * 2}"))
    r = await asyncio.to_thread(_ctl, "--nats", nats_url, "plan", str(loose), "--json")
    data = json.loads(r.stdout)
    assert not data["selection"]["chosen"]["members"]
    assert data["selection"]["explanation"].startswith(
        f"Deadline {single * 2:g} h: cpu-1 meets it alone (")
    assert "no group needed" in data["selection"]["explanation"]

    tight = tmp_path / "tight.toml"
    tight.write_text(job.read_text().replace(f"deadline_hours = {deadline}",
                                             "deadline_hours = 0.0001"))
    r = await asyncio.to_thread(_ctl, "--nats", nats_url, "plan", str(tight))
    assert r.returncode == 4
    assert r.stderr.startswith("error: deadline 0.0001 h too short: the fastest option")
    assert "(group cpu-1+cpu-2)" in r.stderr and "hint:" in r.stderr


def _stub(result: dict[str, Any]) -> Any:
    async def stage(_ctx: StageRun) -> dict[str, Any]:
        return result
    return stage


async def test_select_server_records_the_group_and_why(
        daemon: Any, two_agents: None, tmp_path: Path) -> None:
    """The real select_server stage; the stages after it are stubs (their tests run them)."""
    job, _single, deadline = _deadline_job(daemon, tmp_path)
    daemon.pipeline.stages = {
        "select_server": STAGE_FUNCS["select_server"],
        **{s: _stub({"skipped": True}) for s in STAGE_FUNCS if s != "select_server"}}
    spec = parse_spec_toml(job)
    run_id = (await daemon.bus.request(subjects.daemon_cmd("submit"), SubmitRun(spec=spec))).ref
    events = RunEvents()
    await daemon.bus.js.subscribe(subjects.run_events(run_id), cb=events.cb,
                                  ordered_consumer=True, stream=subjects.EVENTS_STREAM)
    await events.until(lambda: bool(events.of(RunCompleted) or events.of(RunFailed)), 60)
    result = (await daemon.store.get(run_id)).results["select_server"]
    assert result["selection"]["chosen"]["members"] == ["cpu-1", "cpu-2"]
    assert result["agent_id"] == "cpu-1"
    assert result["selection"]["explanation"].startswith(
        f"Deadline {deadline:g} h: no single server meets it")
    assert result["selection"]["details"]["deadline"]["groups"][0]["id"] == "cpu-1+cpu-2"
