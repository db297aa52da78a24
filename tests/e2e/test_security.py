"""Bus security against a real nats-server run with the config `stratosctl auth init` writes.

Each role can do its job and nothing else: agents cannot command, impersonate or eavesdrop on
other agents, the operator cannot command agents, strangers cannot connect, secrets never
reach a log or the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import structlog
from nats.js import api as js_api

from schemas import subjects
from schemas.base import encode
from schemas.commands import ListServers, RunStep, ServerList
from schemas.events import JobCompleted
from schemas.telemetry import AgentTelemetry
from stratosd.auth import DAEMON_USER, SERVER_CONFIG, agent_user
from stratosd.bus import Bus, connect
from stratosd.config import DaemonConfig, StratosConfig
from stratosd.errors import BusUnavailable, StratosError
from stratosd.natsd import NatsServer
from tests.conftest import running_daemon, start_agent

OPERATOR = "alice"


class Creds:
    """The directory auth init wrote, and configs for each identity."""

    def __init__(self, out: Path, url: str = "") -> None:
        self.out = out
        self.url = url

    def password(self, user: str) -> str:
        """The plain password of user."""
        return (self.out / f"{user}.password").read_text().strip()

    def config(self, user: str, **kw: Any) -> StratosConfig:
        """A client config logging in as user (password from its 0600 file)."""
        return StratosConfig(nats_url=self.url, nats_user=user,
                             nats_password_file=str(self.out / f"{user}.password"), **kw)

    def agent_kw(self, agent_id: str) -> dict[str, Any]:
        """Extra AgentConfig fields for start_agent."""
        user = agent_user(agent_id)
        return {"nats_user": user, "nats_password_file": str(self.out / f"{user}.password")}


def auth_init(out: Path, *extra: str) -> int:
    """Run `stratosctl auth init` in-process."""
    from stratosd.ctl import main

    return main(["auth", "init", "--out", str(out), "--agents", "gpu-1,gpu-2",
                 "--operator", OPERATOR, *extra])


@pytest.fixture(scope="module")
def auth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated config for the module (bcrypt hashing takes a moment per user)."""
    out = tmp_path_factory.mktemp("auth") / "etc-stratos"
    assert auth_init(out) == 0
    return out


@pytest.fixture
def creds(auth_dir: Path, tmp_path: Path) -> Iterator[Creds]:
    """A nats-server with the generated config, per test.

    NatsServer passes -a/-p/-js/-sd after -c; nats-server refuses a store_dir given twice, so
    the test copy leaves the store dir to the flag (everything else is the generated file).
    """
    conf = tmp_path / SERVER_CONFIG
    text = (auth_dir / SERVER_CONFIG).read_text()
    conf.write_text(re.sub(r"(?m)^jetstream \{.*\}$", "jetstream: enabled", text, count=1))
    server = NatsServer(tmp_path / "nats-store", port=-1, config_file=conf)
    server.start()
    try:
        yield Creds(auth_dir, server.url)
    finally:
        server.stop()


@pytest.fixture
async def secure_daemon(creds: Creds, tmp_path: Path) -> AsyncIterator[Any]:
    """An in-process daemon logged in as `daemon`."""
    cfg = DaemonConfig(nats_url=creds.url, nats_user=DAEMON_USER,
                       nats_password_file=str(creds.out / f"{DAEMON_USER}.password"),
                       home=str(tmp_path / "home"), liveness_check_s=0.5, missed_heartbeats=10,
                       kv_flush_s=0.5)
    async with running_daemon(cfg) as d:
        yield d


@pytest.fixture
async def agents(creds: Creds, tmp_path: Path, secure_daemon: Any) -> AsyncIterator[Any]:
    """Agents gpu-1 and gpu-2, each with its own credentials, registered with the daemon."""
    started = [await start_agent(creds.url, tmp_path, a, **creds.agent_kw(a))
               for a in ("gpu-1", "gpu-2")]
    await _until(lambda: all(secure_daemon.fleet.is_up(a) for a in ("gpu-1", "gpu-2")))
    try:
        yield {a.agent_id: a for a, _ in started}
    finally:
        for a, task in started:
            a.stop()
            await asyncio.wait_for(task, 30)


class Client:
    """A raw connection as one identity that records the server's permission errors."""

    def __init__(self, bus: Bus, errors: list[str]) -> None:
        self.bus = bus
        self.errors = errors

    async def violation(self, text: str) -> None:
        """Wait until the server reported a permissions violation mentioning text."""
        try:
            await self._violation(text)
        except TimeoutError:
            raise AssertionError(f"no violation for {text!r} in {self.errors}") from None

    async def _violation(self, text: str) -> None:
        await _until(lambda: any("permissions violation" in e.lower() and text.lower() in e.lower()
                                 for e in self.errors))


