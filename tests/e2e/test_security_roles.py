"""Bus security, the credentials and what each role may do: `stratosctl auth init` output, the
daemon, agents and operator working with their own identities, the operator's limits,
strangers refused, and TLS with the env files as systemd loads them."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import nats
import pytest
import structlog
from nats.js import api as js_api

from schemas import subjects
from schemas.commands import ListServers, RunStep, ServerList
from schemas.telemetry import AgentTelemetry
from stratosd.auth import DAEMON_USER, SERVER_CONFIG
from stratosd.bus import Bus, connect
from stratosd.config import StratosConfig
from stratosd.errors import BusUnavailable, StratosError
from stratosd.natsd import NatsServer
from tests.e2e.secure import (
    OPERATOR,
    Creds,
    auth_init,
    client,
    password_of,
    server_config,
    until,
)

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
    # agents ping the daemon's micro service (a debug figure; user latency needs --probe-url)
    await agents["gpu-1"].measure_latency()
    assert agents["gpu-1"].daemon_rtt_ms is not None


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


async def test_the_operator_sets_an_agents_price(
    creds: Creds, secure_daemon: Any, agents: dict[str, Any]
) -> None:
    from stratosd.auth import AuthSetup
    from stratosd.pricing import RELOAD_S

    fleet = secure_daemon.fleet
    agents["gpu-1"].config.price_usd_per_hour = 0.0  # a rogue agent undercuts everyone
    await until(lambda: fleet.agents["gpu-1"].telemetry.price_usd_per_hour == 0.0)
    prices = AuthSetup(out=creds.out).set_prices({"gpu-1": 2.5})  # beside daemon.password
    try:
        with structlog.testing.capture_logs() as logs:
            await until(lambda: fleet.offer("gpu-1").price_usd_per_hour == 2.5,
                        timeout=RELOAD_S + 10)
            for _ in range(20):  # every heartbeat and offer: still one warning
                assert fleet.offer("gpu-1").price_usd_per_hour == 2.5
            # what the operator and the selectors see
            op = Bus(await connect(creds.config(OPERATOR), "stratosctl"))
            try:
                reply = await op.request(subjects.daemon_cmd("servers"), ListServers())
            finally:
                await op.close()
        by_id = {s.offer.id: s.offer for s in reply.servers}
        assert by_id["gpu-1"].price_usd_per_hour == 2.5
        assert by_id["gpu-2"].price_usd_per_hour == 1.0  # no operator price: its own
        warned = [e for e in logs if e["event"] == "agent_price_overridden"]
        assert len(warned) == 1, warned
        assert warned[0]["agent_id"] == "gpu-1" and warned[0]["declared_usd_per_hour"] == 0.0
        assert warned[0]["price_usd_per_hour"] == 2.5
    finally:
        prices.unlink()


def test_add_agent_records_the_operators_price(tmp_path: Path) -> None:
    from stratosd.ctl import main
    from stratosd.pricing import read_prices

    out = tmp_path / "auth"
    assert auth_init(out, "--price-per-hour", "1.25") == 0
    assert read_prices(out / "agent-prices.json") == {"gpu-1": 1.25, "gpu-2": 1.25}
    assert main(["auth", "add-agent", "--out", str(out), "gpu-3", "--price-per-hour", "2.5"]) == 0
    assert read_prices(out / "agent-prices.json") == {"gpu-1": 1.25, "gpu-2": 1.25,
                                                      "gpu-3": 2.5}
    assert stat.S_IMODE((out / "agent-prices.json").stat().st_mode) == 0o600
    assert main(["auth", "add-agent", "--out", str(out), "gpu-4", "--price-per-hour", "-1"]) == 2


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
    server = NatsServer(tmp_path / "store", port=port, config_file=server_config(out, tmp_path))
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
            await nats.connect(server.url, user=OPERATOR, password=password_of(out, OPERATOR),
                               allow_reconnect=False, connect_timeout=2)
    finally:
        server.stop()
