"""Any question/answer JSONL as a task: configurable field names, exact or normalised match."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from plugins.tasks.base import (
    DataFiles,
    Param,
    data_issues,
    last_marker_text,
    normalize_answer,
    validate_params,
)
from stratosd import hookimpl
from stratosd.api import DataIssue, Example, Split, TaskPack
from stratosd.errors import ConfigError


class JsonlQaTask(TaskPack):
    """Question/answer pairs from JSONL files; no verifier, no reference reasoner."""

    name: ClassVar[str] = "jsonl-qa"
    description: ClassVar[str] = "any question/answer JSONL (exact or normalised match)"
    PARAMS: ClassVar[dict[str, Param]] = {
        "path": Param((str,), None, "one JSONL file, split by test_fraction and seed"),
        "train_path": Param((str,), None, "training JSONL (with test_path)"),
        "test_path": Param((str,), None, "test JSONL (with train_path)"),
        "test_fraction": Param(
            (float,), 0.2, "share of `path` held out for test", min=0.01, max=0.9
        ),
        "seed": Param((int,), 0, "seed of the train/test split"),
        "question_field": Param((str,), "question", "name of the question field"),
        "answer_field": Param((str,), "answer", "name of the answer field"),
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
            "model's output (default: the text after the last `Answer:`)",
        ),
    }

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self.cfg = validate_params(self.name, self.params, self.PARAMS)
        self.files = DataFiles.from_params(self.name, self.cfg)
        self._regex: re.Pattern[str] | None = None
        if self.cfg["extract_regex"]:
            try:
                self._regex = re.compile(self.cfg["extract_regex"])
            except re.error as exc:
                raise ConfigError(
                    f"task 'jsonl-qa': param 'extract_regex' is not a valid regex ({exc})",
                    hint="fix the pattern (TOML: use a literal '...' string)",
                    field="task.params.extract_regex",
                ) from None
            if self._regex.groups < 1:
                raise ConfigError(
                    "task 'jsonl-qa': param 'extract_regex' needs a capture group",
                    hint="wrap the answer part in ( )",
                    field="task.params.extract_regex",
                )
        self._splits: dict[str, list[Example]] | None = None

    def _load(self) -> dict[str, list[Example]]:
        if self._splits is None:
            q, a = self.cfg["question_field"], self.cfg["answer_field"]

            def make(file: str, line: int, row: dict[str, Any], split: str) -> Example:
                return Example(
                    id=f"qa-{split}-{line}",
                    question=row[q].strip(),
                    answer=row[a].strip(),
                    meta={"line": line, "file": file},
                )

            self._splits = self.files.load(make, (q, a))
        return self._splits

    def examples(self, split: Split) -> list[Example]:
        """The rows of the split (the file is read once)."""
        return self._load()[split]

    def check_data(self) -> list[DataIssue]:
        """Malformed rows, duplicate questions in a split, questions in both splits."""
        return data_issues(self._load)

    def extract(self, output: str) -> str | None:
        """extract_regex's first group (last match), else the text after the last `Answer:`."""
        if self._regex is not None:
            matches = list(self._regex.finditer(output))
            text = matches[-1].group(1) if matches else None
        else:
            text = last_marker_text(output)
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


@hookimpl
def stratos_tasks() -> list[type[TaskPack]]:
    """Register the generic question/answer JSONL task pack."""
    return [JsonlQaTask]
