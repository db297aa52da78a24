"""Row formats of task data: OpenAI messages, ShareGPT, Alpaca and question/answer rows.

Every row becomes a `Record`: the question, the target (the text the data says is the answer)
and the format it was read as. Chat rows keep their context: the turns before the last
assistant message are rendered into the question as labelled blocks (`System: ...`,
`User: ...`, `Assistant: ...`, `Tool result (name): ...`); a single user turn stays as it is.
Tool calls and tool results in earlier turns are context like any other turn; a conversation
that *ends* in a tool call has no text answer and is a bad row.

Parsers know nothing about files: they raise `RowProblem(field, reason, hint)`, and the
reader turns it into a `BadRow` that names the file and line (or dataset row) as well.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stratosd.errors import ConfigError

FORMATS: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "qa")
# canonical field → the name in the data; `fields = {question = "prompt"}` overrides one
DEFAULT_FIELDS: dict[str, str] = {
    "question": "question",
    "answer": "answer",
    "messages": "messages",
    "conversations": "conversations",
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "system": "system",
    "history": "history",
}
# OpenAI's legacy fine-tuning rows; recognised as qa unless question/answer were mapped
LEGACY_QA = {"question": "prompt", "answer": "completion"}

_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}
_FROM = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "call",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
_LABELS = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool result"}


@dataclass(frozen=True)
class Where:
    """Where a row came from: a file line (JSONL, CSV) or a row number (datasets, arrays)."""

    source: str
    line: int | None = None
    row: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        col = f" column {self.column}" if self.column is not None else ""
        if self.line is not None:
            return f"{self.source} line {self.line}{col}"
        return f"{self.source} row {self.row}{col}"

    @property
    def number(self) -> int:
        """The line, else the row number (1-based), used in example ids."""
        return self.line if self.line is not None else int(self.row or 0)

    def meta(self) -> dict[str, Any]:
        """The location as Example.meta entries."""
        if self.line is not None:
            return {"file": self.source, "line": self.line}
        return {"file": self.source, "row": self.row}


class RowProblem(Exception):
    """A row cannot be used; raised by the parsers, which do not know where the row is."""

    def __init__(self, field: str, reason: str, hint: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason
        self.hint = hint


class BadRow(ConfigError):
    """One row of task data cannot be used: the message names the file, line and field."""

    def __init__(self, where: Where, reason: str, *, field: str | None, hint: str) -> None:
        super().__init__(f"{where}: {reason}", hint=hint, field=field)
        self.where = where
        self.reason = reason

    @classmethod
    def of(cls, where: Where, problem: RowProblem) -> BadRow:
        """A RowProblem at a known place."""
        return cls(where, problem.reason, field=problem.field, hint=problem.hint)


@dataclass(frozen=True)
class Record:
    """One usable row: the question (with any context), the target text and the format."""

    question: str
    target: str
    format: str
    source_id: str | None = None


@dataclass(frozen=True)
class Turn:
    """One conversation turn, roles normalised to system/user/assistant/tool."""

    role: str
    text: str
    calls: tuple[str, ...] = ()
    name: str | None = None
    index: int | None = None  # position in the conversation list (None: a top-level system)


# --- detection -------------------------------------------------------------------------


def detect(
    row: Mapping[str, Any], fields: Mapping[str, str], qa_mapped: bool = False
) -> tuple[str, dict[str, str]] | None:
    """(format, fields to parse with) for a row, or None when it fits no format.

    A `messages`/`conversations` list decides by its first entry's keys (`role`/`content`:
    messages; `from`/`value`: sharegpt); then `instruction` + `output` (alpaca); then
    `question` + `answer`, or OpenAI's legacy `prompt` + `completion` (qa); then a format
    of which the row has some field (parsing it names the field that is missing).
    """
    for key in (fields["messages"], fields["conversations"]):
        value = row.get(key)
        if isinstance(value, list):
            first = value[0] if value and isinstance(value[0], Mapping) else {}
            if "from" in first or "value" in first:
                return "sharegpt", dict(fields)
            if "role" in first or "content" in first:
                return "messages", dict(fields)
            return ("messages" if key == fields["messages"] else "sharegpt"), dict(fields)
    if fields["instruction"] in row and fields["output"] in row:
        return "alpaca", dict(fields)
    if fields["question"] in row and fields["answer"] in row:
        return "qa", dict(fields)
    if not qa_mapped and all(name in row for name in LEGACY_QA.values()):
        return "qa", {**fields, **LEGACY_QA}
    # a partial match: the format's parser then names the field that is wrong or missing
    for fmt, keys in _PARTIAL:
        if any(fields[k] in row for k in keys):
            return fmt, dict(fields)
    return None


_PARTIAL = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("qa", ("question", "answer")),
)


def undetected(row: Mapping[str, Any], fields: Mapping[str, str]) -> RowProblem:
    """The problem for a row that fits no format (names the fields it has)."""
    present = ", ".join(sorted(map(str, row))) or "none"
    return RowProblem(
        fields["messages"],
        f"row fits no known format (fields: {present}); expected "
        f'"{fields["messages"]}" (OpenAI messages), "{fields["conversations"]}" (ShareGPT), '
        f'"{fields["instruction"]}" + "{fields["output"]}" (Alpaca) or '
        f'"{fields["question"]}" + "{fields["answer"]}"',
        'set `format` and map the field names with `fields = {question = "...", ...}`',
    )


# --- parsing -----------------------------------------------------------------------------


def parse(fmt: str, row: Mapping[str, Any], fields: Mapping[str, str]) -> Record:
    """The Record of a row in format `fmt`; RowProblem names the field that is wrong."""
    source_id = row.get("id")
    sid = str(source_id) if isinstance(source_id, str | int) and source_id != "" else None
    if fmt == "qa":
        question = _text(row, fields["question"], required=True)
        answer = _text(row, fields["answer"], required=True)
        return Record(question=question.strip(), target=answer.strip(), format=fmt, source_id=sid)
    if fmt == "alpaca":
        return _alpaca(row, fields, sid)
    key = _container(row, fields, fmt)
    turns = _openai_turns(row, key) if fmt == "messages" else _sharegpt_turns(row, key, fields)
    question, target = _finish(turns, key, "content" if fmt == "messages" else "value")
    return Record(question=question, target=target, format=fmt, source_id=sid)


def render_question(turns: Sequence[Turn]) -> str:
    """The question text of the turns before the answer: one user turn as is, else blocks."""
    if len(turns) == 1 and turns[0].role == "user":
        return turns[0].text.strip()
    blocks = []
    for t in turns:
        label = _LABELS[t.role] + (f" ({t.name})" if t.role == "tool" and t.name else "")
        body = t.text.strip()
        keep = body or (not t.calls and t.role != "system")  # an empty turn is still a turn
        lines = [f"{label}: {body}".rstrip()] if keep else []
        lines += [f"Assistant called {call}" for call in t.calls]
        if lines:
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def _text(row: Mapping[str, Any], name: str, *, required: bool, path: str | None = None) -> str:
    """A string field (numbers become strings); required ones must be present and non-empty."""
    path = path or name
    if name not in row:
        if not required:
            return ""
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowProblem(
            name,
            f'field "{path}" is missing (fields: {present})',
            "add the field, or name the right one in the task params (`fields`)",
        )
    value = row[name]
    if value is None and not required:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RowProblem(
            path,
            f'field "{path}" must be a string, got {_kind(value)}',
            "store the value as a JSON string",
        )
    text = str(value)
    if required and not text.strip():
        raise RowProblem(path, f'field "{path}" is empty', "fill in the value or drop the row")
    return text


def _alpaca(row: Mapping[str, Any], fields: Mapping[str, str], sid: str | None) -> Record:
    instruction = _text(row, fields["instruction"], required=True)
    extra = _text(row, fields["input"], required=False).strip()
    output = _text(row, fields["output"], required=True)
    turns = [Turn("system", _text(row, fields["system"], required=False))]
    history = row.get(fields["history"])
    if history is not None:
        if not isinstance(history, list):
            raise RowProblem(
                fields["history"],
                f'field "{fields["history"]}" must be a list of [question, answer]'
                f" pairs, got {_kind(history)}",
                "fix or remove the history",
            )
        for i, pair in enumerate(history):
            at = f"{fields['history']}[{i}]"
            if not (
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            ):
                raise RowProblem(
                    at,
                    f'field "{at}" must be a [question, answer] pair of strings',
                    "fix or remove the history entry",
                )
            turns += [Turn("user", pair[0]), Turn("assistant", pair[1])]
    user = instruction.strip() + (f"\n\n{extra}" if extra else "")
    question = render_question(
        [t for t in turns if t.role != "system" or t.text.strip()] + [Turn("user", user)]
    )
    return Record(question=question, target=output.strip(), format="alpaca", source_id=sid)


def _container(row: Mapping[str, Any], fields: Mapping[str, str], fmt: str) -> str:
    """The field holding the conversation (either name may hold either shape)."""
    for key in (fields["messages"], fields["conversations"]):
        if isinstance(row.get(key), list):
            return key
    key = fields["messages"] if fmt == "messages" else fields["conversations"]
    if key not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowProblem(
            key,
            f'field "{key}" is missing (fields: {present})',
            "add the conversation, or map its name with `fields`",
        )
    raise RowProblem(
        key,
        f'field "{key}" must be a list of messages, got {_kind(row[key])}',
        "store the conversation as a JSON list",
    )


def _entry(msgs: list[Any], key: str, i: int, needs: str) -> Mapping[str, Any]:
    m = msgs[i]
    if not isinstance(m, Mapping):
        raise RowProblem(
            f"{key}[{i}]",
            f'field "{key}[{i}]" must be an object with {needs}, got {_kind(m)}',
            "fix the message",
        )
    return m


def _content(value: Any, at: str) -> str:
    """A message's text: a string, null (a tool call), or a list of text parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if isinstance(part, str):
                parts.append(part)
            elif (
                isinstance(part, Mapping)
                and part.get("type", "text") == "text"
                and isinstance(part.get("text"), str)
            ):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else _kind(part)
                raise RowProblem(
                    f"{at}[{j}]",
                    f'field "{at}[{j}]" is a {kind!r} part; only text content is supported',
                    "drop the non-text parts",
                )
        return "".join(parts)
    raise RowProblem(
        at,
        f'field "{at}" must be a string or a list of text parts, got {_kind(value)}',
        "store the message text as a string",
    )


