"""Shared helpers for task packs: params, JSONL reading, splitting, duplicates, normalisation."""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from stratosd.api import DataIssue, Example
from stratosd.errors import ConfigError

T = TypeVar("T")

# --- params -------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One accepted task param: its type(s), default and an optional check."""

    types: tuple[type, ...]
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("number" if t is float else t.__name__ for t in types)


def validate_params(
    task: str, params: Mapping[str, Any], spec: Mapping[str, Param]
) -> dict[str, Any]:
    """Params with defaults filled in; ConfigError names an unknown or ill-typed param."""
    unknown = sorted(set(params) - set(spec))
    if unknown:
        allowed = ", ".join(sorted(spec)) or "none"
        raise ConfigError(
            f"task {task!r}: unknown param {unknown[0]!r} (allowed: {allowed})",
            hint="fix the spelling in [task.params] or remove it",
            field=f"task.params.{unknown[0]}",
        )
    out: dict[str, Any] = {}
    for name, p in spec.items():
        value = params.get(name, p.default)
        field = f"task.params.{name}"
        if value is None:
            out[name] = None
            continue
        ok = isinstance(value, p.types) and not (isinstance(value, bool) and bool not in p.types)
        if not ok and float in p.types and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(
                f"task {task!r}: param {name!r} must be {_type_names(p.types)}, "
                f"got {type(value).__name__} {value!r}",
                hint=p.help or f"set {name} to a {_type_names(p.types)}",
                field=field,
            )
        if p.choices is not None and value not in p.choices:
            allowed = ", ".join(repr(c) for c in p.choices)
            raise ConfigError(
                f"task {task!r}: param {name!r} = {value!r} is not allowed (allowed: {allowed})",
                hint=p.help or f"set {name} to one of {allowed}",
                field=field,
            )
        if (p.min is not None and value < p.min) or (p.max is not None and value > p.max):
            raise ConfigError(
                f"task {task!r}: param {name!r} = {value!r} is out of range "
                f"[{p.min if p.min is not None else '-inf'}, "
                f"{p.max if p.max is not None else 'inf'}]",
                hint=p.help or f"choose {name} within the range",
                field=field,
            )
        out[name] = value
    return out


# --- JSONL ----------------------------------------------------------------------------


def read_jsonl(
    path: str | Path, fields: Sequence[str], *, param: str = "path"
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line; ConfigError names file, line and field.

    Field values must be strings or numbers (numbers become strings).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"{path}: no such file (param {param!r})",
            hint="give the path of a JSONL file on the host that runs the step",
            field=f"task.params.{param}",
        )
    rows: list[tuple[int, dict[str, Any]]] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{path} line {lineno} column {exc.colno}: invalid JSON ({exc.msg})",
                    hint="each line must be one JSON object",
                    field=f"task.params.{param}",
                ) from None
            if not isinstance(row, dict):
                raise ConfigError(
                    f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}",
                    hint="each line must be one JSON object",
                    field=f"task.params.{param}",
                )
            for name in fields:
                if name not in row:
                    present = ", ".join(sorted(row)) or "none"
                    raise ConfigError(
                        f'{path} line {lineno}: field "{name}" is missing (fields: {present})',
                        hint="add the field, or name the right one in the task params",
                        field=name,
                    )
                value = row[name]
                if isinstance(value, bool) or not isinstance(value, str | int | float):
                    raise ConfigError(
                        f'{path} line {lineno}: field "{name}" must be a string, '
                        f"got {type(value).__name__}",
                        hint="store the value as a JSON string",
                        field=name,
                    )
                if isinstance(value, int | float):
                    row[name] = str(value)
                elif not value.strip():
                    raise ConfigError(
                        f'{path} line {lineno}: field "{name}" is empty',
                        hint="fill in the value or drop the row",
                        field=name,
                    )
            rows.append((lineno, row))
    if not rows:
        raise ConfigError(
            f"{path}: no rows (param {param!r})",
            hint="the file must hold at least one JSON object per line",
            field=f"task.params.{param}",
        )
    return rows


