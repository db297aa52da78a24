"""External artifact stores: the agent's outputs go there and the bus carries references.

s3:// runs against moto's S3-compatible HTTP server on loopback (the `s3` and `dev` extras);
file:// against a directory standing in for a shared mount.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from schemas import subjects
from schemas.artifacts import ArtifactRef
from schemas.commands import RunStep
from stratosd.artifacts import ArtifactCorrupt, TransferInterrupted
from stratosd.artifacts.chunked import TransferStats, upload
from stratosd.artifacts.filestore import FileStore
from stratosd.bus import Bus, connect
from stratosd.config import AgentConfig, DaemonConfig, StratosConfig, load_config
from tests.conftest import ROOT, start_agent
from tests.daemon.test_artifacts import MiB, sha256_of, uploaded, write_distinct

_RUNNING = re.compile(r"Running on (http://127\.0\.0\.1:\d+)")


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3-compatible server on a free loopback port, with a bucket `stratos-test`."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto")
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    proc = subprocess.Popen(  # noqa: S603 - fixed argv
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if (m := _RUNNING.search(line)) and not found:
                found.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    try:
        assert ready.wait(30) and found, "moto server did not start"
        import boto3

        boto3.client("s3", endpoint_url=found[0]).create_bucket(Bucket="stratos-test")
        yield found[0]
    finally:
        proc.terminate()
        proc.wait(10)


def s3_keys(endpoint: str) -> set[str]:
    """Every object key in the test bucket."""
    import boto3

    resp = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="stratos-test")
    return {o["Key"] for o in resp.get("Contents", [])}


async def open_bus(url: str, **config: Any) -> Bus:
    """A Bus on its own connection with the given artifact settings."""
    cfg = StratosConfig(nats_url=url, **config)
    bus = Bus(await connect(cfg, "test-store"), cfg)
    await bus.ensure_streams()
    return bus


async def test_s3_round_trip_resume_checksum_and_delete(
    nats_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    import boto3

    uri = f"s3://stratos-test/fleet?endpoint_url={s3_endpoint}"
    writer = await open_bus(nats_url, artifact_store=uri)
    writer.artifacts.chunk_bytes = MiB
    reader = await open_bus(nats_url)  # no store configured: the reference says where
    try:
        src = write_distinct(tmp_path / "model.bin", 5 * MiB + 3)
        await writer.put_artifact("r1/model.bin", src)
        found = await (await reader._artifact_bus_store()).lookup("r1/model.bin")
        assert found is not None
        assert found[1] == ArtifactRef(store=uri, key="r1/model.bin",
                                       size=src.stat().st_size, sha256=sha256_of(src))
        keys = s3_keys(s3_endpoint)
        assert "fleet/r1/model.bin" in keys and len(keys) == 7  # manifest + 6 chunks
        back = await reader.get_artifact("r1/model.bin", tmp_path / "out" / "model.bin")
        assert sha256_of(back) == sha256_of(src)

        # an upload that stored only some chunks and no manifest: the rerun sends the rest
        s3 = boto3.client("s3", endpoint_url=s3_endpoint)
        chunks = sorted(k for k in keys if ".chunks/" in k)
        for key in [*chunks[:2], "fleet/r1/model.bin"]:
            s3.delete_object(Bucket="stratos-test", Key=key)
        with structlog.testing.capture_logs() as logs:
            await writer.put_artifact("r1/model.bin", src)
        assert (uploaded(logs)["chunks_sent"], uploaded(logs)["chunks_skipped"]) == (2, 4)

        # bit rot under unchanged metadata: the download's sha256 check catches it
        head = s3.head_object(Bucket="stratos-test", Key=chunks[3])
        s3.put_object(Bucket="stratos-test", Key=chunks[3], Body=b"\0" * head["ContentLength"],
                      Metadata=head["Metadata"])
        with pytest.raises(ArtifactCorrupt):
            await reader.get_artifact("r1/model.bin", tmp_path / "out" / "again.bin")

        await reader.delete_artifact("r1/model.bin")
        assert s3_keys(s3_endpoint) == set()
        assert not await reader.has_artifact("r1/model.bin")
    finally:
        await writer.close()
        await reader.close()


async def test_s3_unreachable_is_a_resumable_interruption(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from tests.conftest import free_port

    uri = f"s3://stratos-test/x?endpoint_url=http://127.0.0.1:{free_port()}"
    bus = await open_bus(nats_url, artifact_store=uri)
    bus.artifacts.retries = 1
    try:
        src = write_distinct(tmp_path / "a.bin", MiB)
        with pytest.raises(TransferInterrupted) as info:
            await bus.put_artifact("r1/a.bin", src)
        assert "resumes where it stopped" in info.value.hint
    finally:
        await bus.close()


async def test_s3_transfers_keep_memory_below_a_chunk(
    nats_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    from tests.daemon.test_artifacts import RssPeak

    uri = f"s3://stratos-test/big?endpoint_url={s3_endpoint}"
    bus = await open_bus(nats_url, artifact_store=uri)  # 64-MiB chunks, one PUT each
    try:
        src = write_distinct(tmp_path / "model.bin", 128 * MiB)
        with RssPeak() as rss:
            await bus.put_artifact("r1/model.bin", src)
            back = await bus.get_artifact("r1/model.bin", tmp_path / "out" / "model.bin")
        assert sha256_of(back) == sha256_of(src)
        assert rss.growth < 48 * MiB, f"RSS grew by {rss.growth / MiB:.0f} MiB"
    finally:
        await bus.close()


def test_s3_without_boto3_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from stratosd.artifacts import open_store
    from stratosd.errors import MissingDependency

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "boto3" else real(name, *a))
    with pytest.raises(MissingDependency) as info:
        open_store("s3://bucket/prefix")
    assert "stratos[s3]" in info.value.hint


# --- the agent ---------------------------------------------------------------------------------


async def test_an_agent_identity_may_move_chunked_artifacts(tmp_path: Path) -> None:
    """On a secured bus an agent uses its own bucket (private artifacts): chunked uploads,
    skips, the download's push consumer and deletes are all allowed there."""
    from stratosd.artifacts.private import AgentBuckets, agent_artifacts
    from stratosd.auth import DAEMON_USER, agent_user
    from stratosd.natsd import NatsServer
    from tests.e2e.secure import Creds, auth_init, server_config

    out = tmp_path / "auth"
    assert auth_init(out) == 0
    server = NatsServer(tmp_path / "store", config_file=server_config(out, tmp_path))
    server.start()
    creds = Creds(out, server.url)
    daemon = Bus(await connect(creds.config(DAEMON_USER), "stratosd"))
    await daemon.ensure_streams()
    own = AgentBuckets(daemon).of("gpu-1")  # the daemon creates the agent's bucket
    await own.store()
    agent = Bus(await connect(creds.config(agent_user("gpu-1")), "stratos-agent-gpu-1"))
    agent.artifacts = agent_artifacts(agent, "gpu-1")
    agent.artifacts.bus_chunk_bytes = MiB
    agent.artifacts.retries = 0  # a denied subject would time out: fail at once instead
    try:
        src = write_distinct(tmp_path / "ckpt.bin", 3 * MiB + 9)
        await agent.put_artifact("r1/ckpt.bin", src)  # chunks, manifest, info lookups
        with structlog.testing.capture_logs() as logs:
            await agent.put_artifact("r1/ckpt.bin", src)
        assert uploaded(logs)["chunks_skipped"] == 4
        # the push consumer the download uses is allowed to the agent; the daemon reads too
        for arts in (agent.artifacts, own.artifacts):
            back = await arts.get("r1/ckpt.bin", tmp_path / "out" / "ckpt.bin")
            assert sha256_of(back) == sha256_of(src)
        await agent.delete_artifact("r1/ckpt.bin")
        assert not await own.artifacts.exists("r1/ckpt.bin")
    finally:
        await agent.close()
        await daemon.close()
        server.stop()


