"""Bus security, what an agent must not do: command, impersonate or eavesdrop on other agents,
touch streams, run state or the event history, read replies meant for others, or read or
change another agent's artifacts."""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path
from typing import Any

import pytest

from schemas import subjects
from schemas.base import encode
from schemas.commands import ListServers, RunStep
from schemas.events import JobCompleted
from schemas.telemetry import AgentTelemetry
from stratosd.artifacts.busstore import agent_bucket
from stratosd.auth import agent_user
from stratosd.bus import Bus, connect
from stratosd.errors import StratosError
from tests.e2e.secure import OPERATOR, Creds, client, until


async def test_agent_cannot_command_another_agent_or_the_daemon(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any]
) -> None:
    rogue = await client(creds, agent_user("gpu-2"))
    try:
        step = RunStep(job_id="evil-1", run_id="r1", step="train", args={})
        with pytest.raises(StratosError):
            await rogue.bus.request(subjects.agent_cmd("gpu-1", "run"), step, timeout=1)
        await rogue.violation("stratos.cmd.agent.gpu-1.run")
        with pytest.raises(StratosError):
            await rogue.bus.request(subjects.daemon_cmd("servers"), ListServers(), timeout=1)
        await rogue.violation("stratos.cmd.daemon.servers")
    finally:
        await rogue.bus.close()
    assert "evil-1" not in agents["gpu-1"].runner.jobs
    assert agents["gpu-1"].runner.jobs == {}


async def test_agent_cannot_forge_telemetry_for_another_subject(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any]
) -> None:
    rogue = await client(creds, agent_user("gpu-2"))
    try:
        await rogue.bus.publish(subjects.telemetry("ghost"), AgentTelemetry(agent_id="ghost"))
        await rogue.bus.publish(subjects.telemetry("gpu-1"),
                                AgentTelemetry(agent_id="gpu-1", region="forged"))
        await rogue.violation("stratos.tlm.ghost")
        await rogue.violation("stratos.tlm.gpu-1")
        # its own subject still works, and arrives after the denied ones (same connection)
        await rogue.bus.publish(subjects.telemetry("gpu-2"),
                                AgentTelemetry(agent_id="gpu-2", region="sentinel"))
        await rogue.bus.nc.flush()
        fleet = secure_daemon.fleet
        await until(lambda: fleet.agents["gpu-2"].telemetry.region == "sentinel")
    finally:
        await rogue.bus.close()
    assert "ghost" not in fleet.agents
    assert fleet.agents["gpu-1"].telemetry.region != "forged"


async def test_agent_cannot_forge_telemetry_in_the_payload(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any]
) -> None:
    rogue = await client(creds, agent_user("gpu-2"))
    try:
        # allowed subject, lying payload
        await rogue.bus.publish(subjects.telemetry("gpu-2"), AgentTelemetry(agent_id="ghost"))
        await rogue.bus.publish(subjects.telemetry("gpu-2"),
                                AgentTelemetry(agent_id="gpu-2", region="sentinel"))
        await rogue.bus.nc.flush()
        fleet = secure_daemon.fleet
        await until(lambda: fleet.agents["gpu-2"].telemetry.region == "sentinel")
    finally:
        await rogue.bus.close()
    assert "ghost" not in fleet.agents


async def test_agent_cannot_listen_to_another_agents_commands(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any]
) -> None:
    rogue = await client(creds, agent_user("gpu-2"))
    seen: list[str] = []

    async def cb(msg: Any) -> None:
        seen.append(msg.subject)

    try:
        await rogue.bus.nc.subscribe(subjects.agent_cmd("gpu-1", "run"), cb=cb)
        await rogue.bus.nc.subscribe("stratos.cmd.>", cb=cb)
        await rogue.violation("stratos.cmd.agent.gpu-1.run")
        await rogue.violation("stratos.cmd.>")
        step = RunStep(job_id="peek-1", run_id="r1", step="train", args={},
                       inputs={"dataset": "r1/missing.jsonl"})
        await secure_daemon.dispatch.send("gpu-1", step)  # gpu-1 gets it ...
        await rogue.bus.nc.flush()  # ... and after a round trip, the rogue still has nothing
    finally:
        await rogue.bus.close()
    assert seen == []


async def test_agent_cannot_touch_streams_runs_or_the_event_history(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any]
) -> None:
    rogue = await client(creds, agent_user("gpu-2"))
    js = rogue.bus.nc.jetstream(timeout=1)
    try:
        with pytest.raises(Exception):  # noqa: B017 - denied requests time out or fail
            await js.delete_stream(subjects.EVENTS_STREAM)
        await rogue.violation(f"$JS.API.STREAM.DELETE.{subjects.EVENTS_STREAM}")
        with pytest.raises(Exception):  # noqa: B017
            await js.subscribe(subjects.ALL_JOB_EVENTS, stream=subjects.EVENTS_STREAM,
                               ordered_consumer=True)
        await rogue.violation("$JS.API.CONSUMER.CREATE.STRATOS_EVENTS")
        with pytest.raises(Exception):  # noqa: B017
            kv = await js.key_value(subjects.RUNS_BUCKET)
            await kv.put("r1", b"{}")
        await rogue.bus.nc.publish(subjects.run_event("r1", "completed"), b"{}")
        await rogue.violation("stratos.evt.run.r1.completed")
    finally:
        await rogue.bus.close()
    info = await secure_daemon.bus.js.stream_info(subjects.EVENTS_STREAM)
    assert info.config.name == subjects.EVENTS_STREAM


