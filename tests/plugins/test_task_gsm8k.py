"""GSM8K task pack: file loading, bad rows, numeric extraction, synthetic generator, verifier."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from plugins.tasks.gsm8k import Gsm8kTask, canonical_number, check_equations, extract_number
from stratosd.errors import ConfigError
from stratosd.plugins import Plugins, make_plugin_manager

TASK_MODULES = ("plugins.tasks.jsonl_qa", "plugins.tasks.mahjong", "plugins.tasks.gsm8k")

ROWS = [
    {
        "question": "Natalia sold clips to 48 friends in April, and half as many in May. "
        "How many clips did she sell altogether?",
        "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\n"
        "Altogether 48+24 = <<48+24=72>>72 clips.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour. She worked 50 minutes. How much did she earn?",
        "answer": "She earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "So 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
    {
        "question": "A shop had 1,200 pens and sold 1,450 more than... it owes 250.",
        "answer": "1,200 - 1,450 = <<1200-1450=-250>>-250\n#### -250",
    },
    {"question": "What is 3.5 times 2?", "answer": "3.5 * 2 = <<3.5*2=7>>7\n#### 7.0"},
]


def write(path: Path, rows: Sequence[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def two_files(tmp_path: Path) -> tuple[Path, Path]:
    return write(tmp_path / "train.jsonl", ROWS[:3]), write(tmp_path / "test.jsonl", ROWS[3:])


def test_loads_gold_after_hashes(two_files: tuple[Path, Path]) -> None:
    train, test = two_files
    task = Gsm8kTask({"train_path": str(train), "test_path": str(test)})
    assert [ex.answer for ex in task.examples("train")] == ["72", "10", "-250"]
    assert [ex.answer for ex in task.examples("test")] == ["7"]
    assert task.examples("train")[0].id == "gsm8k-train-1"
    assert task.check_data() == []


def test_reference_reasoning_replays_file_solution(two_files: tuple[Path, Path]) -> None:
    train, test = two_files
    task = Gsm8kTask({"train_path": str(train), "test_path": str(test)})
    for ex in task.examples("train") + task.examples("test"):
        reasoning = task.reference_reasoning(ex.question, ex.answer)
        assert reasoning is not None and "<<" not in reasoning and "####" not in reasoning
        assert task.verify(ex.question, reasoning, ex.answer) is True
    ex = task.examples("train")[0]
    assert task.reference_reasoning(ex.question, "73") is None
    assert task.reference_reasoning("unknown question?", "1") is None


def test_single_file_split_by_seed(tmp_path: Path) -> None:
    path = write(
        tmp_path / "all.jsonl",
        [
            {"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
            for i in range(20)
        ],
    )
    a = Gsm8kTask({"path": str(path), "test_fraction": 0.25, "seed": 1})
    b = Gsm8kTask({"path": str(path), "test_fraction": 0.25, "seed": 1})
    c = Gsm8kTask({"path": str(path), "test_fraction": 0.25, "seed": 2})
    assert len(a.examples("test")) == 5 and len(a.examples("train")) == 15
    assert a.examples("test") == b.examples("test")
    assert a.examples("test") != c.examples("test")
    assert {ex.id for ex in a.examples("test")}.isdisjoint(ex.id for ex in a.examples("train"))
    assert all(ex.id.startswith("gsm8k-test-") for ex in a.examples("test"))


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"question": "Q?"}', 'line 2: field "answer" is missing'),
        (
            '{"question": "Q?", "answer": "just 5"}',
            'line 2: field "answer" has no "#### <number>"',
        ),
        ('{"question": "Q?", "answer": "#### five"}', 'line 2: field "answer" has no number'),
        ('{"question": ["Q?"], "answer": "#### 5"}', 'line 2: field "question" must be a string'),
        ('{"question": "Q?", "answer": "#### 5"', "line 2 column"),
        ("[1, 2]", "line 2: expected a JSON object"),
    ],
)
def test_malformed_rows_name_file_line_field(tmp_path: Path, line: str, needle: str) -> None:
    path = write(tmp_path / "train.jsonl", [ROWS[0], line])
    task = Gsm8kTask({"path": str(path)})
    with pytest.raises(ConfigError) as info:
        task.examples("train")
    assert str(path) in info.value.message
    assert needle in info.value.message
    issues = task.check_data()
    assert [i.kind for i in issues] == ["malformed"] and needle in issues[0].message


def test_duplicates_and_overlap_reported(tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", [ROWS[0], ROWS[1], ROWS[0]])
    test = write(tmp_path / "test.jsonl", [ROWS[1], ROWS[3]])
    issues = Gsm8kTask({"train_path": str(train), "test_path": str(test)}).check_data()
    kinds = sorted(i.kind for i in issues)
    assert kinds == ["duplicate", "overlap"]
    dup = next(i for i in issues if i.kind == "duplicate")
    assert dup.ids == ["gsm8k-train-1", "gsm8k-train-3"]
    overlap = next(i for i in issues if i.kind == "overlap")
    assert overlap.ids == ["gsm8k-test-1", "gsm8k-train-2"]


def test_missing_file_names_the_param(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file") as info:
        Gsm8kTask({"path": str(tmp_path / "nope.jsonl")}).examples("train")
    assert info.value.field == "task.params.path"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("#### 72", "72"),
        ("The total is 1,234 apples.", "1234"),
        ("Answer: $1,234.50", "1234.5"),
        ("She paid $18.", "18"),
        ("so the result is -7.", "-7"),
        ("It is 0.25 of it", "0.25"),
        ("\\boxed{42}", "42"),
        ("\\boxed{3,000} then 7", "3000"),
        ("48 + 24 = 72\nAnswer: 72 clips.", "72"),
        ("#### 5\nAnswer: 6", "6"),
        ("Answer: 5 + 3 = 8", "8"),
        ("Answer: none\n#### 9", "9"),
        ("10 - 5 = 5", "5"),
        ("Answer: 7.0", "7"),
        ("Answer: 12 km/h", "12"),
        ("no numbers at all", None),
        ("", None),
    ],
)
def test_extract(output: str, expected: str | None) -> None:
    assert extract_number(output) == expected


def test_canonical_and_score() -> None:
    task = Gsm8kTask({"synthetic": True, "n_train": 1, "n_test": 1})
    assert canonical_number("1,000.00") == "1000"
    assert canonical_number("-0.50") == "-0.5"
    assert task.score("1,000", "1000") == 1.0
    assert task.score("999", "1000") == 0.0
    assert task.score(None, "1") == 0.0


def test_check_equations() -> None:
    assert check_equations("2 + 3 = 5\n5 * 4 = 20") == (2, True)
    assert check_equations("2 + 3 = 6") == (1, False)
    assert check_equations("10 / 3 = 3.33") == (1, True)
    assert check_equations("(2 + 3) * 4 = 20 and $1,000 - $250 = $750") == (2, True)
    assert check_equations("no equations here") == (0, True)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_synthetic_generator(level: int) -> None:
    params = {"synthetic": True, "difficulty": level, "n_train": 40, "n_test": 20, "seed": 4}
    task = Gsm8kTask(params)
    train, test = task.examples("train"), task.examples("test")
    assert len(train) == 40 and len(test) == 20
    assert {ex.question for ex in train}.isdisjoint(ex.question for ex in test)
    assert Gsm8kTask(params).examples("train") == train
    assert Gsm8kTask({**params, "n_train": 3}).examples("test") == test
    assert task.check_data() == []
    for ex in train + test:
        assert ex.meta["answer_field"].endswith(f"#### {ex.answer}")
        assert len(ex.meta["solution"].splitlines()) == level + 1
        reasoning = task.reference_reasoning(ex.question, ex.answer)
        assert reasoning is not None
        assert task.verify(ex.question, reasoning, ex.answer) is True
        assert task.extract(task.format_target(reasoning, ex.answer)) == ex.answer


def test_verifier_rejects_corruptions() -> None:
    task = Gsm8kTask({"synthetic": True, "difficulty": 2, "n_train": 10, "n_test": 5})
    for ex in task.examples("train"):
        reasoning = task.reference_reasoning(ex.question, ex.answer)
        assert reasoning is not None
        last = reasoning.splitlines()[-1]
        lhs, rhs = last.split(" = ")
        wrong_result = reasoning.replace(last, f"{lhs} = {int(rhs) + 1}")
        assert task.verify(ex.question, wrong_result, ex.answer) is False
        assert task.verify(ex.question, reasoning, str(int(ex.answer) + 1)) is False
        assert task.verify(ex.question, "", ex.answer) is False
        assert task.verify(ex.question, f"Answer: {ex.answer}", ex.answer) is False
        stated = task.format_target(reasoning, str(int(ex.answer) + 1))
        assert task.verify(ex.question, stated, ex.answer) is False


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({}, "no data file"),
        ({"synthetic": True, "path": "x.jsonl"}, "exclude each other"),
        ({"synthetic": "yes"}, "'synthetic' must be bool"),
        ({"synthetic": True, "difficulty": 4}, "'difficulty'"),
        ({"synthetic": True, "n_tests": 4}, "unknown param 'n_tests'"),
        ({"path": "a", "train_path": "b"}, "not both"),
        ({"test_path": "b"}, "no data file"),
        ({"path": "a", "test_fraction": 2}, "out of range"),
    ],
)
def test_bad_params(params: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Gsm8kTask(params)


def test_discoverable() -> None:
    plugins = Plugins(make_plugin_manager(TASK_MODULES, autoload=False))
    task = plugins.task("gsm8k", {"synthetic": True, "n_train": 2, "n_test": 2})
    assert isinstance(task, Gsm8kTask) and len(task.examples("train")) == 2