def _model_dir(path: Path) -> Path:
    path.mkdir()
    write_distinct(path / "weights.bin", 3 * MiB)
    (path / "config.json").write_text('{"arch": "tiny"}')
    return path


@pytest.mark.timeout(120)
async def test_agent_outputs_go_to_the_store_and_its_inputs_come_from_references(
    daemon: Any, nats_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    agent, task = await start_agent(nats_url, tmp_path, "gpu-1", artifact_store=root.as_uri(),
                                    artifact_store_min_bytes=MiB)
    try:
        assert agent.bus.artifacts.store_uri == root.as_uri()
        # a step's directory output: tarred, written to the store, a reference on the bus
        key = await agent.runner._upload("r1", _model_dir(tmp_path / "model"), "model")
        assert key == "r1/model.tar"
        found = await (await daemon.bus._artifact_bus_store()).lookup(key)
        assert found is not None and isinstance(found[1], ArtifactRef)
        assert found[1].store == root.as_uri() and (root / "r1" / "model.tar").exists()
        # the daemon (no store configured) reads it through the reference
        tar = await daemon.bus.get_artifact(key, tmp_path / "daemon" / "model.tar")
        with tarfile.open(tar) as tf:
            assert {"./weights.bin", "./config.json"} <= set(tf.getnames())

        # a job whose input is that reference: the agent fetches and unpacks it (the step
        # itself then fails on this toy model, which is not what is tested here)
        step = RunStep(job_id="ref-input-1", run_id="r1", step="evaluate", args={},
                       inputs={"model": key})
        await daemon.bus.request(subjects.agent_cmd("gpu-1", "run"), step)
        model = tmp_path / "agents" / "gpu-1" / "jobs" / "ref-input-1" / "inputs" / "model"
        for _ in range(600):
            if (model / "weights.bin").exists() or agent.runner.jobs["ref-input-1"].state in (
                    "failed", "completed"):
                break
            await asyncio.sleep(0.05)
        assert sha256_of(model / "weights.bin") == sha256_of(tmp_path / "model" / "weights.bin")
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)


