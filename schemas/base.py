"""Message base class, ids, UTC time, codec singletons and decode_or_error()."""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
ID_PATTERN = r"^[0-9a-hjkmnp-tv-z]{26}$"
_ID_RE = re.compile(ID_PATTERN)
TOKEN_PATTERN = r"^[a-z0-9_-]{1,64}$"
_TOKEN_RE = re.compile(TOKEN_PATTERN)


def new_id() -> str:
    """A lowercase ULID: 48-bit ms timestamp + 80 random bits, sortable by creation time."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def is_id(value: str) -> bool:
    """True when value is a lowercase ULID usable as a subject token."""
    return bool(_ID_RE.match(value))


def is_token(value: str) -> bool:
    """True when value is a valid subject token ([a-z0-9_-], at most 64 chars)."""
    return bool(_TOKEN_RE.match(value))


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every wire message: a unique id, a UTC timestamp and the sender."""

    id: str = msgspec.field(default_factory=new_id)
    ts: datetime = msgspec.field(default_factory=utc_now)
    source: str = ""


ENCODER = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    """Encode a Struct (or plain data) as JSON bytes."""
    return ENCODER.encode(obj)


T = TypeVar("T")

_PATH_RE = re.compile(r"^(?P<reason>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.S)


def decode_or_error(decoder: msgspec.json.Decoder[T], data: bytes) -> T:
    """Decode data or raise BadMessage naming the field and what was wrong with it."""
    from stratosd.errors import BadMessage

    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        m = _PATH_RE.match(str(exc))
        reason = m.group("reason") if m else str(exc)
        path = (m.group("path") if m else None) or "$"
        field = path[2:] if path.startswith("$.") else path
        raise BadMessage(field=field, reason=reason) from None
    except msgspec.DecodeError as exc:
        raise BadMessage(field="$", reason=f"not valid JSON: {exc}") from None


def to_builtins(obj: Any) -> Any:
    """Structs → dicts/lists of JSON-able values."""
    return msgspec.to_builtins(obj)
