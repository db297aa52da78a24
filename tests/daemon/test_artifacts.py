"""Artifacts of any size through the bus and a file:// store: chunked, resumable, checksummed.

Everything runs against a real nats-server; a broken connection is the server going away
mid-transfer (and coming back on the same port and store dir).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import structlog

from schemas.artifacts import ArtifactManifest, ArtifactRef, chunk_key
from stratosd.artifacts import ArtifactCorrupt, TransferInterrupted
from stratosd.bus import Bus, connect
from stratosd.config import StratosConfig
from stratosd.errors import ConfigError, NotFound
from stratosd.natsd import NatsServer

MiB = 1024**2
GiB = 1024**3


def write_distinct(path: Path, size: int) -> Path:
    """size bytes in which every MiB differs (no two chunks alike), written block by block."""
    base = os.urandom(MiB)
    with path.open("wb") as fh:
        for i in range(0, size, MiB):
            block = i.to_bytes(8, "little") + base[8:]
            fh.write(block[:min(MiB, size - i)])
    return path


def sha256_of(path: Path) -> str:
    """sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(MiB):
            h.update(block)
    return h.hexdigest()


async def open_bus(url: str, **config: Any) -> Bus:
    """A Bus on its own connection (like a separate process), streams ensured."""
    cfg = StratosConfig(nats_url=url, **config)
    bus = Bus(await connect(cfg, "test-artifacts"), cfg)
    await bus.ensure_streams()
    return bus


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    """A Bus whose artifacts are chunked at 1 MiB (so small files have many chunks)."""
    b = await open_bus(nats_url)
    b.artifacts.bus_chunk_bytes = MiB
    try:
        yield b
    finally:
        await b.close()


def uploaded(logs: list[dict[str, Any]], event: str = "artifact_uploaded") -> dict[str, Any]:
    """The last transfer summary line of that kind."""
    return [e for e in logs if e["event"] == event][-1]


async def chunk_objects(bus: Bus, key: str) -> set[str]:
    """Names of the live chunk objects of key in the bus object store."""
    obs = await bus.objects()
    entries = await obs.list(ignore_deletes=True)
    return {e.name for e in entries if e.name.startswith(f"{key}.chunks/")}


