"""Artifacts of any size: chunked, resumable, checksummed; on the bus or an external store.

Bus.put_artifact/get_artifact go through transfer.Artifacts. Stores: busstore (JetStream
object store, the default), filestore (file:///shared/path), s3store (s3://bucket/prefix,
boto3 from the `s3` extra, imported on first use). Index objects live in schemas.artifacts.
"""

from stratosd.artifacts.base import (
    CHUNK_BYTES,
    ArtifactCorrupt,
    ChunkStore,
    TransferInterrupted,
    open_store,
)

__all__ = ["CHUNK_BYTES", "ArtifactCorrupt", "ChunkStore", "TransferInterrupted", "open_store"]