@dataclass(frozen=True)
class DataFiles:
    """Where a file-backed task's splits come from: one file split by seed, or two files."""

    train: str
    test: str | None
    test_fraction: float
    seed: int
    train_param: str = "path"

    @classmethod
    def from_params(cls, task: str, params: Mapping[str, Any]) -> DataFiles:
        """Resolve `path` | `train_path` (+ `test_path`) | `test_fraction` into a layout."""
        path, train, test = params.get("path"), params.get("train_path"), params.get("test_path")
        if path and (train or test):
            raise ConfigError(
                f"task {task!r}: give either `path` or `train_path`/`test_path`, not both",
                hint="use `path` with `test_fraction`, or two separate files",
                field="task.params.path",
            )
        if not (path or train):
            raise ConfigError(
                f"task {task!r}: no data file (set `path`, or `train_path` and `test_path`)",
                hint="point the task at a JSONL file",
                field="task.params.path",
            )
        if test and not train:
            raise ConfigError(
                f"task {task!r}: `test_path` needs `train_path`",
                hint="set train_path too",
                field="task.params.train_path",
            )
        return cls(
            train=str(path or train),
            test=str(test) if test else None,
            test_fraction=float(params.get("test_fraction") or 0.0),
            seed=int(params.get("seed") or 0),
            train_param="path" if path else "train_path",
        )

    def load(
        self, make: Callable[[str, int, dict[str, Any], str], Example], fields: Sequence[str]
    ) -> dict[str, list[Example]]:
        """Both splits; `make(file, line, row, split)` turns a row into an Example."""
        if self.test:
            rows = {
                "train": read_jsonl(self.train, fields, param="train_path"),
                "test": read_jsonl(self.test, fields, param="test_path"),
            }
            files = {"train": self.train, "test": self.test}
        else:
            train, test = split_by_seed(
                read_jsonl(self.train, fields, param=self.train_param),
                self.test_fraction,
                self.seed,
            )
            rows = {"train": train, "test": test}
            files = {"train": self.train, "test": self.train}
        return {
            split: [make(files[split], n, r, split) for n, r in rows[split]]
            for split in ("train", "test")
        }


# --- splitting, duplicates, overlap ----------------------------------------------------


def split_by_seed(items: Sequence[T], test_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic (train, test) split: shuffle a copy with `seed`, cut off test_fraction."""
    order = list(range(len(items)))
    random.Random(f"split-{seed}").shuffle(order)
    n_test = round(len(items) * test_fraction)
    if test_fraction > 0 and len(items) > 1:
        n_test = min(max(n_test, 1), len(items) - 1)
    test_idx = set(order[:n_test])
    train = [x for i, x in enumerate(items) if i not in test_idx]
    test = [x for i, x in enumerate(items) if i in test_idx]
    return train, test


def find_duplicates(
    examples: Iterable[Example], split: str, key: Callable[[str], str] | None = None
) -> list[DataIssue]:
    """One issue per question that occurs more than once within a split."""
    key = key or normalize_answer
    seen: dict[str, list[Example]] = {}
    for ex in examples:
        seen.setdefault(key(ex.question), []).append(ex)
    issues = []
    for group in seen.values():
        if len(group) < 2:
            continue
        answers = sorted({ex.answer for ex in group})
        conflict = f" with different answers {answers}" if len(answers) > 1 else ""
        issues.append(
            DataIssue(
                kind="duplicate",
                message=f"{split}: question {_short(group[0].question)!r} occurs "
                f"{len(group)} times{conflict}",
                ids=[ex.id for ex in group],
            )
        )
    return issues


def find_overlap(
    train: Iterable[Example], test: Iterable[Example], key: Callable[[str], str] | None = None
) -> list[DataIssue]:
    """One issue per test question that also occurs in train (the test would leak)."""
    key = key or normalize_answer
    by_key: dict[str, list[str]] = {}
    for ex in train:
        by_key.setdefault(key(ex.question), []).append(ex.id)
    issues = []
    for ex in test:
        hits = by_key.get(key(ex.question))
        if hits:
            issues.append(
                DataIssue(
                    kind="overlap",
                    message=f"test question {_short(ex.question)!r} ({ex.id}) is also in train "
                    f"({', '.join(hits)})",
                    ids=[ex.id, *hits],
                )
            )
    return issues


def data_issues(splits: Callable[[], dict[str, list[Example]]]) -> list[DataIssue]:
    """Duplicates per split plus train/test overlap; a malformed file is one issue."""
    try:
        data = splits()
    except ConfigError as exc:
        return [DataIssue(kind="malformed", message=exc.message)]
    issues = find_duplicates(data["train"], "train") + find_duplicates(data["test"], "test")
    return issues + find_overlap(data["train"], data["test"])


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# --- normalisation --------------------------------------------------------------------

_END_PUNCT = string.punctuation + "“”‘’«»。，、！？"
_WS = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Case-fold, collapse whitespace, strip punctuation at both ends."""
    return _WS.sub(" ", text.casefold()).strip().strip(_END_PUNCT).strip()


def last_marker_text(output: str, marker: str = "Answer:") -> str | None:
    """The rest of the line after the last `marker` (case-insensitive), or None."""
    idx = output.lower().rfind(marker.lower())
    if idx < 0:
        return None
    rest = output[idx + len(marker) :].strip()
    return rest.splitlines()[0].strip() if rest else ""
