"""file:///path: artifacts on a filesystem every host mounts at the same path (NFS, Lustre...)."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import msgspec

from schemas.artifacts import INDEX_DECODER, ArtifactIndex, ChunkInfo
from stratosd.artifacts.base import (
    BLOCK_BYTES,
    ArtifactCorrupt,
    HashingWriter,
    RangeReader,
    TransferInterrupted,
    check_key,
    file_changed,
    fsync_replace,
    hash_range,
)
from stratosd.errors import ConfigError


class FileStore:
    """Chunks and manifests as files under root; each is written to a temp name, then renamed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = root.as_uri()
        self._check_root()

    def _check_root(self) -> None:
        # never write below an unmounted mount point: the files would land on the local disk
        if not self.root.is_dir():
            raise ConfigError(f"artifact store {self.uri}: {self.root} is not a directory",
                              hint="mount the shared filesystem there (the same path on every "
                              "host), or create the directory", field="artifact_store")

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def has_chunk(self, key: str, chunk: ChunkInfo) -> bool:
        """Present with the right size and, re-hashed, the right sha256."""
        path = self._path(key)
        try:
            if path.stat().st_size != chunk.size:
                return False
        except FileNotFoundError:
            return False
        return await asyncio.to_thread(hash_range, path, 0, chunk.size) == chunk.sha256

    async def put_chunk(self, key: str, chunk: ChunkInfo, path: Path, offset: int) -> None:
        """Copy the range in blocks to a temp file; fsync and rename it in when it verifies."""
        self._check_root()
        src = RangeReader(path, offset, chunk.size)
        try:
            await asyncio.to_thread(self._write, self._path(key), src, chunk.sha256)
        finally:
            src.close()

    async def get_chunk(self, key: str, chunk: ChunkInfo, sink: HashingWriter) -> None:
        """Copy the chunk file in blocks into sink."""
        await asyncio.to_thread(self._read, key, sink)

    async def put_index(self, key: str, index: ArtifactIndex) -> None:
        """Write the manifest atomically (temp file + rename)."""
        data = msgspec.json.encode(index)
        self._check_root()
        await asyncio.to_thread(self._write_bytes, self._path(key), data)

    async def get_index(self, key: str) -> ArtifactIndex | None:
        """The manifest at key, None when there is none."""
        path = self._path(key)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError):
            self._check_root()
            return None
        try:
            return INDEX_DECODER.decode(data)
        except msgspec.DecodeError as exc:
            raise ArtifactCorrupt(f"manifest {path} is damaged: {exc}",
                                  hint="upload the artifact again") from None

    async def delete(self, key: str) -> None:
        """Remove key's file, and its chunk directory once empty."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        if path.parent.name.endswith(".chunks"):
            try:
                path.parent.rmdir()
            except OSError:
                pass  # other chunks still there

    def _write(self, path: Path, src: RangeReader, sha256: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        buf = bytearray(BLOCK_BYTES)
        try:
            with tmp.open("wb") as out:
                while n := src.readinto(buf):
                    out.write(memoryview(buf)[:n])
            if src.sha256_hex() != sha256:
                raise file_changed(src.path)
            fsync_replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _write_bytes(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            tmp.write_bytes(data)
            fsync_replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self, key: str, sink: HashingWriter) -> None:
        buf = bytearray(BLOCK_BYTES)
        try:
            fh = self._path(key).open("rb")
        except FileNotFoundError:
            raise TransferInterrupted(
                f"chunk {key!r} is missing from {self.uri}",
                hint="the artifact was replaced while it was read, or the upload did not "
                "finish: try again") from None
        with fh:
            while n := fh.readinto(buf):
                sink.write(memoryview(buf)[:n])