def _call_text(call: Any, at: str) -> tuple[str, str]:
    """(name, `name(arguments)`) of an OpenAI tool/function call."""
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise RowProblem(
            at, f'field "{at}" must be a call with a function name', "fix the tool call"
        )
    assert isinstance(fn, Mapping)
    args = fn.get("arguments")
    if args is not None and not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False, sort_keys=True)
    return name, f"{name}({args or ''})"


def _openai_turns(row: Mapping[str, Any], key: str) -> list[Turn]:
    msgs: list[Any] = row[key]
    turns: list[Turn] = []
    call_names: dict[str, str] = {}
    for i in range(len(msgs)):
        m = _entry(msgs, key, i, '"role" and "content"')
        at = f"{key}[{i}]"
        raw_role = m.get("role")
        role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise RowProblem(
                f"{at}.role",
                f'field "{at}.role" is {raw_role!r}; expected '
                "system, developer, user, assistant or tool",
                "fix the role",
            )
        calls: list[str] = []
        if role == "assistant":
            raw_calls = m.get("tool_calls") or []
            if not isinstance(raw_calls, list):
                raise RowProblem(
                    f"{at}.tool_calls",
                    f'field "{at}.tool_calls" must be a list, got {_kind(raw_calls)}',
                    "fix the tool calls",
                )
            if m.get("function_call"):
                raw_calls = [*raw_calls, m["function_call"]]
            for j, call in enumerate(raw_calls):
                fn_name, call_text = _call_text(call, f"{at}.tool_calls[{j}]")
                if isinstance(call, Mapping) and isinstance(call.get("id"), str):
                    call_names[call["id"]] = fn_name
                calls.append(call_text)
            if i == len(msgs) - 1 and m.get("weight") == 0:
                raise RowProblem(
                    f"{at}.weight",
                    f'field "{at}.weight" is 0: the data marks '
                    "the last assistant message as not to be learned",
                    "end the conversation with a reply to learn (weight 1)",
                )
        raw_name = m.get("name")
        name: str | None = raw_name if isinstance(raw_name, str) else None
        if role == "tool" and name is None and isinstance(m.get("tool_call_id"), str):
            name = call_names.get(m["tool_call_id"])
        text = _content(m.get("content"), f"{at}.content")
        turns.append(Turn(role, text, tuple(calls), name, i))
    return turns


