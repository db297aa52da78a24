"""Artifact index objects: a chunked artifact's manifest and a reference to an external store.

These are stored, not sent as messages: the object at an artifact's key (in the bus object
store or an external store) is either the artifact itself (one plain object, small files), an
`ArtifactManifest` (its chunks, written last so a key is complete or absent) or, on the bus
only, an `ArtifactRef` naming the external store that holds the manifest and chunks.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

SHA256_PATTERN = r"^[0-9a-f]{64}$"
Sha256 = Annotated[str, Meta(pattern=SHA256_PATTERN)]
Size = Annotated[int, Meta(ge=0)]

# object-store header naming which index object sits at a key (absent: a plain artifact)
INDEX_HEADER = "Stratos-Artifact"
MANIFEST_KIND = "manifest"
REF_KIND = "ref"


class ChunkInfo(msgspec.Struct, frozen=True):
    """One chunk, in file order: its size and sha256 (hex); it is stored under chunk_key()."""

    size: Size
    sha256: Sha256


class ArtifactManifest(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
                       tag="artifact_manifest"):
    """A chunked artifact: the whole file's size and sha256, then its chunks in order."""

    size: Size
    sha256: Sha256
    chunk_bytes: Annotated[int, Meta(gt=0)]
    chunks: list[ChunkInfo] = []


class ArtifactRef(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
                  tag="artifact_ref"):
    """What the bus holds for an artifact kept in an external store (file://, s3://)."""

    store: str  # the store's URI, e.g. file:///shared/stratos or s3://bucket/prefix
    key: str  # the key of its manifest inside that store
    size: Size
    sha256: Sha256


ArtifactIndex = ArtifactManifest | ArtifactRef
INDEX_DECODER: msgspec.json.Decoder[ArtifactIndex] = msgspec.json.Decoder(ArtifactIndex)


def chunk_key(key: str, sha256: str) -> str:
    """Where a chunk of artifact key lives: content-addressed, so a resend can skip it."""
    return f"{key}.chunks/{sha256}"
