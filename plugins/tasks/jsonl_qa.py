"""Any question/answer data as a task: Q/A, OpenAI messages, ShareGPT or Alpaca rows.

Rows come from files (`path`, or `train_path` + `test_path`: JSONL, JSON, CSV, Parquet) or
from `datasets` (`dataset`: a Hub id from the local cache, offline, or a local directory);
see plugins.tasks.sources. Each row's format is detected from the first valid row of its
source, or set with `format`; plugins.tasks.formats turns rows into questions and targets.

A bad row (unreadable, wrong shape, empty field) is an error naming file, line and field; with
`on_bad_row = "skip"` it is counted, logged (`task_rows_skipped`), kept in `stats()` and
reported by `check_data()` — never dropped silently.

Gold answers use the same extraction as model outputs: a chat target with an `Answer:` line
(or an `extract_regex` match) has that answer as gold and the text before it as the example's
reference reasoning; otherwise the whole target is the gold answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog

from plugins.tasks.base import (
    Param,
    data_issues,
    last_marker_text,
    normalize_answer,
    split_by_seed,
    validate_params,
)
from plugins.tasks.formats import (
    DEFAULT_FIELDS,
    FORMATS,
    BadRow,
    Record,
    RowProblem,
    Where,
    detect,
    parse,
    undetected,
)
from plugins.tasks.sources import Source, iter_rows, open_dataset, sources_from_params
from stratosd import hookimpl
from stratosd.api import DataIssue, Example, Split, TaskPack
from stratosd.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)

MARKER = "Answer:"
_ANSWER_LINE = re.compile(r"(?im)^[ \t]*(?:final[ \t]+)?answer:")
_SHOWN_BAD_ROWS = 5


@dataclass(frozen=True)
class SourceStats:
    """What was read from one source: its format, rows used, bad rows skipped."""

    source: str
    format: str | None
    rows: int
    skipped: int
    bad: tuple[str, ...] = ()  # the first skipped rows' messages


@dataclass(frozen=True)
class DataStats:
    """What the task read, per source, and how answers are extracted."""

    sources: tuple[SourceStats, ...]
    answer_span: str

    @property
    def rows(self) -> int:
        """Rows used, all sources."""
        return sum(s.rows for s in self.sources)

    @property
    def skipped(self) -> int:
        """Bad rows skipped (on_bad_row = "skip"), all sources."""
        return sum(s.skipped for s in self.sources)


class JsonlQaTask(TaskPack):
    """Question/answer rows in any of four formats; no verifier, reasoning from the data."""

    name: ClassVar[str] = "jsonl-qa"
    description: ClassVar[str] = (
        "question/answer data: Q/A, OpenAI messages, ShareGPT or Alpaca rows from "
        "JSONL/JSON/CSV/Parquet files or `datasets` (exact or normalised match)"
    )
    PARAMS: ClassVar[dict[str, Param]] = {
        "path": Param((str,), None, "one data file, split by test_fraction and seed"),
        "train_path": Param((str,), None, "training data file (with test_path)"),
        "test_path": Param((str,), None, "test data file (with train_path)"),
        "dataset": Param(
            (str,),
            None,
            "a Hub dataset id (read offline from the local cache) or a "
            "directory written by save_to_disk or holding data files",
        ),
        "dataset_config": Param((str,), None, "the dataset's configuration name"),
        "train_split": Param((str,), "train", "the dataset split to train on"),
        "test_split": Param((str,), None, "the dataset split to test on (else test_fraction)"),
        "cache_dir": Param(
            (str,),
            None,
            "Hugging Face cache root (datasets/ and hub/ under it; default: HF_HOME's)",
        ),
        "test_fraction": Param(
            (float,), 0.2, "share of `path` held out for test", min=0.01, max=0.9
        ),
        "seed": Param((int,), 0, "seed of the train/test split"),
        "format": Param(
            (str,),
            "auto",
            "row format: auto (from the first valid row), messages, sharegpt, alpaca or qa",
            choices=("auto", *FORMATS),
        ),
        "fields": Param(
            (dict,),
            None,
            'field names in the data, e.g. {question = "prompt", answer = '
            f'"completion"}} (keys: {", ".join(DEFAULT_FIELDS)})',
        ),
        "question_field": Param((str,), None, "name of the question field (fields.question)"),
        "answer_field": Param((str,), None, "name of the answer field (fields.answer)"),
        "on_bad_row": Param(
            (str,),
            "error",
            "error: stop at the first bad row; skip: count, log and report bad rows",
            choices=("error", "skip"),
        ),
        "match": Param(
            (str,),
            "normalized",
            "exact, or normalized (case, spaces, end punctuation ignored)",
            choices=("exact", "normalized"),
        ),
        "extract_regex": Param(
            (str,),
            None,
            "regex whose first group is the answer in a "
            "model's output (no match: the text after the last `Answer:`)",
        ),
        "answer_span": Param(
            (str,),
            "auto",
            "what follows the last `Answer:`: line (to the end of its line), "
            "rest (to the end), auto (rest when a gold answer spans lines)",
            choices=("auto", "line", "rest"),
        ),
    }

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self.cfg = validate_params(self.name, self.params, self.PARAMS)
        self.fields, self._qa_mapped = _field_map(self.name, self.cfg)
        self.train_source, self.test_source = sources_from_params(self.name, self.cfg)
        self._regex = _compile(self.cfg["extract_regex"])
        self._span: str | None = (
            None if self.cfg["answer_span"] == "auto" else self.cfg["answer_span"]
        )
        self._splits: dict[str, list[Example]] | None = None
        self._stats: DataStats | None = None
        self._reasoning: dict[tuple[str, str], str] = {}

    # --- data ---------------------------------------------------------------------------

    def _load(self) -> dict[str, list[Example]]:
        if self._splits is None:
            opened = open_dataset(self.train_source) if self.train_source.split else None
            stats = []
            train, s = self._read(self.train_source, opened)
            stats.append(s)
            if self.test_source is not None:
                test, s = self._read(self.test_source, opened)
                stats.append(s)
            else:
                train, test = split_by_seed(train, self.cfg["test_fraction"], self.cfg["seed"])
            golds = {
                "train": [self._gold(r) for _, r in train],
                "test": [self._gold(r) for _, r in test],
            }
            if self._span is None:
                multiline = any("\n" in a for g in golds.values() for a, _ in g)
                self._span = "rest" if multiline else "line"
            splits: dict[str, list[Example]] = {}
            for split, rows in (("train", train), ("test", test)):
                splits[split] = [
                    self._example(split, where, rec, answer, reasoning)
                    for (where, rec), (answer, reasoning) in zip(rows, golds[split], strict=True)
                ]
            self._stats = DataStats(tuple(stats), self._span)
            self._splits = splits
        return self._splits

    def _read(
        self, src: Source, opened: dict[str, Any] | None
    ) -> tuple[list[tuple[Where, Record]], SourceStats]:
        """The usable rows of one source; bad rows raise or are counted (on_bad_row)."""
        fmt: str | None = None if self.cfg["format"] == "auto" else self.cfg["format"]
        fields = self.fields
        rows: list[tuple[Where, Record]] = []
        bad: list[BadRow] = []
        for where, row in iter_rows(src, opened):
            if isinstance(row, BadRow):
                result: Record | BadRow = row
            elif fmt is None:
                found = detect(row, fields, self._qa_mapped)
                result = (
                    _parse(where, found[0], row, found[1])
                    if found
                    else BadRow.of(where, undetected(row, fields))
                )
                if found and isinstance(result, Record):  # the first valid row decides
                    fmt, fields = found
                    log.debug(
                        "task_format_detected",
                        task=self.name,
                        source=src.label,
                        format=fmt,
                        where=str(where),
                    )
            else:
                result = _parse(where, fmt, row, fields)
            if isinstance(result, Record):
                rows.append((where, result))
            elif self.cfg["on_bad_row"] == "error":
                raise result
            else:
                bad.append(result)
        shown = tuple(b.message for b in bad[:_SHOWN_BAD_ROWS])
        stats = SourceStats(src.label, fmt, len(rows), len(bad), shown)
        log.info(
            "task_data_loaded",
            task=self.name,
            source=src.label,
            format=fmt,
            rows=len(rows),
            skipped=len(bad),
        )
        if bad:
            log.warning(
                "task_rows_skipped",
                task=self.name,
                source=src.label,
                skipped=len(bad),
                first=list(shown),
            )
        if not rows:
            also = f"; all {len(bad)} rows were bad, first: {bad[0].message}" if bad else ""
            raise ConfigError(
                f"{src.label}: no rows (param {src.param!r}){also}",
                hint="the data must hold at least one usable row",
                field=f"task.params.{src.param}",
            )
        return rows, stats

    def _gold(self, rec: Record) -> tuple[str, str | None]:
        """(gold answer, reasoning or None): a chat target is read like a model's output."""
        target = rec.target
        if rec.format == "qa":
            return target, None
        if self._regex is not None:
            matches = list(self._regex.finditer(target))
            if matches and matches[-1].group(1).strip():
                m = matches[-1]
                return m.group(1).strip(), target[: m.start()].strip() or None
        lines = list(_ANSWER_LINE.finditer(target))
        answer = after_marker(target, self._span or "line") if lines else None
        if answer:
            return answer, target[: lines[-1].start()].strip() or None
        return target, None

    def _example(
        self, split: str, where: Where, rec: Record, answer: str, reasoning: str | None
    ) -> Example:
        if reasoning:
            self._reasoning[(normalize_answer(rec.question), normalize_answer(answer))] = reasoning
        meta = {**where.meta(), "format": rec.format}
        if rec.source_id is not None:
            meta["source_id"] = rec.source_id
        return Example(
            id=f"qa-{split}-{where.number}", question=rec.question, answer=answer, meta=meta
        )

    def examples(self, split: Split) -> list[Example]:
        """The rows of the split (the data is read once)."""
        return self._load()[split]

    def stats(self) -> DataStats:
        """Per source: format, rows used and bad rows skipped (reads the data if needed)."""
        self._load()
        assert self._stats is not None
        return self._stats

    def check_data(self) -> list[DataIssue]:
        """Bad rows skipped, duplicate questions in a split, questions in both splits."""
        issues = data_issues(self._load)
        for s in self._stats.sources if self._stats else ():
            if s.skipped:
                issues.append(
                    DataIssue(
                        kind="malformed",
                        message=f"{s.source}: {s.skipped} bad row(s) skipped (on_bad_row = "
                        f"'skip'); first: {' | '.join(s.bad)}",
                    )
                )
        return issues

    def reference_reasoning(self, question: str, answer: str) -> str | None:
        """The reasoning a chat target wrote before its `Answer:` line, when it has one."""
        self._load()
        return self._reasoning.get((normalize_answer(question), normalize_answer(answer)))

    # --- answers ---------------------------------------------------------------------------

    def answer_span(self) -> str:
        """`line` or `rest`: how much after the last `Answer:` is the answer."""
        if self._span is None:
            self._load()
        assert self._span is not None
        return self._span

    def extract(self, output: str) -> str | None:
        """extract_regex's first group (last match); else the text after the last `Answer:`."""
        text: str | None = None
        matches = list(self._regex.finditer(output)) if self._regex is not None else []
        if matches:
            text = matches[-1].group(1)
        else:
            text = after_marker(output, self.answer_span())
        if text is None or not text.strip():
            return None
        return text.strip()

    def score(self, predicted: str | None, gold: str) -> float:
        """Exact or normalised string match, per the `match` param."""
        if predicted is None:
            return 0.0
        if self.cfg["match"] == "exact":
            return 1.0 if predicted.strip() == gold.strip() else 0.0
        return 1.0 if normalize_answer(predicted) == normalize_answer(gold) else 0.0


