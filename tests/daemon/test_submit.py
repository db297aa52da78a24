"""Job specs are validated at the edge: a bad one names the field and the daemon keeps serving."""

from __future__ import annotations

import json
from typing import Any

from schemas import subjects
from schemas.commands import ListRuns, RunList


async def _submit_raw(daemon: Any, spec: Any) -> dict[str, Any]:
    body = json.dumps({"type": "submit_run", "spec": spec}).encode()
    msg = await daemon.bus.nc.request(subjects.daemon_cmd("submit"), body, timeout=5)
    return dict(json.loads(msg.data))


GOOD = {
    "name": "t",
    "task": {"name": "mahjong-winning-tiles", "params": {"difficulty": 1}},
    "teachers": [{"backend": "reference", "model": "reference"}],
    "students": [{"model": "config:tiny"}],
}


async def test_malformed_spec_names_the_field(daemon: Any) -> None:
    bad = {**GOOD, "constraints": {"budget_usd": "twenty"}}
    reply = await _submit_raw(daemon, bad)
    assert reply["code"] == "bad_message"
    assert reply["field"] == "spec.constraints.budget_usd"
    assert "Expected `float" in reply["message"] or "number" in reply["message"]

    reply = await _submit_raw(daemon, {**GOOD, "teachers": []})
    assert reply["field"] == "spec.teachers"

    reply = await _submit_raw(daemon, {**GOOD, "studnets": []})
    assert reply["code"] == "bad_message" and "studnets" in reply["message"]
    # the daemon is still serving
    runs = await daemon.bus.request(subjects.daemon_cmd("runs"), ListRuns())
    assert isinstance(runs, RunList) and runs.runs == []


async def test_unknown_plugin_names_are_refused(daemon: Any) -> None:
    reply = await _submit_raw(daemon, {**GOOD, "trainer": "magic"})
    assert reply["code"] == "config" and reply["field"] == "trainer"
    assert "lora-sft" in reply["message"]  # says what exists
    reply = await _submit_raw(daemon, {**GOOD, "task": {"name": "chess"}})
    assert reply["field"] == "task.name"


async def test_secrets_in_spec_are_refused(daemon: Any) -> None:
    spec = {**GOOD, "teachers": [{"backend": "openai", "model": "gpt-4o",
                                  "params": {"api_key": "sk-live-123456789"}}]}
    reply = await _submit_raw(daemon, spec)
    assert reply["code"] == "config"
    assert reply["field"] == "teachers[0].params.api_key"
    assert "sk-live" not in json.dumps(reply)
