"""The agent answers only its closed set of typed commands; anything else runs nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from schemas import subjects
from schemas.commands import GetJob, RunStep
from stratosd.errors import RemoteError


async def _raw(agent: Any, verb: str, payload: dict[str, Any]) -> dict[str, Any]:
    msg = await agent.bus.nc.request(subjects.agent_cmd("gpu-1", verb),
                                     json.dumps(payload).encode(), timeout=5)
    return dict(json.loads(msg.data))


async def test_unknown_command_type_is_rejected(agent: Any, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    reply = await _raw(agent, "run", {"type": "shell", "cmd": f"touch {marker}"})
    assert reply["type"] == "error_reply"
    assert reply["code"] == "unsupported"
    assert "shell" in reply["message"]
    assert not marker.exists()
    assert agent.runner.jobs == {}


async def test_unknown_step_is_rejected_naming_the_field(agent: Any) -> None:
    reply = await _raw(agent, "run", {"type": "run_step", "job_id": "j1", "step": "exec",
                                      "args": {"cmd": "rm -rf /"}})
    assert reply["code"] == "bad_message"
    assert reply["field"] == "step"
    assert agent.runner.jobs == {}


async def test_garbage_payload_is_rejected(agent: Any) -> None:
    msg = await agent.bus.nc.request(subjects.agent_cmd("gpu-1", "run"), b"\x00not json",
                                     timeout=5)
    reply = json.loads(msg.data)
    assert reply["code"] == "bad_message"


async def test_unknown_job_is_not_found(agent: Any) -> None:
    with pytest.raises(RemoteError) as info:
        await agent.bus.request(subjects.agent_cmd("gpu-1", "job"), GetJob(job_id="nope"))
    assert info.value.remote_code == "not_found"


async def test_run_step_is_idempotent_by_job_id(agent: Any) -> None:
    # a step whose inputs are missing fails fast in the agent, but is taken exactly once
    step = RunStep(job_id="idem-1", run_id="r1", step="train", args={},
                   inputs={"dataset": "r1/missing.jsonl"})
    first = await agent.bus.request(subjects.agent_cmd("gpu-1", "run"), step)
    second = await agent.bus.request(subjects.agent_cmd("gpu-1", "run"), step)
    assert first.ref == second.ref == "idem-1"
    assert list(agent.runner.jobs) == ["idem-1"]