async def client(creds: Creds, user: str) -> Client:
    """Connect as user, collecting async errors (how nats reports denied publish/subscribe)."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(creds.url, user=user, password=creds.password(user),
                            error_cb=on_error, max_reconnect_attempts=0)
    return Client(Bus(nc), errors)


async def _until(pred: Any, timeout: float = 10.0) -> None:
    async def loop() -> None:
        while not pred():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(loop(), timeout)


# --- the generator ------------------------------------------------------------------------


def test_init_writes_private_files_and_hashed_passwords(tmp_path: Path) -> None:
    out = tmp_path / "auth"
    assert auth_init(out, "--install-dir", "/etc/stratos") == 0
    conf = (out / SERVER_CONFIG).read_text()
    names = {p.name for p in out.iterdir()}
    for user in (DAEMON_USER, OPERATOR, "agent-gpu-1", "agent-gpu-2"):
        assert {f"{user}.env", f"{user}.password"} <= names
        password = (out / f"{user}.password").read_text().strip()
        assert len(password) >= 40
        assert password not in conf  # only bcrypt hashes reach the server config
        env = (out / f"{user}.env").read_text()
        assert password not in env
        assert f"STRATOS_NATS_USER={user}\n" in env
        assert f"STRATOS_NATS_PASSWORD_FILE=/etc/stratos/{user}.password\n" in env
    assert conf.count('password: "$2') == 4
    assert "STRATOS_AGENT_ID=gpu-2" in (out / "agent-gpu-2.env").read_text()
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def test_init_refuses_to_overwrite_without_force(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "auth"
    assert auth_init(out) == 0
    before = (out / "daemon.password").read_text()
    assert auth_init(out) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "daemon.password").read_text() == before
    assert auth_init(out, "--force") == 0
    assert (out / "daemon.password").read_text() != before


def test_add_agent_keeps_the_other_credentials(tmp_path: Path) -> None:
    from stratosd.ctl import main

    out = tmp_path / "auth"
    assert auth_init(out) == 0
    before = (out / SERVER_CONFIG).read_text()
    assert main(["auth", "add-agent", "--out", str(out), "gpu-3"]) == 0
    after = (out / SERVER_CONFIG).read_text()
    assert after.startswith(before.rsplit("\n  ]\n}", 1)[0])
    assert '"stratos.tlm.gpu-3"' in after and '"stratos.cmd.agent.gpu-3.>"' in after
    assert (out / "agent-gpu-3.env").read_text().count("gpu-3") >= 2
    assert main(["auth", "add-agent", "--out", str(out), "gpu-3"]) == 2  # already there
    assert main(["auth", "add-agent", "--out", str(out), "Bad Id"]) == 2


# --- roles that work ----------------------------------------------------------------------


async def test_daemon_agents_and_operator_work_with_their_credentials(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any]
) -> None:
    # the operator lists servers through the daemon
    op = Bus(await connect(creds.config(OPERATOR), "stratosctl"))
    try:
        reply = await op.request(subjects.daemon_cmd("servers"), ListServers())
        assert isinstance(reply, ServerList)
        assert {s.offer.id for s in reply.servers} == {"gpu-1", "gpu-2"}
        # ... and replays events the way `stratosctl watch` does (ordered consumer)
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def cb(msg: Any) -> None:
            await got.put(msg.subject)

        sub = await op.js.subscribe(subjects.ALL_AGENT_EVENTS, ordered_consumer=True,
                                    deliver_policy=js_api.DeliverPolicy.ALL, cb=cb,
                                    stream=subjects.EVENTS_STREAM)
        assert (await asyncio.wait_for(got.get(), 10)).startswith("stratos.evt.agent.")
        await sub.unsubscribe()
    finally:
        await op.close()
    # agents measured their latency with a ping to the daemon's micro service
    await agents["gpu-1"].measure_latency()
    assert agents["gpu-1"].latency_ms is not None


async def test_agent_runs_a_job_and_uses_the_artifact_store(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any], tmp_path: Path
) -> None:
    d = secure_daemon
    # a job whose input is missing: command in, JetStream job event out, outcome resolved
    step = RunStep(job_id="sec-job-1", run_id="r1", step="train", args={},
                   inputs={"dataset": "r1/missing.jsonl"})
    await d.dispatch.send("gpu-1", step)
    outcome = await d.dispatch.wait("sec-job-1", timeout=20)
    assert outcome.state == "failed" and "missing.jsonl" in outcome.error.message
    # the artifact store with the agent's own rights: put, overwrite (purges), info, get
    bus = agents["gpu-1"].bus
    src = tmp_path / "a.bin"
    for payload in (b"first", b"second" * 50_000):
        src.write_bytes(payload)
        await bus.put_artifact("r1/a.bin", src)
    assert await bus.has_artifact("r1/a.bin")
    back = await bus.get_artifact("r1/a.bin", tmp_path / "back.bin")
    assert back.read_bytes() == b"second" * 50_000


# --- what agents must not do ---------------------------------------------------------------


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
        await _until(lambda: fleet.agents["gpu-2"].telemetry.region == "sentinel")
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
        await _until(lambda: fleet.agents["gpu-2"].telemetry.region == "sentinel")
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
    await _until(lambda: "own-1" in d.dispatch.outcomes)  # handled in order, after the forgery
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


# --- the operator, strangers ----------------------------------------------------------------


async def test_operator_cannot_command_agents_or_publish_telemetry(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any]
) -> None:
    op = await client(creds, OPERATOR)
    try:
        with pytest.raises(StratosError):
            await op.bus.request(subjects.agent_cmd("gpu-1", "run"),
                                 RunStep(job_id="op-1", run_id="r1", step="train"), timeout=1)
        await op.violation("stratos.cmd.agent.gpu-1.run")
        await op.bus.publish(subjects.telemetry("op-box"), AgentTelemetry(agent_id="op-box"))
        await op.violation("stratos.tlm.op-box")
        await op.bus.nc.publish(subjects.job_event("gpu-1", "j1", "completed"),
                                json.dumps({"type": "job_completed"}).encode())
        await op.violation("stratos.evt.job.gpu-1.j1.completed")
    finally:
        await op.bus.close()
    assert agents["gpu-1"].runner.jobs == {}
    assert "op-box" not in secure_daemon.fleet.agents


@pytest.mark.parametrize("user,password", [(None, None), ("daemon", "wrong"),
                                           ("nobody", "x" * 43)])
async def test_no_or_wrong_credentials_cannot_connect(
    creds: Creds, user: str | None, password: str | None, tmp_path: Path
) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text(password or "")
    cfg = StratosConfig(nats_url=creds.url, nats_user=user,
                        nats_password_file=str(pw_file) if user else None,
                        connect_timeout_s=2)
    with structlog.testing.capture_logs() as logs, pytest.raises(BusUnavailable) as info:
        await asyncio.wait_for(connect(cfg, "stranger"), 20)
    assert creds.url in info.value.message
    # the server's reason reaches the log (bus.connect could fold it into the message)
    errors = [e["error"].lower() for e in logs if e["event"] == "nats_error"]
    assert any("authorization violation" in e for e in errors), logs


# --- secrets in logs ------------------------------------------------------------------------

FAKE_KEY = "sk-stratos-test-3f9a1c0d2b7e4a6f8c1d"


def test_redact_secrets_masks_secret_keys_and_values() -> None:
    from stratosd.logging import REDACTED, redact_secrets

    out = redact_secrets(None, "info", {
        "event": "x", "api_key": "abc", "nats_password": "hunter2", "token": "t",
        "authorization": "Basic Zm9v", "message": f"calling with {FAKE_KEY}",
        "header": "Bearer abcdefghijklmnop", "count": 3, "password": None})
    assert out["api_key"] == out["nats_password"] == out["token"] == REDACTED
    assert out["authorization"] == REDACTED
    assert FAKE_KEY not in out["message"] and REDACTED in out["message"]
    assert "abcdefghijklmnop" not in out["header"]
    assert out["count"] == 3 and out["password"] is None
    # and through the real pipeline: structlog and a stdlib logger (nats, httpx) alike, in a
    # child process (configure_logging caches loggers process-wide)
    code = (
        "import logging, structlog, sys\n"
        "from stratosd.logging import configure_logging\n"
        "configure_logging('debug', 'json', stream=sys.stdout)\n"
        "key = sys.argv[1]\n"
        "structlog.stdlib.get_logger('t').info('teacher_called', api_key=key,\n"
        "                                      url='https://x/?key=' + key)\n"
        "logging.getLogger('t.stdlib').warning('retrying with %s', key)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, FAKE_KEY], capture_output=True,
                          text=True, timeout=30, cwd=Path(__file__).resolve().parents[2],
                          check=True)
    text = proc.stdout + proc.stderr
    assert "teacher_called" in text and "retrying" in text
    assert FAKE_KEY not in text


class EchoingTeacherServer:
    """A hostile OpenAI-compatible endpoint: rejects every call, echoing the bearer key back."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = 0
        for line in head.split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "authorization":
                self.keys.append(value.strip().removeprefix("Bearer "))
            if name.lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        body = json.dumps({"error": {"message": f"invalid key {self.keys[-1:]} "
                                                f"(header was {head!r})"}}).encode()
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> EchoingTeacherServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def _all_events(bus: Bus) -> list[bytes]:
    """Every message in the events stream, headers included, as raw bytes."""
    info = await bus.js.stream_info(subjects.EVENTS_STREAM)
    out: list[bytes] = []
    sub = await bus.js.subscribe("stratos.evt.>", ordered_consumer=True,
                                 deliver_policy=js_api.DeliverPolicy.ALL,
                                 stream=subjects.EVENTS_STREAM)
    try:
        while len(out) < info.state.messages:
            msg = await sub.next_msg(timeout=5)
            out.append(msg.subject.encode() + json.dumps(msg.headers or {}).encode() + msg.data)
    finally:
        await sub.unsubscribe()
    return out