def _sharegpt_turns(row: Mapping[str, Any], key: str, fields: Mapping[str, str]) -> list[Turn]:
    msgs: list[Any] = row[key]
    system = _text(row, fields["system"], required=False)
    turns = [Turn("system", system)] if system.strip() else []
    for i in range(len(msgs)):
        m = _entry(msgs, key, i, '"from" and "value"')
        at = f"{key}[{i}]"
        src = m.get("from")
        role = _FROM.get(src) if isinstance(src, str) else None
        if role is None:
            raise RowProblem(
                f"{at}.from",
                f'field "{at}.from" is {src!r}; expected human, gpt '
                "or system (also user, assistant, function_call, observation)",
                "fix the speaker",
            )
        value = m.get("value")
        if value is not None and not isinstance(value, str):
            raise RowProblem(
                f"{at}.value",
                f'field "{at}.value" must be a string, got {_kind(value)}',
                "store the message text as a string",
            )
        text = value or ""
        if role == "call":
            turns.append(Turn("assistant", "", (text.strip(),), index=i))
        else:
            raw_name = m.get("name")
            name = raw_name if role == "tool" and isinstance(raw_name, str) else None
            turns.append(Turn(role, text, name=name, index=i))
    return turns


def _finish(turns: list[Turn], key: str, text_field: str) -> tuple[str, str]:
    """(question, target): the last message must be the assistant's text answer."""
    if not turns or (len(turns) == 1 and turns[0].role == "system"):
        raise RowProblem(key, f'field "{key}" has no messages', "drop the row")
    last = turns[-1]
    at = f"{key}[{last.index}]"
    if last.role != "assistant":
        raise RowProblem(
            f"{at}",
            f'field "{at}" is a {last.role} message; the last message '
            "must be the assistant's answer",
            "end each conversation with the assistant reply to learn from",
        )
    if last.calls:
        raise RowProblem(
            at,
            f'field "{at}" is a tool call; the last assistant message must be a text answer',
            "end the conversation with the final text reply",
        )
    if not last.text.strip():
        raise RowProblem(
            f"{at}.{text_field}",
            f'field "{at}.{text_field}" is empty',
            "fill in the reply or drop the row",
        )
    context = turns[:-1]
    users = [t for t in context if t.role == "user"]
    if not users:
        raise RowProblem(
            key,
            f'field "{key}" has no user message before the last assistant message',
            "start the conversation with the user's question",
        )
    question = render_question(context)
    if not question.strip():
        at = f"{key}[{users[-1].index}].{text_field}"
        raise RowProblem(at, f'field "{at}" is empty', "fill in the question or drop the row")
    return question, last.text.strip()
