"""The bus's JetStream object store as a ChunkStore, plus plain (one-object) artifacts.

nats-py's own object-store download uses an ordered consumer whose flow control caps it near
40 MB/s; chunk objects are read here with a plain ephemeral push consumer (no ack, no flow
control, ~300 MB/s). The subscription's pending limit is the object's size, and objects are at
most one chunk (BUS_CHUNK_BYTES, far below the server's per-client max_pending, which a reader
that falls behind would otherwise hit), so memory stays bounded however large the artifact.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import (
    DigestMismatchError,
    NotFoundError,
    ObjectNotFoundError,
    ServiceUnavailableError,
)
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
)

from schemas import subjects
from schemas.artifacts import (
    INDEX_DECODER,
    INDEX_HEADER,
    MANIFEST_KIND,
    REF_KIND,
    ArtifactIndex,
    ArtifactManifest,
    ChunkInfo,
)
from schemas.base import is_token
from stratosd.artifacts.base import (
    BUS_CHUNK_BYTES,
    ArtifactCorrupt,
    HashingWriter,
    RangeReader,
    TransferInterrupted,
    file_changed,
)

log = structlog.stdlib.get_logger(__name__)
T = TypeVar("T")

# the connection broke, the server restarts, or JetStream is briefly unavailable
_TRANSIENT = (nats.errors.TimeoutError, nats.errors.ConnectionClosedError,
              nats.errors.ConnectionReconnectingError, nats.errors.NoRespondersError,
              nats.errors.StaleConnectionError, nats.errors.OutboundBufferLimitError,
              nats.errors.ConnectionDrainingError, ServiceUnavailableError,
              asyncio.TimeoutError, ConnectionError)


def agent_bucket(agent_id: str) -> str:
    """The object store holding the artifacts of agent_id's jobs (private artifacts).

    One bucket per agent because NATS can scope permissions only by subject, and an object
    store's subjects name objects by base64 and chunks by random id: `$O.<bucket>.>` is the
    finest grain a permission can name (docs/security.md, "Private artifacts")."""
    if not is_token(agent_id):
        raise ValueError(f"agent id {agent_id!r} is not a valid token")
    return f"{subjects.ARTIFACTS_BUCKET}_{agent_id}"


def sha256_digest(hex_sha: str) -> str:
    """The object store's digest string for a sha256 given in hex."""
    raw = bytes.fromhex(hex_sha)
    return OBJ_DIGEST_TEMPLATE.format(digest=base64.urlsafe_b64encode(raw).decode())


def index_kind(info: Any) -> str | None:
    """`manifest` or `ref` when the object at a key is an index, None for a plain artifact."""
    value = (getattr(info, "headers", None) or {}).get(INDEX_HEADER)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if value in (MANIFEST_KIND, REF_KIND) else None