async def test_agent_cannot_forge_job_events_for_another_agents_job(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any]
) -> None:
    d = secure_daemon
    d.dispatch.job_agent["victim-1"] = "gpu-1"  # as Dispatcher.send records it
    d.dispatch.job_agent["own-1"] = "gpu-2"
    rogue = agents["gpu-2"].bus
    forged = JobCompleted(job_id="victim-1", run_id="r1", agent_id="gpu-1", step="train",
                          result={"accuracy": 1.0}, source="gpu-1")
    # on the victim's subject the server refuses the publish outright
    with contextlib.suppress(Exception):
        await rogue.js.publish(subjects.job_event("gpu-1", "victim-1", "completed"),
                               encode(forged), timeout=1)
    # on its own subject the dispatcher drops it: the job was sent to gpu-1
    await rogue.publish_event(subjects.job_event("gpu-2", "victim-1", "completed"), forged)
    own = JobCompleted(job_id="own-1", run_id="r1", agent_id="gpu-2", step="train",
                       source="gpu-2")
    await rogue.publish_event(subjects.job_event("gpu-2", "own-1", "completed"), own)
    await until(lambda: "own-1" in d.dispatch.outcomes)  # handled in order, after the forgery
    assert "victim-1" not in d.dispatch.outcomes


async def test_agent_cannot_read_replies_meant_for_others(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any]
) -> None:
    rogue = await client(creds, agent_user("gpu-2"))
    seen: list[bytes] = []

    async def cb(msg: Any) -> None:
        seen.append(msg.data)

    op = Bus(await connect(creds.config(OPERATOR), "stratosctl"))
    try:
        await rogue.bus.nc.subscribe("_INBOX.>", cb=cb)
        await rogue.bus.nc.flush()
        await op.request(subjects.daemon_cmd("servers"), ListServers())
        await rogue.bus.nc.flush()
    finally:
        await op.close()
        await rogue.bus.close()
    assert not any(b"server_list" in m for m in seen)


SYNTH_ARGS = {"task": {"name": "mahjong-winning-tiles",
                       "params": {"difficulty": 1, "n_train": 4, "n_test": 2, "seed": 0}},
              "teacher": {"name": "oracle", "backend": "reference", "model": "reference"},
              "mode": "injection", "tries": 1}


async def test_agent_cannot_read_or_change_another_agents_artifacts(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any], tmp_path: Path
) -> None:
    d = secure_daemon
    # the daemon keeps a run's input in the shared bucket; gpu-1's job reads it, writes a dataset
    src = tmp_path / "notes.jsonl"
    src.write_bytes(b'{"secret": "gpu-1 only"}\n' * 1000)
    await d.bus.put_artifact("r1/notes.jsonl", src)
    step = RunStep(job_id="priv-1", run_id="r1", step="synthesize", args=SYNTH_ARGS,
                   inputs={"notes": "r1/notes.jsonl"})
    await d.dispatch.send("gpu-1", step)
    outcome = await d.dispatch.wait("priv-1", timeout=60)
    assert outcome.state == "completed", outcome
    assert outcome.artifacts == {"dataset.jsonl": "r1/dataset.jsonl"}
    owner = agents["gpu-1"].bus
    assert await owner.has_artifact("r1/notes.jsonl")  # placed in gpu-1's bucket
    # the dataset was collected into the shared bucket, where the stages read it
    before = await d.bus.get_artifact("r1/dataset.jsonl", tmp_path / "before.jsonl")
    assert before.read_bytes().strip()

    # gpu-2's own artifact API sees neither the shared bucket nor gpu-1's
    with pytest.raises(StratosError):
        await agents["gpu-2"].bus.get_artifact("r1/dataset.jsonl", tmp_path / "x")
    # and a raw client logged in as gpu-2 is refused by the server at every door
    rogue = await client(creds, agent_user("gpu-2"))
    js = rogue.bus.nc.jetstream(timeout=1)
    victim = agent_bucket("gpu-1")
    stream = f"OBJ_{victim}"
    meta = base64.urlsafe_b64encode(b"r1/dataset.jsonl").decode()
    try:
        for bucket in (victim, subjects.ARTIFACTS_BUCKET):  # read: bind the store
            with pytest.raises(Exception):  # noqa: B017 - denied requests time out or fail
                await js.object_store(bucket)
            await rogue.violation(f"$JS.API.STREAM.INFO.OBJ_{bucket}")
        with pytest.raises(Exception):  # noqa: B017 - read: the object's meta by subject
            await js.get_last_msg(stream, f"$O.{victim}.M.{meta}")
        await rogue.violation(f"$JS.API.STREAM.MSG.GET.{stream}")
        with pytest.raises(Exception):  # noqa: B017 - read: a consumer on its chunks
            await js.subscribe(f"$O.{victim}.C.>", stream=stream, ordered_consumer=True)
        await rogue.violation(f"$JS.API.CONSUMER.CREATE.{stream}")
        # overwrite: a new meta for the key (what a put ends with)
        await rogue.bus.nc.publish(f"$O.{victim}.M.{meta}", b'{"name": "r1/dataset.jsonl"}')
        await rogue.violation(f"$O.{victim}.M.{meta}")
        with pytest.raises(Exception):  # noqa: B017 - purge: every chunk gone
            await js.purge_stream(stream)
        await rogue.violation(f"$JS.API.STREAM.PURGE.{stream}")
        with pytest.raises(Exception):  # noqa: B017 - or drop the whole bucket
            await js.delete_object_store(victim)
        await rogue.violation(f"$JS.API.STREAM.DELETE.{stream}")
    finally:
        await rogue.bus.close()
    # nothing changed: the owner and the daemon read the same dataset
    again = await owner.get_artifact("r1/dataset.jsonl", tmp_path / "again.jsonl")
    assert again.read_bytes() == before.read_bytes()
