"""Bad input is refused, never crashes: fuzzed wire messages and job specs, a live daemon and
agent under a few hundred fuzzed commands, oversized messages, and path traversal in artifact
names, job ids and tar members.

Every decoder at the edge either returns a typed message or raises `BadMessage` naming a field;
the job-spec parser raises only `ConfigError` with a field (or the file) and a message.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.stepctx import StepContext
from schemas import subjects
from schemas.base import decode_or_error, encode
from schemas.commands import (
    AGENT_COMMAND_DECODER,
    DAEMON_COMMAND_DECODER,
    REPLY_DECODER,
    ListRuns,
    RunList,
    RunStep,
)
from schemas.errors import ErrorReply
from schemas.events import EVENT_DECODER
from schemas.subjects import artifact_key
from schemas.telemetry import TELEMETRY_DECODER
from stratosd.errors import BadMessage, ConfigError
from stratosd.plugins import Plugins
from stratosd.validate import parse_spec_toml, spec_from_data, validate_spec
from tests.e2e.jobs import tiny_spec

GOLDEN = {p.stem: json.loads(p.read_text())
          for p in sorted((Path(__file__).parent / "golden").glob("*.json"))}
DECODERS = {"event": EVENT_DECODER, "agent_command": AGENT_COMMAND_DECODER,
            "daemon_command": DAEMON_COMMAND_DECODER, "reply": REPLY_DECODER,
            "telemetry": TELEMETRY_DECODER}
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- strategies ----------------------------------------------------------------------------

# JSON-able values; text never holds lone surrogates (no JSON encoder can write those as UTF-8)
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | TEXT
           | st.sampled_from(["", "../../etc/passwd", "train", "0" * 300, "x" * 5000,
                              "2026-11-23T12:00:00Z", "not-a-date", "config:tiny", "-1"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12)


@st.composite
def mutated_golden(draw: st.DrawFn) -> bytes:
    """A golden message with fields replaced, removed or added, or its type swapped."""
    msg = dict(GOLDEN[draw(st.sampled_from(sorted(GOLDEN)))])
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "drop", "add", "retag"]))
        keys = sorted(msg)
        if action == "replace" and keys:
            msg[draw(st.sampled_from(keys))] = draw(JSON)
        elif action == "drop" and keys:
            msg.pop(draw(st.sampled_from(keys)))
        elif action == "add":
            msg[draw(TEXT)] = draw(JSON)
        else:
            msg["type"] = draw(st.sampled_from([*sorted(GOLDEN), "shell", "", 5, None]))
    return json.dumps(msg).encode()


PAYLOADS = (mutated_golden() | JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200)
            | st.sampled_from([b"", b"null", b"{", b"[" * 5000, b'{"type":"run_step"}' * 2,
                               b"\xff\xfe", b'{"type":"job_progress","job_id":"j","done":1e999}',
                               b'{"type":"run_step","job_id":"j","step":"train","args":[]}']))


def _assert_refused_cleanly(exc: BadMessage) -> None:
    assert isinstance(exc.field, str) and exc.field
    assert exc.reason and exc.message and exc.hint


# --- decoders ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DECODERS))
@FUZZ
@given(data=PAYLOADS)
def test_decoders_return_a_message_or_bad_message(kind: str, data: bytes) -> None:
    decoder = DECODERS[kind]
    try:
        msg = decode_or_error(decoder, data)
    except BadMessage as exc:
        _assert_refused_cleanly(exc)
        return
    assert isinstance(msg, msgspec.Struct)
    assert decoder.decode(encode(msg)) == msg  # what was accepted re-encodes to itself


# --- job specs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    """The built-in plugins (validate_spec checks names and task params against them)."""
    return Plugins()


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_spec(draw: st.DrawFn) -> Any:
    """tiny_spec() with one to three nested values replaced, removed or added."""
    spec: Any = json.loads(json.dumps(tiny_spec()))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(spec) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = spec
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(JSON)
        elif action == "drop" and isinstance(parent, dict):
            parent.pop(path[-1])
        elif isinstance(parent, dict):
            parent[draw(TEXT)] = draw(JSON)
    return spec


SPECS = mutated_spec() | JSON


@FUZZ
@given(data=SPECS)
def test_spec_parser_returns_a_spec_or_config_error(data: Any, plugins: Plugins) -> None:
    try:
        spec = spec_from_data(data)
    except ConfigError as exc:
        assert exc.field and exc.message and exc.hint
        return
    try:
        validate_spec(spec, plugins)  # names exist, task params build, no secrets
    except ConfigError as exc:
        assert exc.field and exc.message


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is JSON-escaped text
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}"
                               for k, v in value.items() if v is not None) + "}"
    return '""'


def _to_toml(data: Any) -> str:
    if not isinstance(data, dict):
        return f"value = {_toml_value(data)}\n"
    return "".join(f"{json.dumps(str(k))} = {_toml_value(v)}\n"
                   for k, v in data.items() if v is not None)


TOML_TEXT = (SPECS.map(_to_toml) | TEXT
             | st.sampled_from(["name = ", "[task\n", "a = 1\na = 2\n", 'x = """', "= 1",
                                "seed = 99999999999999999999999999\n",
                                "mode_threshold = nan\n", "when = 1979-05-27T07:32:00Z\n"]))


