"""A 3-node NATS cluster on loopback (stratosd.natsd.NatsCluster): streams, KV buckets and the
object store get 3 replicas; a run survives the SIGKILL of the nats-server its training agent
(or its daemon) is connected to, with every event in the stream and its KV state intact."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog

from schemas import subjects
from schemas.commands import GetRun, RunInfo, SubmitRun
from schemas.events import RunProgress
from stratosd.bus import Bus, connect
from stratosd.config import DaemonConfig, StratosConfig, load_config, split_nats_urls
from stratosd.errors import BusUnavailable, ConfigError
from stratosd.natsd import NatsCluster, NatsServer, free_ports, leaf_node_config
from stratosd.validate import spec_from_data
from tests.conftest import Proc
from tests.e2e.jobs import agents_up, daemon_ready, open_bus, tiny_spec

STREAMS = [subjects.EVENTS_STREAM, subjects.TELEMETRY_STREAM,
           *(f"KV_{b}" for b in (subjects.RUNS_BUCKET, subjects.AGENTS_BUCKET,
                                 subjects.ENDPOINTS_BUCKET, subjects.COSTMODEL_BUCKET)),
           f"OBJ_{subjects.ARTIFACTS_BUCKET}"]
# heartbeats every 0.5 s, an agent is down after 3 missed
FAST_LIVENESS = {"STRATOS_LIVENESS_CHECK_S": "0.5", "STRATOS_MISSED_HEARTBEATS": "3"}
TERMINAL_JOB_EVENTS = {"job_completed", "job_failed", "job_cancelled", "job_interrupted"}
DURABLE_JOB_EVENTS = {"job_started", *TERMINAL_JOB_EVENTS}


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nats-servers in one JetStream cluster on free loopback ports."""
    cluster = NatsCluster(tmp_path / "nats", 3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def _replicas(bus: Bus) -> dict[str, int]:
    return {s: (await bus.js.stream_info(s)).config.num_replicas or 1 for s in STREAMS}


# --- fast: replicas, configuration -------------------------------------------------------------

async def test_replicas_follow_the_cluster_size(nats_cluster: NatsCluster) -> None:
    cfg = DaemonConfig(nats_url=nats_cluster.url)
    bus = Bus(await connect(cfg, "test-daemon"), cfg)
    try:
        with structlog.testing.capture_logs() as logs:
            await bus.ensure_streams()
        assert bus.replicas == 3
        assert await _replicas(bus) == dict.fromkeys(STREAMS, 3)
        info = await bus.js.stream_info(subjects.EVENTS_STREAM)
        assert info.cluster is not None and info.cluster.name == nats_cluster.name
        assert len(info.cluster.replicas or []) == 2  # the leader plus two followers
        chosen = [e for e in logs if e["event"] == "jetstream_replicas"]
        assert chosen and chosen[0]["replicas"] == 3 and chosen[0]["cluster_nodes"] == 3
        await bus.ensure_streams()  # idempotent: a daemon restart changes nothing
        assert await _replicas(bus) == dict.fromkeys(STREAMS, 3)
    finally:
        await bus.close()


async def test_one_url_finds_the_whole_cluster(nats_cluster: NatsCluster) -> None:
    nc = await connect(StratosConfig(nats_url=nats_cluster.urls[1]), "test")
    try:
        from stratosd.bus import cluster_size

        assert cluster_size(nc) == 3
        assert {f"{u.hostname}:{u.port}" for u in nc.servers} == \
            {u.split("://")[1] for u in nats_cluster.urls}  # failover targets, discovered
    finally:
        await nc.close()


async def test_existing_streams_keep_their_replicas_unless_forced(
    nats_cluster: NatsCluster,
) -> None:
    cfg = DaemonConfig(nats_url=nats_cluster.url)
    bus = Bus(await connect(cfg, "test-daemon"), cfg)
    try:
        await bus.ensure_streams(replicas=1)  # as a deployment that started on one node
        assert await _replicas(bus) == dict.fromkeys(STREAMS, 1)
        with structlog.testing.capture_logs() as logs:
            await bus.ensure_streams()
        assert await _replicas(bus) == dict.fromkeys(STREAMS, 1)
        assert {e["stream"] for e in logs if e["event"] == "stream_replicas_kept"} == \
            set(STREAMS)
        kv = await bus.kv(subjects.RUNS_BUCKET)
        await kv.put("probe", b"kept")
        await bus.ensure_streams(replicas=3)  # --replicas 3: scaled in place
        assert await _replicas(bus) == dict.fromkeys(STREAMS, 3)
        assert (await kv.get("probe")).value == b"kept"
    finally:
        await bus.close()


async def test_a_single_server_keeps_one_replica(nats_url: str) -> None:
    cfg = DaemonConfig(nats_url=nats_url)
    bus = Bus(await connect(cfg, "test-daemon"), cfg)
    try:
        await bus.ensure_streams()
        assert bus.replicas == 1
        assert await _replicas(bus) == dict.fromkeys(STREAMS, 1)
        with pytest.raises(ConfigError) as err:
            await bus.ensure_streams(replicas=3)
        assert err.value.field == "replicas" and "--replicas" in err.value.hint
        assert await _replicas(bus) == dict.fromkeys(STREAMS, 1)
    finally:
        await bus.close()


async def test_publish_rides_out_a_stream_leader_election(nats_cluster: NatsCluster) -> None:
    cfg = DaemonConfig(nats_url=nats_cluster.url)
    bus = Bus(await connect(cfg, "test-daemon"), cfg)
    try:
        await bus.ensure_streams()
        info = await bus.js.stream_info(subjects.EVENTS_STREAM)
        assert info.cluster is not None and info.cluster.leader
        leader = int(info.cluster.leader.removeprefix("n")) - 1
        nats_cluster.kill(leader)  # the stream has no leader until the survivors elect one
        event = RunProgress(run_id="01clusterelection", stage="train", message="election")
        subject = subjects.run_event(event.run_id, "progress")
        with structlog.testing.capture_logs() as logs:
            await bus.publish_event(subject, event)
        stored = await bus.js.get_last_msg(subjects.EVENTS_STREAM, subject)
        assert json.loads(stored.data or b"{}")["id"] == event.id
        retried = [e for e in logs if e["event"] == "event_publish_retried"]
        print(f"\npublish during the leader election: {len(retried)} retries")
    finally:
        await bus.close()


async def test_an_agent_behind_a_leaf_node_uses_the_cluster(tmp_path: Path) -> None:
    hub = NatsCluster(tmp_path / "hub", 3, domain="hub", leafnodes=True)
    hub.start()
    port = free_ports(1)[0]
    conf = tmp_path / "leaf-eu.conf"  # the config docs/cluster.md shows
    conf.write_text(leaf_node_config("leaf-eu-1", host="127.0.0.1", port=port,
                                     hub=hub.leaf_urls, domain="hub"))
    leaf = NatsServer(tmp_path / "leaf", port=port, config_file=conf,
                      watch=("Leafnode connection created",))
    buses: list[Bus] = []
    try:
        leaf.start()
        assert leaf.wait_for_log(("Leafnode connection created",), 15), leaf.log_tail()
        cfg = DaemonConfig(nats_url=hub.url)
        daemon = Bus(await connect(cfg, "stratosd"), cfg)
        buses.append(daemon)
        await daemon.ensure_streams()
        assert daemon.replicas == 3
        agent = Bus(await connect(StratosConfig(nats_url=leaf.url), "stratos-agent-eu"))
        buses.append(agent)

        async def answer(msg: Any) -> None:
            await msg.respond(b"pong")

        await daemon.nc.subscribe(subjects.agent_cmd("eu-1", "ping"), cb=answer)
        await daemon.nc.flush()
        for _ in range(50):  # the hub's interest reaches the leaf a moment after it connects
            try:
                await agent.js.account_info()
                break
            except Exception:  # noqa: BLE001 - not propagated yet
                await asyncio.sleep(0.2)
        event = RunProgress(run_id="01leafrun", stage="train", message="from eu")
        subject = subjects.run_event(event.run_id, "progress")
        await agent.publish_event(subject, event)
        stored = await daemon.js.get_last_msg(subjects.EVENTS_STREAM, subject)
        assert json.loads(stored.data or b"{}")["id"] == event.id
        await (await agent.kv(subjects.AGENTS_BUCKET)).put("eu-1", b"state")
        assert (await (await daemon.kv(subjects.AGENTS_BUCKET)).get("eu-1")).value == b"state"
        blob = tmp_path / "adapter.bin"
        blob.write_bytes(bytes(range(256)) * 4096)
        await agent.put_artifact("runs/01leafrun/adapter.bin", blob)
        back = await daemon.get_artifact("runs/01leafrun/adapter.bin", tmp_path / "back.bin")
        assert back.read_bytes() == blob.read_bytes()
        reply = await agent.nc.request(subjects.agent_cmd("eu-1", "ping"), b"", timeout=5)
        assert reply.data == b"pong"
    finally:
        for bus in buses:
            await bus.close()
        leaf.stop()
        hub.stop()


def test_nats_url_takes_a_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert split_nats_urls(" nats://a:4222, nats://b:4222,,nats://a:4222") == \
        ["nats://a:4222", "nats://b:4222"]
    with pytest.raises(ConfigError):
        split_nats_urls(" , ")
    toml = tmp_path / "stratosd.toml"
    toml.write_text('nats_url = ["nats://a:4222", "nats://b:4222"]\nreplicas = 3\n')
    cfg = load_config(DaemonConfig, str(toml))
    assert cfg.nats_urls() == ["nats://a:4222", "nats://b:4222"] and cfg.replicas == 3
    monkeypatch.setenv("STRATOS_NATS_URL", "nats://c:4222,nats://d:4222")
    monkeypatch.setenv("STRATOS_REPLICAS", "1")
    cfg = load_config(DaemonConfig)
    assert cfg.nats_urls() == ["nats://c:4222", "nats://d:4222"] and cfg.replicas == 1
    monkeypatch.setenv("STRATOS_REPLICAS", "0")
    with pytest.raises(ConfigError):
        load_config(DaemonConfig)


async def test_unreachable_cluster_error_hides_passwords() -> None:
    cfg = StratosConfig(nats_url="nats://u:s3cret@127.0.0.1:9,nats://127.0.0.1:7",
                        connect_timeout_s=0.5)
    with pytest.raises(BusUnavailable) as err:
        await connect(cfg, "test")
    assert "s3cret" not in err.value.message
    assert "nats://127.0.0.1:9,nats://127.0.0.1:7" in err.value.message


# --- slow: a member killed mid-training ----------------------------------------------------------

def _server_of(proc: Proc) -> str:
    """host:port of the nats-server proc is connected to now (from its JSON log)."""
    server = ""
    for line in proc.output().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") in ("nats_connected", "nats_reconnected"):
            server = str(rec.get("server", ""))
    return server


async def _get_run(bus: Bus, run_id: str) -> RunInfo:
    return (await bus.request(subjects.daemon_cmd("run"), GetRun(run_id=run_id))).run


async def _finished(bus: Bus, run_id: str, timeout: float) -> RunInfo:
    """Poll the daemon (requests work across the test client's own failover)."""
    async def loop() -> RunInfo:
        while True:
            try:
                run = await _get_run(bus, run_id)
                if run.state in ("completed", "failed", "cancelled"):
                    return run
            except Exception:  # noqa: BLE001 - the bus may be failing over
                pass
            await asyncio.sleep(0.5)
    return await asyncio.wait_for(loop(), timeout)


async def _stream_events(bus: Bus) -> list[dict[str, Any]]:
    """Every message in STRATOS_EVENTS, replayed from the (replicated) stream."""
    last = (await bus.js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
    seen: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def cb(msg: Any) -> None:
        seen.append({**json.loads(msg.data), "_subject": msg.subject})
        if msg.metadata.sequence.stream >= last:
            done.set()

    sub = await bus.js.subscribe(subjects.EVENTS_SUBJECTS[0], cb=cb, ordered_consumer=True)
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await sub.unsubscribe()
    return seen


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim", ["agent", "daemon"], ids=["agent-node", "daemon-node"])
async def test_node_killed_mid_training_loses_nothing(
    nats_cluster: NatsCluster, tmp_path: Path, victim: str,
) -> None:
    url = nats_cluster.url
    env = {"STRATOS_HOME": str(tmp_path / "home"), **FAST_LIVENESS}
    procs = {"daemon": Proc(["-m", "stratosd", "--nats", url, "--log-format", "json"],
                            tmp_path / "daemon.log", env)}
    for agent_id in ("cpu-1", "cpu-2"):
        procs[agent_id] = Proc(
            ["-m", "agents", "--id", agent_id, "--nats", url, "--interval", "0.5",
             "--price-per-hour", "1.0", "--no-calibrate", "--log-format", "json"],
            tmp_path / f"{agent_id}.log", env)

    def logs() -> str:
        return "\n".join(f"--- {n}\n{p.output()[-3000:]}" for n, p in procs.items())

    bus = await open_bus(url)
    live: dict[str, dict[str, Any]] = {}  # every event a core subscriber saw, by id
    checkpoint = asyncio.Event()
    trainer: dict[str, str] = {}

    async def on_event(msg: Any) -> None:
        ev = json.loads(msg.data)
        live[ev["id"]] = {**ev, "_subject": msg.subject}
        if ev["type"] == "job_progress" and ev.get("step") == "train" and \
                str(ev.get("message", "")).startswith("checkpoint uploaded"):
            trainer.setdefault("agent_id", ev["agent_id"])
            checkpoint.set()

    try:
        await daemon_ready(bus)
        await agents_up(bus, {"cpu-1", "cpu-2"})
        assert await _replicas(bus) == dict.fromkeys(STREAMS, 3)
        sub = await bus.nc.subscribe(subjects.EVENTS_SUBJECTS[0], cb=on_event)
        spec = tiny_spec("cluster-node-kill")
        spec["train"].update(max_steps=60, save_steps=2)  # still training at the kill
        run_id = (await bus.request(subjects.daemon_cmd("submit"),
                                    SubmitRun(spec=spec_from_data(spec)))).ref
        await asyncio.wait_for(checkpoint.wait(), 150)
        before = await _get_run(bus, run_id)
        on = {name: _server_of(procs[name]) for name in ("daemon", trainer["agent_id"])}
        target = on["daemon"] if victim == "daemon" else on[trainer["agent_id"]]
        killed = nats_cluster.index_of(target)
        t_kill = time.monotonic()
        nats_cluster.kill(killed)  # SIGKILL: its clients and its stream replicas vanish
        run = await _finished(bus, run_id, 200)
        recovery_s = time.monotonic() - t_kill
        await sub.unsubscribe()
        stored = await _stream_events(bus)
        kv_run = await (await bus.kv(subjects.RUNS_BUCKET)).get(run_id)
        replicas_after = await _replicas(bus)
    except TimeoutError:
        pytest.fail(f"run did not get through the nats node kill\n{logs()}")
    finally:
        await bus.close()
        for name, proc in procs.items():
            if name != "daemon":
                proc.stop()
        procs["daemon"].stop()

    assert run.state == "completed", (run.error, logs())
    assert {"train", "evaluate", "report"} <= set(run.results)
    # KV state intact: the record the daemon keeps is the one it reports, created before
    kv_state = msgspec.json.decode(kv_run.value, type=RunInfo)
    assert msgspec.structs.replace(kv_state, revision=run.revision) == run
    assert run.created == before.created and run.spec == before.spec
    assert set(before.results) <= set(run.results)
    assert replicas_after == dict.fromkeys(STREAMS, 3)

    mine = [e for e in stored if e.get("run_id") == run_id]
    by_id = {e["id"]: e for e in mine}
    assert len(by_id) == len(mine), "duplicate events in the stream"
    # nothing lost: every event of the run a live subscriber saw is in the stream
    missing = [e for i, e in live.items() if e.get("run_id") == run_id and i not in by_id]
    assert not missing, [(e["type"], e["_subject"]) for e in missing]
    run_types = [e["type"] for e in mine if e["_subject"].startswith("stratos.evt.run.")]
    assert run_types[0] == "run_submitted" and run_types[-1] == "run_completed"
    started = {e["stage"] for e in mine if e["type"] == "run_stage_started"}
    completed = {e["stage"] for e in mine if e["type"] == "run_stage_completed"}
    assert started == completed == set(run.results), (started, completed)
    jobs: dict[str, list[str]] = {}
    for e in mine:
        if e["_subject"].startswith("stratos.evt.job."):
            jobs.setdefault(e["job_id"], []).append(e["type"])
    ran = {v for v in run.jobs.values() if v.startswith(run_id)}  # (other values: agent ids)
    assert ran and ran <= set(jobs), (run.jobs, sorted(jobs))
    for job_id, types in jobs.items():  # each job: started, then exactly one outcome
        assert types[0] == "job_started", (job_id, types)
        assert sum(t in TERMINAL_JOB_EVENTS for t in types) == 1, (job_id, types)
    killed_url = nats_cluster.urls[killed].split("://")[1]
    for name, server in on.items():
        if server == killed_url:  # it failed over to a surviving member
            assert _server_of(procs[name]) not in ("", killed_url), logs()
    print(f"\ncluster node kill ({victim}: {killed_url}; daemon on {on['daemon']}, "
          f"trainer {trainer['agent_id']} on {on[trainer['agent_id']]}): run completed "
          f"{recovery_s:.1f}s after the kill; {len(mine)} run events in the stream "
          f"({sum(len(t) for t in jobs.values())} job events, {len(jobs)} jobs), "
          f"{len(live)} seen live")
