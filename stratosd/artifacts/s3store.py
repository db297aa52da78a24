"""s3://bucket/prefix: artifacts in S3 or an S3-compatible service (MinIO, Ceph, R2...).

boto3 (extra `stratos[s3]`) is imported on first use. Credentials and region come from the
usual AWS sources (env, ~/.aws, instance role), never from the URI; the endpoint of a
non-AWS service from `?endpoint_url=http://host:9000` in the URI or AWS_ENDPOINT_URL_S3.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

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
)
from stratosd.errors import MissingDependency, StratosError

T = TypeVar("T")
_MISSING = ("404", "NoSuchKey", "NotFound")


class S3Store:
    """Chunks and manifests as objects under bucket/prefix; sha256 kept in object metadata."""

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        query = f"?endpoint_url={quote(endpoint_url, safe=':/')}" if endpoint_url else ""
        self.uri = f"s3://{bucket}/{prefix}{query}" if prefix else f"s3://{bucket}{query}"
        self._client: Any = None
        self._lock = threading.Lock()
        if importlib.util.find_spec("boto3") is None:  # fail at start, not at the first upload
            raise MissingDependency(f"artifact store {self.uri} needs boto3",
                                    hint="pip install 'stratos[s3]'")

    def _s3(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise MissingDependency(
                        f"artifact store {self.uri} needs boto3",
                        hint="pip install 'stratos[s3]'") from None
                # the URI's endpoint, else this host's (read here: older boto3 ignores it)
                endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or \
                    os.environ.get("AWS_ENDPOINT_URL") or None
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=endpoint,
                    config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                  connect_timeout=10, read_timeout=60))
            return self._client

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _call(self, what: str, fn: Callable[[], T]) -> T | None:
        """Run a blocking boto3 call in a thread; None when the object does not exist."""
        return await asyncio.to_thread(self._guard, what, fn)

    def _guard(self, what: str, fn: Callable[[], T]) -> T | None:
        from botocore import exceptions as bex

        try:
            return fn()
        except (bex.ConnectionError, bex.HTTPClientError) as exc:
            raise TransferInterrupted(f"{what} on {self.uri} broke: {exc}",
                                      hint="check the connection to the store; the transfer "
                                      "resumes where it stopped") from None
        except bex.NoCredentialsError:
            raise StratosError(f"{what} on {self.uri}: no AWS credentials",
                               hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
                               "on this host") from None
        except bex.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code in _MISSING:
                return None
            if status >= 500 or code in ("SlowDown", "RequestTimeout"):
                raise TransferInterrupted(f"{what} on {self.uri} failed: {code}",
                                          hint="the store is busy or down; try again") from None
            raise StratosError(f"{what} on {self.uri} failed: {code}: {exc}",
                               hint="check the bucket exists and this host's credentials may "
                               "read and write it") from None

    async def has_chunk(self, key: str, chunk: ChunkInfo) -> bool:
        """HEAD: the size and the sha256 the uploader recorded (after verifying its source)."""
        head = await self._call("HEAD", lambda: self._s3().head_object(
            Bucket=self.bucket, Key=self._key(key)))
        if head is None:
            return False
        meta = head.get("Metadata") or {}
        return bool(head.get("ContentLength") == chunk.size and meta.get("sha256") == chunk.sha256)

    async def put_chunk(self, key: str, chunk: ChunkInfo, path: Path, offset: int) -> None:
        """One streaming PUT (chunks are far below S3's 5 GiB single-PUT limit)."""
        src = RangeReader(path, offset, chunk.size)
        try:
            await self._call("PUT", lambda: self._s3().put_object(
                Bucket=self.bucket, Key=self._key(key), Body=src, ContentLength=chunk.size,
                Metadata={"sha256": chunk.sha256}))
        finally:
            src.close()
        if src.sha256_hex() != chunk.sha256:  # the metadata would lie: take it back
            await self.delete(key)
            raise file_changed(path)

    async def get_chunk(self, key: str, chunk: ChunkInfo, sink: HashingWriter) -> None:
        """GET, streaming the body into sink block by block."""

        def fetch() -> bool:
            resp = self._s3().get_object(Bucket=self.bucket, Key=self._key(key))
            for block in resp["Body"].iter_chunks(BLOCK_BYTES):
                sink.write(block)
            return True

        if await self._call("GET", fetch) is None:
            raise TransferInterrupted(
                f"chunk {key!r} is missing from {self.uri}",
                hint="the artifact was replaced while it was read, or the upload did not "
                "finish: try again")

    async def put_index(self, key: str, index: ArtifactIndex) -> None:
        """PUT the manifest (small JSON)."""
        data = msgspec.json.encode(index)
        await self._call("PUT", lambda: self._s3().put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data,
            ContentType="application/json"))

    async def get_index(self, key: str) -> ArtifactIndex | None:
        """The manifest at key, None when absent."""

        def fetch() -> bytes:
            body: bytes = self._s3().get_object(Bucket=self.bucket, Key=self._key(key))[
                "Body"].read()
            return body

        data = await self._call("GET", fetch)
        if data is None:
            return None
        try:
            return INDEX_DECODER.decode(data)
        except msgspec.DecodeError as exc:
            raise ArtifactCorrupt(f"manifest {key!r} in {self.uri} is damaged: {exc}",
                                  hint="upload the artifact again") from None

    async def delete(self, key: str) -> None:
        """DELETE (idempotent in S3)."""
        await self._call("DELETE", lambda: self._s3().delete_object(
            Bucket=self.bucket, Key=self._key(key)))