class BusStore:
    """Chunk objects, manifests and references in the `stratos_artifacts` object store."""

    uri = "nats:"

    def __init__(self, js: JetStreamContext, obs: Any, bucket: str,
                 stall_timeout_s: float = 15.0) -> None:
        self.js = js
        self.obs = obs
        self.bucket = bucket
        self.stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
        self.stall_timeout_s = stall_timeout_s

    async def _guard(self, what: str, key: str, aw: Awaitable[T]) -> T:
        try:
            return await aw
        except _TRANSIENT as exc:
            raise TransferInterrupted(
                f"{what} of artifact object {key!r} broke: {type(exc).__name__} {exc}".rstrip(),
                hint="the bus connection dropped; the transfer resumes where it stopped once "
                "NATS is reachable") from None

    async def info(self, key: str) -> Any | None:
        """The object-store info of key, None when absent or deleted."""
        try:
            info = await self._guard("lookup", key, self.obs.get_info(key))
        except (ObjectNotFoundError, NotFoundError):
            return None
        return None if getattr(info, "deleted", False) else info

    async def lookup(self, key: str) -> tuple[Any, ArtifactIndex | None] | None:
        """(info, index) of key: index is None for a plain artifact; None when absent."""
        info = await self.info(key)
        if info is None:
            return None
        if index_kind(info) is None:
            return info, None
        buf = _Buffer()
        await self._stream(info, buf)
        try:
            return info, INDEX_DECODER.decode(bytes(buf.data))
        except msgspec.DecodeError as exc:
            raise ArtifactCorrupt(f"artifact {key!r}: its index object is damaged: {exc}",
                                  hint="upload the artifact again") from None

    async def has_chunk(self, key: str, chunk: ChunkInfo) -> bool:
        """Present, with the chunk's size and the object store's digest equal to its sha256."""
        info = await self.info(key)
        return info is not None and info.size == chunk.size and \
            info.digest == sha256_digest(chunk.sha256)

    async def put_chunk(self, key: str, chunk: ChunkInfo, path: Path, offset: int) -> None:
        """obs.put streams the range in 128 KiB messages; its digest verifies them."""
        src = RangeReader(path, offset, chunk.size, hashing=False)  # obs.put hashes already
        try:
            info = await self._guard("upload", key, self.obs.put(key, src))
        finally:
            src.close()
        if info.digest != sha256_digest(chunk.sha256):
            await self.delete(key)
            raise file_changed(path)

    async def get_chunk(self, key: str, chunk: ChunkInfo, sink: HashingWriter) -> None:
        """Stream the chunk object into sink."""
        info = await self.info(key)
        if info is None:
            raise TransferInterrupted(
                f"chunk {key!r} is missing from the bus object store",
                hint="the artifact was replaced while it was read, or its upload did not "
                "finish: try again")
        await self._stream(info, sink)

    async def put_index(self, key: str, index: ArtifactIndex) -> None:
        """Write index at key, marked by the Stratos-Artifact header."""
        kind = MANIFEST_KIND if isinstance(index, ArtifactManifest) else REF_KIND
        meta = js_api.ObjectMeta(name=key, headers={INDEX_HEADER: [kind]})
        await self._guard("upload", key, self.obs.put(key, msgspec.json.encode(index), meta))

    async def get_index(self, key: str) -> ArtifactIndex | None:
        """The manifest or reference at key; None when absent or a plain artifact."""
        found = await self.lookup(key)
        return None if found is None else found[1]

    async def delete(self, key: str) -> None:
        """Delete key (chunks purged); absent keys are fine."""
        try:
            await self._guard("delete", key, self.obs.delete(key))
        except (ObjectNotFoundError, NotFoundError):
            pass

    async def put_plain(self, key: str, path: Path) -> None:
        """A small artifact as one object, in the layout every nats client reads."""
        size = path.stat().st_size
        src = RangeReader(path, 0, size, hashing=False)  # obs.put hashes already
        try:
            info = await self._guard("upload", key, self.obs.put(key, src))
        finally:
            src.close()
        if info.size != size or path.stat().st_size != size:
            raise file_changed(path)

    async def get_plain(self, info: Any, dest: Path) -> Path:
        """Download a plain artifact via a `.partial` file, checking the object's digest."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        whole = hashlib.sha256()
        with partial.open("wb") as fh:
            sink = HashingWriter(fh, whole)
            if int(info.size or 0) <= 2 * BUS_CHUNK_BYTES:
                await self._stream(info, sink)
            else:  # a large object from before chunking: nats-py's flow-controlled reader
                try:
                    await self._guard("download", info.name,
                                      self.obs.get(info.name, writeinto=sink))
                except DigestMismatchError:
                    pass  # reported below, with the size check
        if sink.written != info.size or (info.digest or "").lower() != \
                sha256_digest(whole.hexdigest()).lower():
            partial.unlink(missing_ok=True)
            raise ArtifactCorrupt(f"artifact {info.name!r} does not match its sha256 digest",
                                  hint="the stored copy is damaged: upload it again (rerun the "
                                  "stage that produced it)")
        partial.replace(dest)
        return dest

    async def _stream(self, info: Any, sink: Any) -> None:
        """Deliver the object's messages into sink.write, in order, until info.size bytes."""
        size = int(info.size or 0)
        if size == 0:
            return
        subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=info.nuid)
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.ALL, ack_policy=js_api.AckPolicy.NONE,
            max_deliver=1, mem_storage=True, num_replicas=1, inactive_threshold=30.0)
        sub = await self._guard("download", info.name, self.js.subscribe(
            subject, stream=self.stream, config=config,
            pending_bytes_limit=size + 1024**2, pending_msgs_limit=int(info.chunks or 0) + 16))
        got = 0
        try:
            while got < size:
                msg = await self._guard("download", info.name,
                                        sub.next_msg(timeout=self.stall_timeout_s))
                if got + len(msg.data) > size:
                    raise ArtifactCorrupt(f"artifact object {info.name!r} holds more than its "
                                          f"{size} bytes", hint="upload it again")
                if len(msg.data) >= 64 * 1024:
                    await asyncio.to_thread(sink.write, msg.data)  # disk may throttle
                else:
                    sink.write(msg.data)
                got += len(msg.data)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the consumer expires on its own
                log.debug("artifact_unsubscribe_failed", exc_info=True)


class _Buffer:
    """A sink that keeps what it gets (index objects only: a few KiB)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.data.extend(data)
        return len(data)
