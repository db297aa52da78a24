"""Secrets never reach a log or the bus: redaction in every logger, and a teacher API key that
a hostile endpoint echoes back stays masked in job logs, events and the agent's files."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
from nats.js import api as js_api

from schemas import subjects
from stratosd.bus import Bus, connect
from tests.e2e.secure import OPERATOR, Creds, until

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
                                          "api_key_env": "STRATOS_TEST_TEACHER_KEY",
                                          "price_in_per_mtok": 1.0,
                                          "price_out_per_mtok": 2.0}}],
                    students=[{"model": "config:tiny"}], deploy=False)
                reply = await op.request(subjects.daemon_cmd("submit"), SubmitRun(spec=spec))
                assert isinstance(reply, Accepted)
                run_id = reply.ref
                # the probe job ran on an agent and called the teacher with the key
                await until(lambda: any(j.startswith(run_id) and "probe" in j
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
