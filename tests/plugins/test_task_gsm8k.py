"""GSM8K task pack: file loading, bad rows, numeric extraction, synthetic generator, verifier
(on the shipped GSM8K-style reference solutions and on targeted cases)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import pytest

from plugins.tasks.data import GSM8K_STYLE, GSM8K_STYLE_WRONG, read_rows
from plugins.tasks.gsm8k import (
    Gsm8kTask,
    canonical_number,
    check_equations,
    extract_number,
    solution_text,
    verify_reasoning,
)
from plugins.tasks.gsm8k_verifier import (
    check_reasoning,
    resolve_annotations,
    with_a_wrong_result,
)
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


# --- the verifier on GSM8K-style reference solutions -------------------------------------

GOOD_ROWS = read_rows(GSM8K_STYLE)
WRONG_ROWS = read_rows(GSM8K_STYLE_WRONG)


def gold_of(answer_field: str) -> str:
    gold = canonical_number(answer_field.rsplit("####", 1)[1])
    assert gold is not None
    return gold


def test_fixture_says_where_it_comes_from_and_loads_as_a_task() -> None:
    for rows in (GOOD_ROWS, WRONG_ROWS):
        assert "None of these problems or solutions is taken from GSM8K" in rows[0]["about"]
    assert len(GOOD_ROWS) >= 150 and len(WRONG_ROWS) >= 50
    assert {r["error"] for r in WRONG_ROWS} == {"arithmetic", "final"}
    task = Gsm8kTask({"path": str(GSM8K_STYLE)})
    assert task.check_data() == []
    examples = task.examples("train") + task.examples("test")
    assert len(examples) == len(GOOD_ROWS)
    for ex in examples:  # the pipeline's path: reference reasoning, then the verifier
        reasoning = task.reference_reasoning(ex.question, ex.answer)
        assert reasoning is not None and "<<" not in reasoning
        assert task.verify(ex.question, reasoning, ex.answer) is True, reasoning


@pytest.mark.parametrize("form", ["solution", "raw"])
def test_false_rejection_at_most_one_percent(form: str) -> None:
    rejected = []
    for row in GOOD_ROWS:
        text = solution_text(row["answer"]) if form == "solution" else row["answer"]
        ok, why = verify_reasoning(text, gold_of(row["answer"]))
        if not ok:
            rejected.append((why, text))
    assert len(rejected) * 100 <= len(GOOD_ROWS), rejected


@pytest.mark.parametrize("form", ["solution", "raw"])
def test_every_wrong_solution_rejected(form: str) -> None:
    for row in WRONG_ROWS:
        text = solution_text(row["answer"]) if form == "solution" else row["answer"]
        ok, why = verify_reasoning(text, gold_of(row["answer"]))
        assert not ok, (row["note"], text)
        expected = "wrong arithmetic" if row["error"] == "arithmetic" else "ends on|states"
        assert re.search(expected, why), (row["note"], why)


def test_injected_errors_rejected() -> None:
    """Every result of every fixture solution made wrong by one, one at a time."""
    lines = missed = 0
    for row in GOOD_ROWS:
        answer, gold = row["answer"], gold_of(row["answer"])
        assert not verify_reasoning(solution_text(answer), str(Fraction(gold) + 1))[0]
        for mutated in with_a_wrong_result(answer):
            assert not verify_reasoning(mutated, gold)[0], mutated  # annotations are checked
            lines += 1
            missed += verify_reasoning(solution_text(mutated), gold)[0]
    # Without annotations a line like "twice as many as 12 = 25" cannot be recomputed.
    assert lines > 400 and missed * 100 <= lines


@pytest.mark.parametrize(
    "reasoning",
    [
        "The farmer has 4 * 20 sheep = 80 sheep.",  # units between the numbers and `=`
        "Charleston has 4 * 20 sheep = 80 sheep\nIn all 20 sheep + 80 sheep = 100 sheep",
        "She answered 12/20 x 100% = 60% of them.",  # percent on both sides
        "She answered 12/20 x 100 = 60%.",
        "The discount is 25% of $80 = $20.",
        "The tank has 40% x 500 = 200 liters.",
        "It costs $200 - 20% = $160.",  # a relative percent
        "She keeps 100% - 35% = 65% of them.",
        "3/4 = 75% of the cake.",
        "He used 3/5 * 200 = 120 pounds.",  # fractions
        "She gave 1/3 of 60 = 20 stamps.",
        "Together they paint 1/6 + 1/3 = 1/2 of the fence.",
        "She needs 2 1/2 * 4 = 10 cups.",  # a mixed number
        "She has $1,250.75 + $349.25 = $1,600.",  # currency, thousands separators
        "It made 1,250,000 x 8% = 100,000 more.",
        "The total is 48 ÷ 2 = 24.",  # ÷ × x *
        "The box holds 4 × 3 = 12.",
        "The crate holds 12 x 2 = 24 and 12x2=24 again.",
        "The fence is 2 * (12 + 8) = 40 meters.",  # parentheses
        "It was 5 - 12 = -7 degrees.",  # negative numbers
        "Its total profit was -2,500 + 4,100 = 1,600.",
        "He drinks 8 * 0.25 = 2 liters, or 18*.5 = 9.00 dollars.",  # decimals
        "2 hours is 2 * 60 = 120 minutes.",  # times
        "The trip takes 1/2 hour = 30 minutes.",
        "She is done at 18 - 8 = 10:00 am.",
        "The ratio 3:2 has 3 + 2 = 5 parts.",  # ratios
        "He pays $10/hour * 5 hours = $50.",  # rates
        "She buys 5 * 4 = 20 + 3 = 23 pens.",  # a running total
        "Let S be the cost. S + 143 = 200 - 16 = 184.",  # an equation in an unknown
        "She saves 3 times 4 = 12 and 10 minus 3 = 7.",  # operator words
        "She needs 350 / 48 = 7.29 buses, so 8 buses.",  # rounding up
        "10 / 3 = 3.33 each.",
    ],
)
def test_accepts_real_reasoning(reasoning: str) -> None:
    found, ok = check_equations(reasoning)
    assert found >= 1 and ok, check_reasoning(reasoning)


@pytest.mark.parametrize(
    "reasoning",
    [
        "The farmer has 4 * 20 sheep = 90 sheep.",
        "She answered 12/20 x 100% = 65% of them.",
        "The discount is 25% of $80 = $25.",
        "It costs $200 - 20% = $150.",
        "She keeps 100% - 35% = 75% of them.",
        "He used 3/5 * 200 = 100 pounds.",
        "She gave 1/3 of 60 = 30 stamps.",
        "She needs 2 1/2 * 4 = 8 cups.",
        "She has $1,250.75 + $349.25 = $1,700.",
        "The total is 48 ÷ 2 = 25.",
        "The box holds 4 × 3 = 13.",
        "The crate holds 12x2=25.",
        "The fence is 2 * (12 + 8) = 32 meters.",
        "It was 5 - 12 = -8 degrees.",
        "He drinks 8 * 0.25 = 2.5 liters.",
        "2 hours is 2 * 60 = 100 minutes.",
        "She buys 5 * 4 = 20 + 3 = 24 pens.",
        "She saves 3 times 4 = 13.",
        "45/60 = 0.6 hours",
        "1.5 * 2 = 2.5 hours",
        "150 - 2% = 148 pounds",
    ],
)
def test_rejects_wrong_arithmetic(reasoning: str) -> None:
    assert check_equations(reasoning)[1] is False


@pytest.mark.parametrize(
    ("reasoning", "answer", "accepted"),
    [
        ("48/2 = 24 clips.\n48 + 24 = 72 clips in all.", "72", True),
        ("48/2 = 24 clips.\n48 + 24 = 72 clips in all.", "24", False),  # stopped early
        ("48/2 = 24 clips.\n48 + 24 = 72 clips in all.", "70", False),
        ("He pays 20*5 = $100 for 5 shirts.", "100", True),  # numbers after the result
        ("He pays 20*5 = $100 for 5 shirts.", "5", False),
        ("6 + 6 = 12 apples.\nSo she has twelve apples.", "12", True),  # stated in words
        ("6 + 6 = 12 apples.\nSo she has eleven apples.", "11", False),
        ("48 + 24 = 72\n#### 72", "72", True),  # a GSM8K final line
        ("48 + 24 = 72\n#### 70", "70", False),
        ("48 + 24 = 72\n\\boxed{72}", "72", True),
        ("48 + 24 = 72\nThe answer is \\boxed{70}.", "70", False),
        ("48 + 24 = 72\nThe answer is 72.", "72", True),
        ("She sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72", True),  # raw GSM8K
        ("She sold 48+24 = <<48+24=70>>70 clips.\n#### 70", "70", False),
        ("She gets <<3*4=12>>12 a day.", "12", True),  # only the annotation computes
        ("She gets <<3*4=13>>13 a day.", "13", False),
        ("2 * 60 = 120 minutes.\nSo it is 2 hours.", "2", True),  # restated in a unit
        ("350 / 48 = 7.29, so 8 buses are needed.", "8", True),
        ("350 / 48 = 7.29, so 9 buses are needed.", "9", False),
        ("It takes 400 / 25 = 16 weeks.\nShe saves $25 a week.", "25", False),  # copied
        ("4200 cents, which is 1800 + 2400 = 4200 cents, or $42.", "42", True),
        ("Answer: 72", "72", False),  # nothing to check
        ("7 + 7 = 15\nSo 14.", "14", False),
    ],
)
def test_final_answer(reasoning: str, answer: str, accepted: bool) -> None:
    ok, why = verify_reasoning(reasoning, answer)
    assert ok is accepted, why


def test_resolve_annotations_keeps_unshown_computations() -> None:
    assert resolve_annotations("He gets <<3*4=12>>12 a day") == "He gets 3*4 = 12 a day"
    assert resolve_annotations("So 12 x 2 = <<12*2=24>>24 pages") == "So 12 x 2 = 24 pages"
    assert resolve_annotations("She earns $<<12/60=0.2>>0.2 a minute") == (
        "She earns 12/60 = $0.2 a minute"
    )
    assert resolve_annotations("spent S + <<+30+46=76>>76") == "spent S + 76"
    assert solution_text("Weng earns 12/60 = $<<12/60=0.2>>0.2.\n#### 10") == (
        "Weng earns 12/60 = $0.2."
    )


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Answer: twelve", "12"),
        ("Answer: one hundred and twenty-five", "125"),
        ("The answer is 72.", "72"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{\\$1,200.50}", "1200.5"),
        ("#### 2,520,000", "2520000"),
    ],
)
def test_extract_more_forms(output: str, expected: str) -> None:
    assert extract_number(output) == expected
