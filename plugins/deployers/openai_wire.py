"""The OpenAI wire format the built-in server speaks: errors, request fields, usage.

Errors are OpenAI-shaped (`{"error": {message, type, param, code}}`) and name the request
field that was wrong; `field_value` checks a field's type and range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
FAULT_TYPES = {
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "overloaded"),
}


class ApiError(Exception):
    """An OpenAI-shaped error reply."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, err_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, err_type)

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def field_value(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...],
                default: Any, *, lo: float | None = None, hi: float | None = None) -> Any:
    """body[name] (default when absent or null); 400 naming the field on a bad type or range."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ApiError(400, f"`{name}` has the wrong type: {value!r}", param=name)
    number: float = value if isinstance(value, int | float) else 0.0
    if lo is not None and number < lo or hi is not None and number > hi:
        raise ApiError(400, f"`{name}` must be between {lo} and {hi}, got {value!r}", param=name)
    return value


def message_text(message: Any, i: int) -> str:
    """The text of chat message i (a string, or a list of text parts); 400 otherwise."""
    if not isinstance(message, dict):
        raise ApiError(400, f"`messages[{i}]` must be an object", param=f"messages[{i}]")
    if message.get("role") not in ROLES:
        raise ApiError(400, f"`messages[{i}].role` must be one of {', '.join(ROLES)}",
                       param=f"messages[{i}].role")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"`messages[{i}].content` must be a string or a list of text parts",
                   param=f"messages[{i}].content")


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """The request's messages as `{role, content}` strings; 400 naming the bad field."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    contents = [message_text(m, i) for i, m in enumerate(messages)]  # validates each first
    return [{"role": m["role"], "content": c} for m, c in zip(messages, contents, strict=True)]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """text up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def usage_of(outs: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The `usage` object for generated outputs (token counts summed)."""
    prompt = sum(int(o.get("prompt_tokens", 0)) for o in outs)
    completion = sum(int(o.get("completion_tokens", 0)) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