async def test_api_key_never_reaches_a_log_or_the_bus(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from schemas.commands import Accepted, SubmitRun
    from schemas.specs import RunSpec

    d = secure_daemon
    # only ever in the environment (the agent's job child inherits it when it is spawned)
    monkeypatch.setenv("STRATOS_TEST_TEACHER_KEY", FAKE_KEY)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n"
                            for i in range(12)))
    op = Bus(await connect(creds.config(OPERATOR), "stratosctl"))
    try:
        with structlog.testing.capture_logs() as logs:
            async with EchoingTeacherServer() as teacher:
                spec = RunSpec(
                    name="secret-check",
                    task={"name": "jsonl-qa", "params": {"path": str(data)}, "probe_size": 3},
                    teachers=[{"backend": "openai", "model": "gpt-test",
                               "params": {"base_url": teacher.url, "max_retries": 0,
                                          "api_key_env": "STRATOS_TEST_TEACHER_KEY"}}],
                    students=[{"model": "config:tiny"}], deploy=False)
                reply = await op.request(subjects.daemon_cmd("submit"), SubmitRun(spec=spec))
                assert isinstance(reply, Accepted)
                run_id = reply.ref
                # the probe job ran on an agent and called the teacher with the key
                await _until(lambda: any(j.startswith(run_id) and "probe" in j
                                         for j in d.dispatch.outcomes), timeout=60)
                assert FAKE_KEY in teacher.keys
        events = await _all_events(d.bus)
    finally:
        await op.close()
    workdir_files = [p.read_bytes() for p in (tmp_path / "agents").rglob("*") if p.is_file()]
    assert any(e["event"] == "job_dispatched" for e in logs)
    assert workdir_files
    # the teacher's echo of the key did travel (job log, probe result), with the key masked
    assert any(b"invalid key" in e for e in events)
    leaks = [str(e) for e in logs if FAKE_KEY in str(e)]
    leaks += [e.decode(errors="replace") for e in events if FAKE_KEY.encode() in e]
    leaks += ["agent work dir file" for f in workdir_files if FAKE_KEY.encode() in f]
    assert leaks == []