def after_marker(text: str, span: str) -> str | None:
    """What follows the last `Answer:` (case-insensitive): its line, or the rest of the text."""
    if span == "line":
        return last_marker_text(text, MARKER)
    idx = text.lower().rfind(MARKER.lower())
    return None if idx < 0 else text[idx + len(MARKER) :].strip()


def _parse(
    where: Where, fmt: str, row: Mapping[str, Any], fields: Mapping[str, str]
) -> Record | BadRow:
    try:
        return parse(fmt, row, fields)
    except RowProblem as problem:
        return BadRow.of(where, problem)


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"task 'jsonl-qa': param 'extract_regex' is not a valid regex ({exc})",
            hint="fix the pattern (TOML: use a literal '...' string)",
            field="task.params.extract_regex",
        ) from None
    if regex.groups < 1:
        raise ConfigError(
            "task 'jsonl-qa': param 'extract_regex' needs a capture group",
            hint="wrap the answer part in ( )",
            field="task.params.extract_regex",
        )
    return regex


def _field_map(task: str, cfg: Mapping[str, Any]) -> tuple[dict[str, str], bool]:
    """(canonical → data field names, whether question/answer were named explicitly)."""
    given: dict[str, str] = {}
    for key, value in (cfg["fields"] or {}).items():
        field = f"task.params.fields.{key}"
        if key not in DEFAULT_FIELDS:
            raise ConfigError(
                f"task {task!r}: param 'fields' has unknown key {key!r} "
                f"(allowed: {', '.join(DEFAULT_FIELDS)})",
                hint="map a canonical name to the name in your data, e.g. "
                'fields = {question = "prompt"}',
                field=field,
            )
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"task {task!r}: fields.{key} must be a non-empty string, got {value!r}",
                hint="give the field's name in the data",
                field=field,
            )
        given[key] = value
    for param, key in (("question_field", "question"), ("answer_field", "answer")):
        value = cfg[param]
        if value is None:
            continue
        if given.get(key, value) != value:
            raise ConfigError(
                f"task {task!r}: {param} = {value!r} contradicts fields.{key} = {given[key]!r}",
                hint=f"keep one of them (fields.{key} is preferred)",
                field=f"task.params.{param}",
            )
        given[key] = value
    qa_mapped = "question" in given or "answer" in given
    return {**DEFAULT_FIELDS, **given}, qa_mapped


@hookimpl
def stratos_tasks() -> list[type[TaskPack]]:
    """Register the generic question/answer task pack."""
    return [JsonlQaTask]
