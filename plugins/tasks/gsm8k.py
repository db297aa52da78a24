"""GSM8K-format math: user JSONL (`question`, `answer` ending in `#### N`) or synthetic problems.

The gold answer is the number after `####`. The reference reasoner replays a known worked
solution; the verifier (plugins.tasks.gsm8k_verifier) recomputes the equations a reasoning
states and checks that it ends on the answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from plugins.tasks.base import DataFiles, Param, data_issues, validate_params
from plugins.tasks.gsm8k_numbers import canonical_number, extract_number
from plugins.tasks.gsm8k_verifier import check_equations, resolve_annotations, verify_reasoning
from stratosd import hookimpl
from stratosd.api import DataIssue, Example, Split, TaskPack
from stratosd.errors import ConfigError

__all__ = [
    "Gsm8kTask",
    "canonical_number",
    "check_equations",
    "extract_number",
    "gsm8k_answer_field",
    "solution_text",
    "synthetic_problem",
    "verify_reasoning",
]


# --- synthetic word problems ------------------------------------------------------------

_NAMES = (
    ("Ada", "she"),
    ("Ben", "he"),
    ("Cleo", "she"),
    ("Dan", "he"),
    ("Eva", "she"),
    ("Finn", "he"),
    ("Gia", "she"),
    ("Hugo", "he"),
    ("Iris", "she"),
    ("Jon", "he"),
)
_ITEMS = ("apples", "books", "coins", "marbles", "stamps", "pencils", "shells", "cards")
_LEVELS = {1: (1, 20, "+-"), 2: (2, 50, "+-*"), 3: (3, 100, "+-*/")}


def synthetic_problem(level: int, rng: random.Random) -> tuple[str, list[str], int]:
    """(question, solution lines `a op b = c`, answer) for a word problem of `level` steps."""
    steps, top, ops = _LEVELS[level]
    name, pron = rng.choice(_NAMES)
    items = rng.choice(_ITEMS)
    x = rng.randint(2, top)
    sentences = [f"{name} has {x} {items}."]
    lines = [f"{name} starts with {x} {items}."]
    for _ in range(steps):
        op = rng.choice(ops)
        if op == "-" and x < 2:
            op = "+"
        if op == "/":
            divisors = [d for d in range(2, 6) if x % d == 0]
            if not divisors:
                op = "+"
        if op == "+":
            b = rng.randint(1, top)
            y = x + b
            sentences.append(f"{pron.capitalize()} buys {b} more.")
        elif op == "-":
            b = rng.randint(1, x - 1)
            y = x - b
            sentences.append(f"{pron.capitalize()} gives {b} to a friend.")
        elif op == "*":
            b = rng.randint(2, 4)
            y = x * b
            sentences.append(f"Then {pron} ends up with {b} times as many.")
        else:
            b = rng.choice(divisors)
            y = x // b
            sentences.append(
                f"{pron.capitalize()} splits them into {b} equal bags and keeps one bag."
            )
        lines.append(f"{x} {op} {b} = {y}")
        x = y
    sentences.append(f"How many {items} does {name} have now?")
    return " ".join(sentences), lines, x


def gsm8k_answer_field(lines: list[str], answer: int) -> str:
    """The GSM8K `answer` field: solution with `<<calc>>` annotations and `#### N`."""
    out = []
    for line in lines:
        m = re.fullmatch(r"(\d+) (\S) (\d+) = (\d+)", line)
        out.append(f"{m[1]} {m[2]} {m[3]} = <<{m[1]}{m[2]}{m[3]}={m[4]}>>{m[4]}" if m else line)
    return "\n".join([*out, f"#### {answer}"])


def solution_text(answer_field: str) -> str:
    """A GSM8K answer field without annotations (see resolve_annotations) and `####` line."""
    body = answer_field.rsplit("####", 1)[0]
    return "\n".join(line.rstrip() for line in resolve_annotations(body).strip().splitlines())


# --- the task pack ------------------------------------------------------------------------


class Gsm8kTask(TaskPack):
    """Grade-school math word problems in GSM8K format, with a numeric verifier."""

    name: ClassVar[str] = "gsm8k"
    description: ClassVar[str] = "GSM8K-format math (user JSONL, or synthetic: true)"
    PARAMS: ClassVar[dict[str, Param]] = {
        "path": Param((str,), None, "a GSM8K-format JSONL file, split by test_fraction"),
        "train_path": Param((str,), None, "training JSONL (with test_path)"),
        "test_path": Param((str,), None, "test JSONL (with train_path)"),
        "test_fraction": Param(
            (float,), 0.2, "share of `path` held out for test", min=0.01, max=0.9
        ),
        "synthetic": Param((bool,), False, "generate arithmetic word problems instead of a file"),
        "n_train": Param((int,), 200, "synthetic training problems", min=0),
        "n_test": Param((int,), 100, "synthetic test problems", min=1),
        "difficulty": Param((int,), 1, "synthetic steps per problem", choices=(1, 2, 3)),
        "seed": Param((int,), 0, "seed of the split or of the generator"),
    }

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self.cfg = validate_params(self.name, self.params, self.PARAMS)
        if self.cfg["synthetic"]:
            for key in ("path", "train_path", "test_path"):
                if self.cfg[key]:
                    raise ConfigError(
                        f"task 'gsm8k': `synthetic = true` and `{key}` exclude each other",
                        hint="drop one of them",
                        field=f"task.params.{key}",
                    )
            self.files: DataFiles | None = None
        else:
            self.files = DataFiles.from_params(self.name, self.cfg)
        self._splits: dict[str, list[Example]] | None = None
        self._index: dict[str, tuple[str, str]] = {}  # question -> (gold, solution)

    # data ------------------------------------------------------------------------------------

    def _load(self) -> dict[str, list[Example]]:
        if self._splits is None:
            self._splits = (
                self._synthetic()
                if self.files is None
                else self.files.load(self._row, ("question", "answer"))
            )
            for exs in self._splits.values():
                for ex in exs:
                    self._index.setdefault(ex.question, (ex.answer, ex.meta["solution"]))
        return self._splits

    @staticmethod
    def _row(file: str, line: int, row: dict[str, Any], split: str) -> Example:
        answer_field = row["answer"]
        if "####" not in answer_field:
            raise ConfigError(
                f'{file} line {line}: field "answer" has no "#### <number>" line',
                hint="end each answer with `#### <final number>`",
                field="answer",
            )
        gold = canonical_number(answer_field.rsplit("####", 1)[1])
        if gold is None:
            raise ConfigError(
                f'{file} line {line}: field "answer" has no number after "####"',
                hint="end each answer with `#### <final number>`",
                field="answer",
            )
        return Example(
            id=f"gsm8k-{split}-{line}",
            question=row["question"].strip(),
            answer=gold,
            meta={"solution": solution_text(answer_field), "line": line},
        )

    def _synthetic(self) -> dict[str, list[Example]]:
        level, seed = self.cfg["difficulty"], self.cfg["seed"]
        out: dict[str, list[Example]] = {}
        taken: set[str] = set()
        for split, n in (("test", self.cfg["n_test"]), ("train", self.cfg["n_train"])):
            rng = random.Random(f"gsm8k-{split}-{level}-{seed}")  # test has its own stream
            exs: list[Example] = []
            misses = 0
            while len(exs) < n:
                question, lines, answer = synthetic_problem(level, rng)
                if question in taken:
                    misses += 1
                    if misses > 3000:  # in a row: the generator has run dry
                        raise ConfigError(
                            f"gsm8k synthetic: too few distinct problems for n_{split}={n}",
                            hint="lower n_train/n_test",
                            field=f"task.params.n_{split}",
                        )
                    continue
                taken.add(question)
                misses = 0
                exs.append(
                    Example(
                        id=f"gsm8k-syn{level}-{split}-{len(exs):05d}",
                        question=question,
                        answer=str(answer),
                        meta={
                            "solution": "\n".join(lines),
                            "difficulty": level,
                            "answer_field": gsm8k_answer_field(lines, answer),
                        },
                    )
                )
            out[split] = exs
        return out

    def examples(self, split: Split) -> list[Example]:
        """The split's problems (files are read once; synthetic ones are deterministic)."""
        return self._load()[split]

    def check_data(self) -> list[DataIssue]:
        """Malformed rows, duplicate questions in a split, questions in both splits."""
        return data_issues(self._load)

    # answers ----------------------------------------------------------------------------------

    def extract(self, output: str) -> str | None:
        """The final number (last marker, else last number), canonical; None if none."""
        return extract_number(output)

    def score(self, predicted: str | None, gold: str) -> float:
        """1.0 when the numbers are equal."""
        p, g = canonical_number(predicted), canonical_number(gold)
        return 1.0 if p is not None and p == g else 0.0

    # reasoning -------------------------------------------------------------------------------

    def reference_reasoning(self, question: str, answer: str) -> str | None:
        """The known worked solution of this question when its answer matches, else None."""
        self._load()
        known = self._index.get(question.strip())
        if known is None or self.score(answer, known[0]) != 1.0:
            return None
        return known[1]

    def verify(self, question: str, reasoning: str, answer: str) -> bool | None:
        """Every equation in the reasoning is right and it ends on the answer."""
        return verify_reasoning(reasoning, answer)[0]


@hookimpl
def stratos_tasks() -> list[type[TaskPack]]:
    """Register the GSM8K task pack."""
    return [Gsm8kTask]