# --- TLS, and the env files as systemd would load them ---------------------------------------


def _make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "2", "-subj", "/CN=stratos-test-ca")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_tls_bus_with_the_generated_env_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stratosd.config import load_config
    from tests.conftest import free_port

    ca, cert, key = _make_certs(tmp_path)
    port = free_port()
    out = tmp_path / "auth"
    assert auth_init(out, "--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key),
                     "--tls-ca", str(ca)) == 0
    conf = tmp_path / SERVER_CONFIG
    conf.write_text(re.sub(r"(?m)^jetstream \{.*\}$", "jetstream: enabled",
                           (out / SERVER_CONFIG).read_text()))
    server = NatsServer(tmp_path / "store", port=port, config_file=conf)
    server.start()
    try:
        # exactly what systemd's EnvironmentFile= would put in the operator's environment
        for line in (out / f"{OPERATOR}.env").read_text().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.partition("=")
                monkeypatch.setenv(name, value)
        cfg = load_config(StratosConfig)
        assert cfg.resolved_nats_url() == f"tls://127.0.0.1:{port}"
        nc = await connect(cfg, "stratosctl")
        assert nc.is_connected and nc.client_id is not None
        await nc.close()
        # a client that does not trust the CA never gets to send its password
        with pytest.raises(Exception):  # noqa: B017 - ssl error or "no servers"
            await nats.connect(server.url, user=OPERATOR, password=creds_pw(out, OPERATOR),
                               allow_reconnect=False, connect_timeout=2)
    finally:
        server.stop()


def creds_pw(out: Path, user: str) -> str:
    """A password from an auth init directory."""
    return (out / f"{user}.password").read_text().strip()