class RssPeak:
    """The process's RSS before, at its peak while the block runs (sampled), and after."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.before = self.peak = self.after = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> RssPeak:
        self.before = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self.proc.memory_info().rss
        self.peak = max(self.peak, self.after)

    @property
    def growth(self) -> int:
        """Peak minus before, in bytes."""
        return self.peak - self.before


# --- round trips, layout ----------------------------------------------------------------------


async def test_plain_and_chunked_round_trips_and_a_resend_skips_everything(
    bus: Bus, tmp_path: Path
) -> None:
    small = tmp_path / "small.txt"
    small.write_bytes(b"hello")
    assert await bus.put_artifact("r1/small.txt", small) == "r1/small.txt"
    back = await bus.get_artifact("r1/small.txt", tmp_path / "out" / "small.txt")
    assert back.read_bytes() == b"hello"
    store = await bus._artifact_bus_store()
    found = await store.lookup("r1/small.txt")
    assert found is not None and found[1] is None  # one plain object, as before

    big = write_distinct(tmp_path / "big.bin", 5 * MiB + 123)
    with structlog.testing.capture_logs() as logs:
        await bus.put_artifact("r1/big.bin", big)
        await bus.put_artifact("r1/big.bin", big)  # again: nothing moves
    first, again = [e for e in logs if e["event"] == "artifact_uploaded"]
    assert (first["chunks_sent"], first["chunks_skipped"]) == (6, 0)
    assert (again["chunks_sent"], again["chunks_skipped"], again["bytes_sent"]) == (0, 6, 0)
    found = await store.lookup("r1/big.bin")
    assert found is not None and isinstance(found[1], ArtifactManifest)
    manifest = found[1]
    assert manifest.size == big.stat().st_size and manifest.sha256 == sha256_of(big)
    assert [c.size for c in manifest.chunks] == [MiB] * 5 + [123]

    back = await bus.get_artifact("r1/big.bin", tmp_path / "out" / "big.bin")
    assert sha256_of(back) == manifest.sha256
    assert not (tmp_path / "out" / "big.bin.partial").exists()

    # a new version replaces the manifest last and drops the chunks only the old one used
    with big.open("r+b") as fh:
        fh.seek(2 * MiB + 5)
        fh.write(b"changed")
    with structlog.testing.capture_logs() as logs:
        await bus.put_artifact("r1/big.bin", big)
    assert (uploaded(logs)["chunks_sent"], uploaded(logs)["chunks_skipped"]) == (1, 5)
    found = await store.lookup("r1/big.bin")
    assert found is not None and isinstance(found[1], ArtifactManifest)
    assert await chunk_objects(bus, "r1/big.bin") == {
        chunk_key("r1/big.bin", c.sha256) for c in found[1].chunks}
    back = await bus.get_artifact("r1/big.bin", tmp_path / "out" / "big2.bin")
    assert back.read_bytes() == big.read_bytes()

    await bus.delete_artifact("r1/big.bin")
    assert not await bus.has_artifact("r1/big.bin")
    assert await chunk_objects(bus, "r1/big.bin") == set()
    with pytest.raises(NotFound) as info:
        await bus.get_artifact("r1/big.bin", tmp_path / "out" / "gone.bin")
    assert "r1/big.bin" in info.value.message and info.value.hint


async def test_repeated_chunks_are_stored_once_and_copied_on_download(
    bus: Bus, tmp_path: Path
) -> None:
    src = tmp_path / "zeros.bin"
    with src.open("wb") as fh:
        fh.truncate(8 * MiB + 5)  # sparse: eight identical chunks and a tail
    dest = tmp_path / "out" / "zeros.bin"
    with structlog.testing.capture_logs() as logs:
        await bus.put_artifact("r1/zeros.bin", src)
        await bus.get_artifact("r1/zeros.bin", dest)
    assert (uploaded(logs)["chunks_sent"], uploaded(logs)["chunks_skipped"]) == (2, 7)
    assert len(await chunk_objects(bus, "r1/zeros.bin")) == 2
    assert dest.read_bytes() == bytes(8 * MiB + 5)


async def test_large_objects_written_before_chunking_still_download(
    bus: Bus, tmp_path: Path
) -> None:
    src = write_distinct(tmp_path / "old.bin", 33 * MiB)  # above two bus chunks: flow-controlled
    obs = await bus.objects()
    with src.open("rb") as fh:
        await obs.put("r0/old.bin", fh)  # how artifacts were stored before
    back = await bus.get_artifact("r0/old.bin", tmp_path / "out" / "old.bin")
    assert sha256_of(back) == sha256_of(src)


# --- broken connections -----------------------------------------------------------------------


async def test_broken_upload_resumes_sending_only_the_missing_chunks(
    nats_server: NatsServer, bus: Bus, tmp_path: Path
) -> None:
    src = write_distinct(tmp_path / "ckpt.bin", 12 * MiB)
    bus.artifacts.retries = 0  # give up at once: the rerun below is a new process
    store = await bus._artifact_bus_store()
    put_chunk = store.put_chunk
    sent: list[str] = []

    async def put_then_break(key: str, chunk: Any, path: Path, offset: int) -> None:
        await put_chunk(key, chunk, path, offset)
        sent.append(key)
        if len(sent) == 5:
            nats_server.stop()  # the connection breaks after 5 of 12 chunks

    store.put_chunk = put_then_break  # type: ignore[method-assign]
    with pytest.raises(TransferInterrupted) as info:
        await bus.put_artifact("r1/ckpt.bin", src)
    assert "resumes where it stopped" in info.value.hint

    nats_server.start()  # same port, same store dir
    rerun = await open_bus(nats_server.url)
    rerun.artifacts.bus_chunk_bytes = MiB
    try:
        assert not await rerun.has_artifact("r1/ckpt.bin")  # no manifest: not half-visible
        with structlog.testing.capture_logs() as logs:
            await rerun.put_artifact("r1/ckpt.bin", src)
        summary = uploaded(logs)
        assert (summary["chunks_skipped"], summary["chunks_sent"]) == (5, 7)
        assert summary["bytes_sent"] == 7 * MiB
        back = await rerun.get_artifact("r1/ckpt.bin", tmp_path / "back.bin")
        assert sha256_of(back) == sha256_of(src)
    finally:
        await rerun.close()


async def test_broken_download_resumes_from_its_partial_file(
    nats_server: NatsServer, bus: Bus, tmp_path: Path
) -> None:
    src = write_distinct(tmp_path / "model.bin", 12 * MiB)
    await bus.put_artifact("r1/model.bin", src)
    bus.artifacts.retries = 0
    store = await bus._artifact_bus_store()
    get_chunk = store.get_chunk
    got: list[str] = []

    async def get_then_break(key: str, chunk: Any, sink: Any) -> None:
        await get_chunk(key, chunk, sink)
        got.append(key)
        if len(got) == 5:
            nats_server.stop()

    store.get_chunk = get_then_break  # type: ignore[method-assign]
    dest = tmp_path / "out" / "model.bin"
    with pytest.raises(TransferInterrupted):
        await bus.get_artifact("r1/model.bin", dest)
    assert not dest.exists()
    assert (tmp_path / "out" / "model.bin.partial").stat().st_size == 5 * MiB

    nats_server.start()
    rerun = await open_bus(nats_server.url)
    try:
        with structlog.testing.capture_logs() as logs:
            await rerun.get_artifact("r1/model.bin", dest)
        summary = uploaded(logs, "artifact_downloaded")
        assert (summary["chunks_reused"], summary["chunks_fetched"]) == (5, 7)
        assert sha256_of(dest) == sha256_of(src)
    finally:
        await rerun.close()


# --- checksums --------------------------------------------------------------------------------


async def test_a_damaged_chunk_is_detected_and_a_resend_repairs_it(
    bus: Bus, tmp_path: Path
) -> None:
    src = write_distinct(tmp_path / "a.bin", 4 * MiB)
    await bus.put_artifact("r1/a.bin", src)
    store = await bus._artifact_bus_store()
    found = await store.lookup("r1/a.bin")
    assert found is not None and isinstance(found[1], ArtifactManifest)
    victim = found[1].chunks[2]
    obs = await bus.objects()
    await obs.put(chunk_key("r1/a.bin", victim.sha256), b"\0" * victim.size)  # bit rot

    dest = tmp_path / "out" / "a.bin"
    with pytest.raises(ArtifactCorrupt) as info:
        await bus.get_artifact("r1/a.bin", dest)
    assert "chunk 2" in info.value.message and "upload the artifact again" in info.value.hint
    assert not dest.exists()

    with structlog.testing.capture_logs() as logs:
        await bus.put_artifact("r1/a.bin", src)  # the damaged chunk fails verification
    assert (uploaded(logs)["chunks_sent"], uploaded(logs)["chunks_skipped"]) == (1, 3)
    assert sha256_of(await bus.get_artifact("r1/a.bin", dest)) == sha256_of(src)


async def test_file_store_damage_is_detected(nats_url: str, tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    bus = await open_bus(nats_url, artifact_store=root.as_uri())
    bus.artifacts.chunk_bytes = MiB
    try:
        src = write_distinct(tmp_path / "m.bin", 3 * MiB)
        await bus.put_artifact("r1/m.bin", src)
        chunk = next((root / "r1" / "m.bin.chunks").iterdir())
        with chunk.open("r+b") as fh:
            fh.seek(1000)
            fh.write(b"\xff")
        with pytest.raises(ArtifactCorrupt):
            await bus.get_artifact("r1/m.bin", tmp_path / "out" / "m.bin")
        with structlog.testing.capture_logs() as logs:
            await bus.put_artifact("r1/m.bin", src)
        assert (uploaded(logs)["chunks_sent"], uploaded(logs)["chunks_skipped"]) == (1, 2)
        back = await bus.get_artifact("r1/m.bin", tmp_path / "out" / "m.bin")
        assert sha256_of(back) == sha256_of(src)
    finally:
        await bus.close()


# --- the file:// store ------------------------------------------------------------------------


async def test_file_store_keeps_large_artifacts_and_the_bus_a_reference(
    nats_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    agent_bus = await open_bus(nats_url, artifact_store=root.as_uri(),
                               artifact_store_min_bytes=MiB)
    agent_bus.artifacts.chunk_bytes = MiB
    reader = await open_bus(nats_url)  # e.g. the daemon, configured without the store
    try:
        small = tmp_path / "metrics.json"
        small.write_bytes(b'{"loss": 0.1}')
        big = write_distinct(tmp_path / "model.tar", 3 * MiB + 7)
        await agent_bus.put_artifact("r1/metrics.json", small)
        await agent_bus.put_artifact("r1/model.tar", big)

        store = await reader._artifact_bus_store()
        small_found = await store.lookup("r1/metrics.json")
        assert small_found is not None and small_found[1] is None  # under the threshold
        found = await store.lookup("r1/model.tar")
        assert found is not None
        info, ref = found
        assert ref == ArtifactRef(store=root.as_uri(), key="r1/model.tar",
                                  size=big.stat().st_size, sha256=sha256_of(big))
        assert info.size < 512  # all the bus carries for a large artifact
        assert (root / "r1" / "model.tar").exists()  # the manifest, written last
        assert len(list((root / "r1" / "model.tar.chunks").iterdir())) == 4

        back = await reader.get_artifact("r1/model.tar", tmp_path / "out" / "model.tar")
        assert back.read_bytes() == big.read_bytes()
        assert (await reader.get_artifact("r1/metrics.json", tmp_path / "out" / "m.json")
                ).read_bytes() == small.read_bytes()

        # a host without the shared mount is told what to do
        root.rename(tmp_path / "unmounted")
        with pytest.raises(ConfigError) as err:
            await reader.get_artifact("r1/model.tar", tmp_path / "out" / "again.tar")
        assert "mount the shared filesystem" in err.value.hint
        (tmp_path / "unmounted").rename(root)

        await reader.delete_artifact("r1/model.tar")
        assert not await reader.has_artifact("r1/model.tar")
        assert not (root / "r1" / "model.tar").exists()
        assert not (root / "r1" / "model.tar.chunks").exists()
    finally:
        await agent_bus.close()
        await reader.close()


@pytest.mark.parametrize(("uri", "words"), [
    ("ftp://host/x", "unknown scheme"),
    ("s3://user:secret@bucket/x", "credentials"),
    ("file:///no/such/dir/for/stratos", "not a directory"),
    ("file://otherhost/x", "three slashes"),
])
async def test_bad_store_uri_fails_at_start(nats_url: str, uri: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        await open_bus(nats_url, artifact_store=uri)
    assert words in f"{info.value.message} {info.value.hint}"
    assert info.value.field == "artifact_store"
    assert "secret" not in info.value.message


# --- 3 GiB ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("where", ["bus", "file"])
async def test_three_gib_artifact_streams_with_bounded_rss(
    nats_url: str, tmp_path: Path, where: str
) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    src = await asyncio.to_thread(write_distinct, tmp_path / "model.bin", 3 * GiB)
    expected = await asyncio.to_thread(sha256_of, src)
    bus = await open_bus(nats_url, artifact_store=root.as_uri() if where == "file" else None)
    dest = tmp_path / "out" / "model.bin"
    loop = asyncio.get_running_loop()
    try:
        with RssPeak() as rss:
            t0 = loop.time()
            await bus.put_artifact("r1/model.bin", src)
            t1 = loop.time()
            await bus.get_artifact("r1/model.bin", dest)
            t2 = loop.time()
        print(f"\n3 GiB via {where}: upload {t1 - t0:.1f} s, download {t2 - t1:.1f} s; RSS "
              f"before {rss.before / MiB:.0f} MiB, peak {rss.peak / MiB:.0f} MiB, after "
              f"{rss.after / MiB:.0f} MiB, growth {rss.growth / MiB:.0f} MiB")
        assert dest.stat().st_size == 3 * GiB
        assert await asyncio.to_thread(sha256_of, dest) == expected
        assert rss.growth < 256 * MiB
        await bus.delete_artifact("r1/model.bin")
    finally:
        await bus.close()
        for path in (src, dest):
            path.unlink(missing_ok=True)