_KILLED_UPLOAD = """
import asyncio, os, signal, sys
from pathlib import Path
from stratosd.artifacts.base import RangeReader
from stratosd.artifacts.chunked import TransferStats, upload
from stratosd.artifacts.filestore import FileStore

store = FileStore(Path(sys.argv[1]))
readinto = RangeReader.readinto
calls = []

def dying_readinto(self, buf):
    calls.append(1)  # 1-MiB reads, five per 4-MiB chunk (the last one finds its end)
    if len(calls) > 3 * 5 + 2:  # two MiB into the fourth chunk: the host dies
        os.kill(os.getpid(), signal.SIGKILL)
    return readinto(self, buf)

RangeReader.readinto = dying_readinto
asyncio.run(upload(store, "r1/ckpt.bin", Path(sys.argv[2]), chunk_bytes=4 * 1024**2,
                   stats=TransferStats()))
"""


def test_file_store_upload_killed_mid_chunk_resumes(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    src = write_distinct(tmp_path / "ckpt.bin", 10 * 4 * MiB)
    proc = subprocess.run([sys.executable, "-c", _KILLED_UPLOAD, str(root), str(src)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    chunk_dir = root / "r1" / "ckpt.bin.chunks"
    assert len([p for p in chunk_dir.iterdir() if not p.name.startswith(".")]) == 3
    assert any(p.name.endswith(".tmp") for p in chunk_dir.iterdir())  # the torn 4th chunk
    assert not (root / "r1" / "ckpt.bin").exists()  # no manifest: nothing half-visible

    store = FileStore(root)
    stats = TransferStats()
    manifest = asyncio.run(upload(store, "r1/ckpt.bin", src, chunk_bytes=4 * MiB, stats=stats))
    assert (stats.chunks_skipped, stats.chunks_sent, stats.bytes_sent) == (3, 7, 7 * 4 * MiB)
    assert manifest.sha256 == sha256_of(src)
    names = {p.name for p in chunk_dir.iterdir() if not p.name.startswith(".")}
    assert names == {c.sha256 for c in manifest.chunks}


def test_artifact_store_options_from_env_and_flags(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STRATOS_ARTIFACT_STORE", "s3://bucket/prefix")
    monkeypatch.setenv("STRATOS_ARTIFACT_STORE_MIN_BYTES", "1048576")
    for cls in (AgentConfig, DaemonConfig):
        cfg = load_config(cls)
        assert (cfg.artifact_store, cfg.artifact_store_min_bytes) == ("s3://bucket/prefix", MiB)
    assert load_config(AgentConfig, overrides={"artifact_store": "file:///x"}).artifact_store \
        == "file:///x"

    from agents.__main__ import main as agent_main
    from stratosd.__main__ import main as daemon_main

    for main in (agent_main, daemon_main):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out
        assert "--artifact-store URI" in out and "--artifact-store-min-bytes N" in out
    assert os.environ["STRATOS_ARTIFACT_STORE"]  # untouched by parsing
