"""What every artifact store shares: errors, the ChunkStore protocol, range readers, keys."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import IO, Any, Protocol

from schemas.artifacts import ArtifactIndex, ChunkInfo
from stratosd.errors import ConfigError, StratosError

CHUNK_BYTES = 64 * 1024**2  # one resumable unit: a broken transfer loses at most this much
# The bus pushes a chunk object to the reader without flow control (see busstore); the server
# drops a client that falls more than max_pending (64 MiB by default) behind, so bus chunks
# stay well below that.
BUS_CHUNK_BYTES = 16 * 1024**2
BLOCK_BYTES = 1024**2  # what one read or write moves: memory stays bounded by a few of these


class ArtifactCorrupt(StratosError):
    """An artifact's bytes do not match their sha256 (stored copy damaged or overwritten)."""

    code = "artifact_corrupt"


class TransferInterrupted(StratosError):
    """The connection to the bus or the store broke mid-transfer; a rerun resumes it."""

    code = "transfer_interrupted"


class ChunkStore(Protocol):
    """Where chunked artifacts live: the bus object store, a shared filesystem, S3.

    Keys are `/`-separated; an artifact's manifest sits at its key and is written last, its
    chunks under schemas.artifacts.chunk_key(). Every method is safe to retry.
    """

    uri: str

    async def has_chunk(self, key: str, chunk: ChunkInfo) -> bool:
        """True when key holds exactly chunk (size and sha256 verified)."""
        ...

    async def put_chunk(self, key: str, chunk: ChunkInfo, path: Path, offset: int) -> None:
        """Store chunk.size bytes of path at offset under key, streaming; when they no longer
        hash to chunk.sha256 (the file changed) keep nothing and raise file_changed()."""
        ...

    async def get_chunk(self, key: str, chunk: ChunkInfo, sink: HashingWriter) -> None:
        """Write the chunk at key into sink, streaming; TransferInterrupted when it is gone."""
        ...

    async def put_index(self, key: str, index: ArtifactIndex) -> None:
        """Write a manifest (or, on the bus, a reference) at key, replacing what was there."""
        ...

    async def get_index(self, key: str) -> ArtifactIndex | None:
        """The manifest or reference at key; None when key holds none."""
        ...

    async def delete(self, key: str) -> None:
        """Remove key; absent keys are fine."""
        ...


def check_key(key: str) -> str:
    """key, when it is a relative `/`-separated path without empty, `.` or `..` segments."""
    parts = key.split("/")
    if not key or "\\" in key or "\0" in key or any(p in ("", ".", "..") for p in parts):
        raise StratosError(f"artifact key {key!r} is not a plain relative path",
                           hint="use keys from schemas.subjects.artifact_key()", field="key")
    return key


def file_changed(path: Path) -> ArtifactCorrupt:
    """The error for a source file that changed between hashing and uploading."""
    return ArtifactCorrupt(f"{path} changed while it was uploaded",
                           hint="upload it again once the file is complete")


class RangeReader(io.RawIOBase):
    """A read-only, seekable view of length bytes of a file at offset; hashes what it yields.

    A pass that reads the view from its start to its end leaves that range's sha256 in
    sha256_hex(); a seek back to 0 starts the hash over (clients that read twice, e.g. to
    checksum a request body, end with the hash of the last pass). hashing=False skips it.
    """

    def __init__(self, path: Path, offset: int, length: int, *, hashing: bool = True) -> None:
        super().__init__()
        self.path = path
        self.length = length
        self.hashing = hashing
        self._fh: io.BufferedReader = path.open("rb")
        self._offset = offset
        self._pos = 0
        self._hash = hashlib.sha256()
        self._hashed = 0

    def readable(self) -> bool:
        """Always readable."""
        return True

    def seekable(self) -> bool:
        """Always seekable within the range."""
        return True

    def tell(self) -> int:
        """Position within the range."""
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        """Move within the range (clamped to it)."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.length}[whence]
        self._pos = max(0, min(self.length, base + pos))
        if self._pos == 0:
            self._hash, self._hashed = hashlib.sha256(), 0
        return self._pos

    def readinto(self, buffer: Any) -> int:
        """Read up to len(buffer) bytes of the range."""
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.length - self._pos)
        if n <= 0:
            return 0
        self._fh.seek(self._offset + self._pos)
        got = self._fh.readinto(view[:n]) or 0
        if got == 0:
            raise ArtifactCorrupt(f"{self.path} shrank while it was being read",
                                  hint="upload it again once the file is complete")
        if self.hashing and self._pos == self._hashed:
            self._hash.update(view[:got])
            self._hashed += got
        self._pos += got
        return got

    def sha256_hex(self) -> str | None:
        """The range's sha256 when one pass read all of it, else None."""
        return self._hash.hexdigest() if self._hashed == self.length else None

    def close(self) -> None:
        """Close the underlying file."""
        self._fh.close()
        super().close()


def hash_range(path: Path, offset: int, length: int, *more: Any) -> str:
    """sha256 (hex) of length bytes of path at offset; the bytes also update each of more."""
    h = hashlib.sha256()
    buf = bytearray(BLOCK_BYTES)
    with path.open("rb") as fh:
        fh.seek(offset)
        left = length
        while left > 0:
            got = fh.readinto(memoryview(buf)[:min(BLOCK_BYTES, left)])
            if not got:
                raise ArtifactCorrupt(f"{path} shrank while it was being read",
                                      hint="upload it again once the file is complete")
            block = memoryview(buf)[:got]
            h.update(block)
            for other in more:
                other.update(block)
            left -= got
    return h.hexdigest()


class HashingWriter:
    """Writes into a file while hashing: the current chunk and everything written so far."""

    def __init__(self, fh: IO[bytes], whole: Any) -> None:
        self._fh = fh
        self.whole = whole
        self.chunk = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write and hash data."""
        self._fh.write(data)
        self.chunk.update(data)
        self.whole.update(data)
        self.written += len(data)
        return len(data)


def fsync_replace(tmp: Path, dest: Path) -> None:
    """Make tmp durable, then atomically move it to dest (readers see old or new, never half)."""
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dest)


def open_store(uri: str) -> ChunkStore:
    """The external store a URI names: file:///path or s3://bucket/prefix."""
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        raise ConfigError(f"artifact store URI {_redact(uri)!r} carries credentials",
                          hint="put S3 credentials in the environment (AWS_ACCESS_KEY_ID, "
                          "AWS_SECRET_ACCESS_KEY or AWS_PROFILE), never in the URI",
                          field="artifact_store")
    if parts.scheme == "file":
        from stratosd.artifacts.filestore import FileStore

        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"artifact store {uri!r}: file URIs name a local path",
                              hint="write file:///shared/path (three slashes)",
                              field="artifact_store")
        return FileStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        from stratosd.artifacts.s3store import S3Store

        if not parts.netloc:
            raise ConfigError(f"artifact store {uri!r} names no bucket",
                              hint="write s3://bucket/prefix", field="artifact_store")
        endpoint = parse_qs(parts.query).get("endpoint_url", [None])[0]
        return S3Store(parts.netloc, parts.path.strip("/"), endpoint_url=endpoint)
    raise ConfigError(f"artifact store {uri!r} has an unknown scheme {parts.scheme!r}",
                      hint="use file:///shared/path or s3://bucket/prefix (or leave it unset "
                      "for the bus object store)", field="artifact_store")


def _redact(uri: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    host = parts.hostname or ""
    return parts._replace(netloc=f"***@{host}").geturl()
