"""Trainer data: synthesis rows (DataRow JSONL) into tokenized examples and a Dataset.

A bad line names its number. Each row is rendered by `plugins.models.prompting` (the same
rendering the endpoint and evaluation use): the user turn is the task's forward prompt, the
completion the row's target in the assistant turn (chat template) or target + eos (plain),
and the loss mask covers the completion only. `datasets` is imported inside functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from plugins.models import prompting
from stratosd.api import DataRow, TaskPack
from stratosd.errors import ConfigError

_ROW_DECODER = msgspec.json.Decoder(DataRow)


def read_rows(path: Path) -> list[DataRow]:
    """DataRows from a synthesis JSONL file (one per line); a bad line names its number."""
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ConfigError(f"dataset directory {str(path)!r} holds no .jsonl file",
                              hint="pass the synthesis step's `dataset` artifact",
                              field="inputs.dataset")
        path = files[0]
    if not path.is_file():
        raise ConfigError(f"dataset file {str(path)!r} does not exist",
                          hint="pass the synthesis step's `dataset` artifact",
                          field="inputs.dataset")
    rows: list[DataRow] = []
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(_ROW_DECODER.decode(line))
            except msgspec.ValidationError as exc:
                raise ConfigError(f"dataset {path.name} line {lineno}: {exc}",
                                  hint="each line must be one DataRow (see stratosd.api)",
                                  field="inputs.dataset") from exc
            except msgspec.DecodeError as exc:
                raise ConfigError(f"dataset {path.name} line {lineno} is not JSON: {exc}",
                                  hint="each line must be one JSON object",
                                  field="inputs.dataset") from exc
    if not rows:
        raise ConfigError(f"dataset {path.name} is empty", field="inputs.dataset",
                          hint="synthesis produced no rows; check the teacher and the mode")
    return rows


def prompt_for(task: TaskPack | None, question: str) -> str:
    """The student's user message (the task's forward prompt; the raw question without one)."""
    return prompting.user_content(task, question)


def sft_records(
    rows: list[DataRow], task: TaskPack | None, eos_token: str
) -> list[dict[str, str]]:
    """Plain-format prompt/completion text pairs: prompt = task.prompt(q), target + eos."""
    out = []
    for row in rows:
        completion = row.target if row.target.endswith(eos_token) else row.target + eos_token
        out.append({"prompt": prompt_for(task, row.question), "completion": completion})
    return out


def sft_examples(rows: list[DataRow], task: TaskPack | None, tokenizer: Any,
                 system: str | None = None) -> list[dict[str, list[int]]]:
    """Tokenized examples (`input_ids`, `completion_mask`) in the student's prompt format."""
    return [prompting.encode_example(tokenizer, prompting.task_messages(task, row.question,
                                                                        system), row.target)
            for row in rows]


def hf_dataset(records: list[dict[str, Any]]) -> Any:
    """A datasets.Dataset from records, with the library's progress bars off."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets.Dataset.from_list(records)