@FUZZ
@given(text=TOML_TEXT)
def test_job_file_parser_returns_a_spec_or_config_error(text: str, tmp_path_factory:
                                                        pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("toml") / "job.toml"
    path.write_text(text, encoding="utf-8")
    try:
        parse_spec_toml(path)
    except ConfigError as exc:
        assert exc.message and exc.hint
        assert exc.field or str(path) in exc.message


@pytest.mark.parametrize("content", [b'name = "caf\xe9"\n', None], ids=["latin1", "directory"])
def test_unreadable_job_file_is_a_config_error(content: bytes | None, tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="job.toml"):
        parse_spec_toml(path)


def test_spec_with_a_lone_surrogate_is_a_config_error() -> None:
    data = json.loads('{"name": "\\ud800"}')
    with pytest.raises(ConfigError):
        spec_from_data({**tiny_spec(), **data})


# --- path traversal ------------------------------------------------------------------------

TRAVERSAL = ["../../etc/passwd", "..", ".", "/etc/passwd", "a/../../b", "..\\..\\win.ini",
             ".hidden", "", "x/y"]


@pytest.mark.parametrize("name", TRAVERSAL)
def test_artifact_names_cannot_leave_their_run(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        artifact_key("r1", name)
    ctx = StepContext(job_id="j", run_id="r1", step="train", args={}, workdir=tmp_path,
                      inputs={})
    with pytest.raises(ValueError, match="plain file name"):
        ctx.output(name)


@FUZZ
@given(name=st.text(max_size=30))
def test_an_accepted_artifact_name_is_one_path_segment(name: str) -> None:
    try:
        key = artifact_key("r1", name)
    except ValueError:
        return
    root = "/srv/out"
    assert key == f"r1/{name}"
    assert os.path.dirname(os.path.normpath(os.path.join(root, name))) == root


# --- live: a daemon and an agent under fuzzed commands --------------------------------------


def _live_payloads(n: int, seed: int = 7) -> list[tuple[str, bytes]]:
    """(subject, payload) pairs: golden commands mutated, plus junk; never a runnable job."""
    rng = random.Random(seed)
    commands = [t for t in GOLDEN if t in {
        "submit_run", "list_runs", "get_run", "cancel_run", "list_servers", "list_plugins",
        "plan_run", "list_endpoints", "undeploy_endpoint", "get_report", "run_step",
        "cancel_job", "get_job", "undeploy"}]
    junk: list[Any] = [None, 0, -1, 2**70, 1e308, "", "x" * 3000, [], {}, [1, [2, [3]]],
                       {"$gt": ""}, "../../etc/passwd", True, "01jzzzzzzzzzzzzzzzzzzzzzzz"]
    out = []
    for i in range(n):
        verb_daemon = rng.random() < 0.5
        subject = (subjects.daemon_cmd(rng.choice(subjects.DAEMON_VERBS)) if verb_daemon
                   else subjects.agent_cmd("gpu-1", rng.choice(subjects.AGENT_VERBS)))
        if i % 10 == 0:
            out.append((subject, rng.randbytes(rng.randint(0, 64))))
            continue
        msg = dict(GOLDEN[rng.choice(commands)])
        for _ in range(rng.randint(1, 3)):
            action = rng.choice(["replace", "drop", "add", "retag"])
            if action == "replace":
                msg[rng.choice(sorted(msg))] = rng.choice(junk)
            elif action == "drop" and len(msg) > 1:
                msg.pop(rng.choice(sorted(msg)))
            elif action == "add":
                msg[rng.choice(["extra", "args", "cmd", "__class__"])] = rng.choice(junk)
            else:
                msg["type"] = rng.choice([*commands, "shell", "exec", 5, None])
        if msg.get("type") == "run_step" or msg.get("type") == "submit_run":
            # a mutated RunStep/SubmitRun that still decodes would legitimately start work:
            # keep only the ones the decoder refuses (everything else here must do nothing)
            try:
                decoder = AGENT_COMMAND_DECODER if msg["type"] == "run_step" \
                    else DAEMON_COMMAND_DECODER
                decoder.decode(json.dumps(msg).encode())
                msg["step"] = "shell"  # decodes as a command: make it refused
                msg["spec"] = 1
            except (msgspec.ValidationError, msgspec.DecodeError):
                pass
        out.append((subject, json.dumps(msg).encode()))
    return out


async def test_live_daemon_and_agent_refuse_fuzzed_commands(daemon: Any, agent: Any) -> None:
    nc = agent.bus.nc
    counts: dict[str, int] = {}
    payloads = _live_payloads(300)

    async def fire(subject: str, payload: bytes) -> None:
        msg = await nc.request(subject, payload, timeout=10)
        reply = decode_or_error(REPLY_DECODER, msg.data)  # every reply is a valid Reply
        kind = reply.code if isinstance(reply, ErrorReply) else type(reply).__name__
        counts[kind] = counts.get(kind, 0) + 1
        if isinstance(reply, ErrorReply):
            assert reply.message and reply.code != "internal", (subject, payload, reply)

    for start in range(0, len(payloads), 25):  # a few at a time, as many clients would
        await asyncio.gather(*(fire(s, p) for s, p in payloads[start:start + 25]))
    assert sum(counts.values()) == len(payloads)
    assert counts.get("bad_message", 0) + counts.get("unsupported", 0) > len(payloads) // 2
    runs = await daemon.bus.request(subjects.daemon_cmd("runs"), ListRuns())
    assert isinstance(runs, RunList) and runs.runs == []  # still serving; nothing submitted
    assert agent.runner.jobs == {}  # nothing ran on the agent


async def test_oversized_messages_are_refused_and_the_daemon_keeps_serving(
    daemon: Any, nats_url: str,
) -> None:
    nc = daemon.bus.nc
    big = b"x" * (2 * 1024 * 1024)
    assert nc.max_payload < len(big)
    with pytest.raises(nats.errors.MaxPayloadError):
        await nc.request(subjects.daemon_cmd("submit"), big, timeout=5)
    with pytest.raises(nats.errors.MaxPayloadError):
        await daemon.bus.js.publish(subjects.job_event("gpu-1", "j1", "log"), big)
    # a client that ignores the limit: the server answers -ERR and drops only that connection
    host, port = nats_url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readline()  # INFO
    writer.write(b'CONNECT {"verbose":false}\r\n' + f"PUB {subjects.daemon_cmd('runs')} "
                 f"{len(big)}\r\n".encode())
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 10)
    assert b"Maximum Payload" in line
    writer.close()
    reply = await daemon.bus.request(subjects.daemon_cmd("runs"), ListRuns())
    assert isinstance(reply, RunList)


async def _wait_job(agent: Any, job_id: str) -> Any:
    job = agent.runner.jobs[job_id]
    assert job.task is not None
    await asyncio.wait_for(job.task, 30)
    return job


def _files(root: Path, *skip: Path) -> set[Path]:
    """Every path under root, except under skip (the bus's own store, the agent's work dir)."""
    return {p for p in root.rglob("*") if not any(p == s or s in p.parents for s in skip)}


async def test_input_name_traversal_fails_the_job_and_writes_nothing(
    agent: Any, tmp_path: Path,
) -> None:
    work = tmp_path / "agents" / "gpu-1"
    skip = (tmp_path / "nats-store", work)
    outside = _files(tmp_path, *skip)
    step = RunStep(job_id="evil-input", run_id="r1", step="train", args={},
                   inputs={"../../etc/passwd": "r1/dataset.jsonl"})
    await agent.bus.request(subjects.agent_cmd("gpu-1", "run"), step)
    job = await _wait_job(agent, "evil-input")
    assert job.state == "failed"
    assert "../../etc/passwd" in job.error and "plain file name" in job.error
    assert _files(tmp_path, *skip) == outside
    assert not list(tmp_path.rglob("passwd"))


def _evil_tar(members: dict[str, bytes], link: tuple[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            tar.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
async def test_tar_input_escaping_its_dir_is_refused(agent: Any, tmp_path: Path,
                                                     kind: str) -> None:
    target = tmp_path / "escaped.txt"
    tars = {"dotdot": _evil_tar({"ok.txt": b"fine", "../../../../../escaped.txt": b"pwned"}),
            "absolute": _evil_tar({str(target): b"pwned"}),
            "symlink": _evil_tar({}, link=("model", str(tmp_path)))}
    obs = await agent.bus.objects()
    await obs.put("r1/model.tar", tars[kind])
    job_id = f"evil-tar-{kind}"
    step = RunStep(job_id=job_id, run_id="r1", step="evaluate", args={},
                   inputs={"model": "r1/model.tar"})
    await agent.bus.request(subjects.agent_cmd("gpu-1", "run"), step)
    job = await _wait_job(agent, job_id)
    assert job.state == "failed"
    refused = {"dotdot": "outside the destination", "symlink": "link to an absolute path",
               "absolute": ""}[kind]  # tarfile's data filter names what it refused
    assert refused in job.error
    assert not target.exists()
    # an absolute member is re-rooted under the input dir; nothing lands anywhere else
    inputs = tmp_path / "agents" / "gpu-1" / "jobs" / job_id / "inputs"
    assert all(inputs in p.parents for p in tmp_path.rglob("escaped.txt"))


async def test_job_id_traversal_is_refused(agent: Any, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    # the agent's work dir is tmp_path/agents/gpu-1, jobs under its jobs/ folder (present
    # once the agent has run any job)
    (tmp_path / "agents" / "gpu-1" / "jobs").mkdir(parents=True, exist_ok=True)
    step = RunStep(job_id="../../../victim", run_id="r1", step="probe", args={})
    try:
        await agent.bus.request(subjects.agent_cmd("gpu-1", "run"), step)
    except Exception:  # noqa: BLE001 - a refusal is what we want
        pass
    job = agent.runner.jobs.get("../../../victim")
    if job is not None and job.task is not None:
        await asyncio.wait([job.task], timeout=30)
    assert (victim / "precious.txt").exists()
    assert job is None
