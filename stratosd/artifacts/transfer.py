"""Artifacts: where each artifact goes (bus or external store), retries, logging.

- no external store, or a file under the size threshold: the bus object store; a file of at
  most one bus chunk is one plain object, a larger one is chunked with a manifest at its key;
- otherwise the external store gets the chunks and manifest, and the bus object store keeps
  only an ArtifactRef at the key, so every reader of the bus finds the artifact the same way.

A transfer broken by the connection is retried a few times in place; each retry, like a rerun
after the process died, resumes: uploads skip the chunks already stored, downloads keep the
verified chunks of their `.partial` file.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from schemas.artifacts import ArtifactManifest, ArtifactRef
from stratosd.artifacts.base import (
    BUS_CHUNK_BYTES,
    CHUNK_BYTES,
    ArtifactCorrupt,
    ChunkStore,
    TransferInterrupted,
    open_store,
)
from stratosd.artifacts.busstore import BusStore
from stratosd.artifacts.chunked import TransferStats, delete_chunks, download, upload
from stratosd.errors import NotFound

log = structlog.stdlib.get_logger(__name__)


class Artifacts:
    """put/get/exists/delete of artifacts by key, for Bus."""

    def __init__(
        self,
        bus_store: Callable[[], Awaitable[BusStore]],
        *,
        store_uri: str | None = None,
        min_bytes: int = 0,
        chunk_bytes: int = CHUNK_BYTES,
        bus_chunk_bytes: int = BUS_CHUNK_BYTES,
        retries: int = 3,
    ) -> None:
        self._bus_store = bus_store
        self.store_uri = store_uri or None
        self.min_bytes = min_bytes
        self.chunk_bytes = chunk_bytes  # external stores
        self.bus_chunk_bytes = bus_chunk_bytes
        self.retries = retries
        self._stores: dict[str, ChunkStore] = {}
        if self.store_uri:
            self.external(self.store_uri)  # a bad URI or a missing mount fails at start

    def external(self, uri: str) -> ChunkStore:
        """The external store at uri (opened once per URI)."""
        if uri not in self._stores:
            self._stores[uri] = open_store(uri)
        return self._stores[uri]

    async def put(self, key: str, path: Path) -> str:
        """Upload path under key (resuming an earlier broken upload); returns key."""
        size = path.stat().st_size
        external = self.store_uri is not None and size >= self.min_bytes
        target = self.store_uri if external and self.store_uri else "bus"
        stats = TransferStats()
        t0 = time.monotonic()
        await self._retry("upload", key, lambda: self._put_once(key, path, external, stats))
        log.info("artifact_uploaded", key=key, store=target, size_bytes=size,
                 chunks_sent=stats.chunks_sent, chunks_skipped=stats.chunks_skipped,
                 bytes_sent=stats.bytes_sent, duration_ms=round((time.monotonic() - t0) * 1e3))
        return key

    async def get(self, key: str, dest: Path) -> Path:
        """Download key into dest, verified end to end."""
        stats = TransferStats()
        t0 = time.monotonic()
        await self._retry("download", key, lambda: self._get_once(key, dest, stats))
        log.info("artifact_downloaded", key=key, size_bytes=dest.stat().st_size,
                 chunks_fetched=stats.chunks_sent, chunks_reused=stats.chunks_skipped,
                 duration_ms=round((time.monotonic() - t0) * 1e3))
        return dest

    async def exists(self, key: str) -> bool:
        """True when the bus knows key (a plain object, a manifest or a reference)."""
        return await (await self._bus_store()).info(key) is not None

    async def delete(self, key: str) -> None:
        """Delete key and whatever it names (chunks; an external manifest and its chunks)."""
        bus = await self._bus_store()
        found = await bus.lookup(key)
        if found is None:
            return
        index = found[1]
        if isinstance(index, ArtifactManifest):
            await delete_chunks(bus, key, index)
        elif isinstance(index, ArtifactRef):
            store = self.external(index.store)
            manifest = await store.get_index(index.key)
            if isinstance(manifest, ArtifactManifest):
                await delete_chunks(store, index.key, manifest)
            await store.delete(index.key)
        await bus.delete(key)

    async def _retry(self, what: str, key: str, once: Callable[[], Awaitable[None]]) -> None:
        for attempt in range(self.retries + 1):
            try:
                await once()
                return
            except TransferInterrupted as exc:
                if attempt >= self.retries:
                    raise TransferInterrupted(
                        f"{what} of artifact {key!r} failed {attempt + 1} times: {exc.message}",
                        hint=f"run it again: the {what} resumes where it stopped "
                        f"({exc.hint})") from None
                delay_s = min(8.0, 0.5 * 2**attempt)
                log.warning("artifact_transfer_retry", key=key, direction=what,
                            attempt=attempt + 1, error=exc.message, delay_s=delay_s)
                await asyncio.sleep(delay_s)

    async def _put_once(self, key: str, path: Path, external: bool,
                        stats: TransferStats) -> None:
        bus = await self._bus_store()
        found = await bus.lookup(key)
        old = found[1] if found else None
        if external and self.store_uri:
            store = self.external(self.store_uri)
            manifest = await upload(store, key, path, chunk_bytes=self.chunk_bytes, stats=stats)
            await bus.put_index(key, ArtifactRef(store=store.uri, key=key, size=manifest.size,
                                                 sha256=manifest.sha256))
        elif path.stat().st_size <= self.bus_chunk_bytes:
            await bus.put_plain(key, path)
            stats.chunks_sent += 1
            stats.bytes_sent += path.stat().st_size
        else:
            await upload(bus, key, path, chunk_bytes=self.bus_chunk_bytes, stats=stats)
            return  # upload() removed the replaced version's chunks itself
        if isinstance(old, ArtifactManifest):
            await delete_chunks(bus, key, old)

    async def _get_once(self, key: str, dest: Path, stats: TransferStats) -> None:
        bus = await self._bus_store()
        found = await bus.lookup(key)
        if found is None:
            raise NotFound(f"artifact {key!r} not found", hint="was the producing stage run?")
        info, index = found
        if index is None:
            await bus.get_plain(info, dest)
            stats.chunks_sent += 1
        elif isinstance(index, ArtifactManifest):
            await download(bus, key, index, dest, stats=stats)
        else:
            store = self.external(index.store)
            manifest = await store.get_index(index.key)
            if not isinstance(manifest, ArtifactManifest):
                raise NotFound(
                    f"artifact {key!r} is kept in {index.store} as {index.key!r}, which is "
                    "missing there",
                    hint="check that this host mounts the shared store at the same path (or "
                    "has credentials for the bucket), or rerun the stage that produced it")
            if (manifest.size, manifest.sha256) != (index.size, index.sha256):
                raise ArtifactCorrupt(
                    f"artifact {key!r}: {index.store} holds another version of {index.key!r} "
                    f"({manifest.size} bytes, sha256 {manifest.sha256[:12]}…) than the bus "
                    f"names ({index.size} bytes, sha256 {index.sha256[:12]}…)",
                    hint="two runs wrote the same key, or the store was edited: rerun the "
                    "stage that produced it")
            await download(store, index.key, manifest, dest, stats=stats)
