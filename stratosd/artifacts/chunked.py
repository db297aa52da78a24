"""Chunked, resumable, checksummed transfers between a local file and a ChunkStore.

Upload: hash a chunk, skip it when the store already holds it verified, else stream it up;
the manifest (whole-file size and sha256, chunk list) goes last, so a key is either complete
or still names the previous version. Download: into `<dest>.partial`, skipping chunks a broken
earlier try already wrote (re-hashed), verifying every chunk and then the whole file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from schemas.artifacts import ArtifactManifest, ChunkInfo, chunk_key
from stratosd.artifacts.base import (
    BLOCK_BYTES,
    ArtifactCorrupt,
    ChunkStore,
    HashingWriter,
    TransferInterrupted,
    hash_range,
)

log = structlog.stdlib.get_logger(__name__)


@dataclass
class TransferStats:
    """What one transfer (all its tries) moved and what it could skip."""

    chunks_sent: int = 0
    chunks_skipped: int = 0
    bytes_sent: int = 0


async def upload(store: ChunkStore, key: str, path: Path, *, chunk_bytes: int,
                 stats: TransferStats) -> ArtifactManifest:
    """Upload path to key in chunks; chunks already in the store are verified and skipped."""
    size = path.stat().st_size
    try:
        old = await store.get_index(key)
    except ArtifactCorrupt:
        old = None  # a damaged previous manifest is replaced; its chunks stay behind
    whole = hashlib.sha256()
    chunks: list[ChunkInfo] = []
    present: set[str] = set()
    for offset in range(0, size, chunk_bytes):
        n = min(chunk_bytes, size - offset)
        chunk = ChunkInfo(n, await asyncio.to_thread(hash_range, path, offset, n, whole))
        chunks.append(chunk)
        ckey = chunk_key(key, chunk.sha256)
        if chunk.sha256 in present or await store.has_chunk(ckey, chunk):
            stats.chunks_skipped += 1
            present.add(chunk.sha256)
            log.debug("artifact_chunk_skipped", key=key, chunk=len(chunks) - 1)
            continue
        await store.put_chunk(ckey, chunk, path, offset)
        present.add(chunk.sha256)
        stats.chunks_sent += 1
        stats.bytes_sent += n
        log.debug("artifact_chunk_sent", key=key, chunk=len(chunks) - 1, size_bytes=n)
    if path.stat().st_size != size:
        raise ArtifactCorrupt(f"{path} changed size while it was uploaded",
                              hint="upload it again once the file is complete")
    manifest = ArtifactManifest(size=size, sha256=whole.hexdigest(), chunk_bytes=chunk_bytes,
                                chunks=chunks)
    await store.put_index(key, manifest)
    if isinstance(old, ArtifactManifest):
        await delete_chunks(store, key, old, keep=present)
    return manifest


async def delete_chunks(store: ChunkStore, key: str, manifest: ArtifactManifest,
                        keep: set[str] | None = None) -> None:
    """Delete the chunks of manifest (except those in keep): a replaced version's garbage."""
    for sha in {c.sha256 for c in manifest.chunks} - (keep or set()):
        try:
            await store.delete(chunk_key(key, sha))
        except TransferInterrupted:
            log.info("artifact_chunk_not_deleted", key=key, sha256=sha)


async def download(store: ChunkStore, key: str, manifest: ArtifactManifest, dest: Path, *,
                   stats: TransferStats) -> Path:
    """Download key to dest via `<dest>.partial`, resuming it; every sha256 is checked."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    have = partial.stat().st_size if partial.exists() else 0
    whole = hashlib.sha256()
    offset = 0
    written: dict[str, int] = {}  # sha256 → offset of a verified copy earlier in this file
    with partial.open("r+b" if have else "wb") as fh:
        for i, chunk in enumerate(manifest.chunks):
            if offset + chunk.size <= have:
                trial = whole.copy()
                if await asyncio.to_thread(hash_range, partial, offset, chunk.size,
                                           trial) == chunk.sha256:
                    whole = trial
                    written.setdefault(chunk.sha256, offset)
                    offset += chunk.size
                    stats.chunks_skipped += 1
                    continue
            if have > offset:
                fh.truncate(offset)
                have = offset
            fh.seek(offset)
            sink = HashingWriter(fh, whole.copy())
            try:
                if chunk.sha256 in written:  # a repeated chunk (zeros...): copy, not fetch
                    fh.flush()
                    await asyncio.to_thread(_copy_range, partial, written[chunk.sha256],
                                            chunk.size, sink)
                else:
                    await store.get_chunk(chunk_key(key, chunk.sha256), chunk, sink)
            except BaseException:
                fh.flush()  # what arrived stays: the next try re-hashes and may keep it
                raise
            if sink.written != chunk.size or sink.chunk.hexdigest() != chunk.sha256:
                fh.truncate(offset)
                raise ArtifactCorrupt(
                    f"artifact {key!r}: chunk {i} does not match its sha256 "
                    f"({sink.written} of {chunk.size} bytes)",
                    hint="the stored copy is damaged: upload the artifact again (rerun the "
                    "stage that produced it)")
            whole = sink.whole
            written.setdefault(chunk.sha256, offset)
            offset += chunk.size
            have = max(have, offset)
            stats.chunks_sent += 1
            stats.bytes_sent += chunk.size
        fh.truncate(offset)
    if offset != manifest.size or whole.hexdigest() != manifest.sha256:
        partial.unlink(missing_ok=True)
        raise ArtifactCorrupt(
            f"artifact {key!r}: the downloaded file does not match the manifest's sha256",
            hint="the manifest and its chunks disagree: upload the artifact again")
    os.replace(partial, dest)
    return dest


def _copy_range(path: Path, offset: int, length: int, sink: HashingWriter) -> None:
    buf = bytearray(BLOCK_BYTES)
    with path.open("rb") as src:
        src.seek(offset)
        left = length
        while left > 0 and (n := src.readinto(memoryview(buf)[:min(BLOCK_BYTES, left)])):
            sink.write(memoryview(buf)[:n])
            left -= n
