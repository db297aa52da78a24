"""ErrorReply and its codes: what any command handler answers when it cannot do the work."""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.base import Message

ErrorCode = Literal[
    "bad_message",
    "config",
    "plugin",
    "bus_unavailable",
    "agent_unavailable",
    "agent_incompatible",
    "job_failed",
    "remote",
    "missing_dependency",
    "not_found",
    "conflict",
    "infeasible",
    "unsupported",
    "internal",
]


class ErrorReply(Message, frozen=True, kw_only=True, tag="error_reply"):
    """A command was refused or failed; message says what, hint says what to do."""

    code: ErrorCode | str
    message: str
    hint: str = ""
    field: str | None = None


ERROR_DECODER = msgspec.json.Decoder(ErrorReply)
