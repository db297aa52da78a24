"""jsonl-qa task pack and the shared helpers in plugins.tasks.base."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import structlog

from plugins.tasks.base import (
    Param,
    normalize_answer,
    read_jsonl,
    split_by_seed,
    validate_params,
)
from plugins.tasks.jsonl_qa import JsonlQaTask
from stratosd.errors import ConfigError
from stratosd.plugins import Plugins, make_plugin_manager


def write(path: Path, rows: Sequence[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def capitals(n: int = 10) -> list[dict[str, str]]:
    return [{"q": f"Capital of country {i}?", "a": f"City {i}"} for i in range(n)]


def test_custom_fields_and_fraction_split(tmp_path: Path) -> None:
    path = write(tmp_path / "qa.jsonl", capitals(10))
    params = {
        "path": str(path),
        "question_field": "q",
        "answer_field": "a",
        "test_fraction": 0.3,
        "seed": 5,
    }
    task = JsonlQaTask(params)
    train, test = task.examples("train"), task.examples("test")
    assert len(train) == 7 and len(test) == 3
    assert JsonlQaTask(params).examples("test") == test
    assert {ex.question for ex in train}.isdisjoint(ex.question for ex in test)
    assert task.check_data() == []
    assert task.verify(test[0].question, "x", test[0].answer) is None
    assert task.reference_reasoning(test[0].question, test[0].answer) is None


def test_two_files_and_numbers_become_strings(tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", [{"question": "1+1?", "answer": 2}, ""])
    test = write(tmp_path / "test.jsonl", [{"question": "2+2?", "answer": 4.5}])
    task = JsonlQaTask({"train_path": str(train), "test_path": str(test)})
    assert [ex.answer for ex in task.examples("train")] == ["2"]
    assert [ex.answer for ex in task.examples("test")] == ["4.5"]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"question": "Q?"}', 'line 3: field "answer" is missing'),
        ('{"question": "Q?", "answer": null}', 'line 3: field "answer" must be a string'),
        ('{"question": "Q?", "answer": "  "}', 'line 3: field "answer" is empty'),
        ('{"question": "Q?", "answer": true}', 'line 3: field "answer" must be a string'),
        ('{"question": "Q?" "answer": "A"}', "line 3 column 19: invalid JSON"),
        ('"just a string"', "line 3: expected a JSON object"),
    ],
)
def test_malformed_row(tmp_path: Path, line: str, needle: str) -> None:
    path = write(
        tmp_path / "train.jsonl",
        [{"question": "a", "answer": "b"}, {"question": "c", "answer": "d"}, line],
    )
    with pytest.raises(ConfigError) as info:
        read_jsonl(path, ("question", "answer"))
    assert info.value.message.startswith(f"{path} line 3")
    assert needle in info.value.message


def test_malformed_row_with_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    rows: list[object] = [{"question": f"q{i}", "answer": "a"} for i in range(16)]
    write(tmp_path / "data" / "train.jsonl", [*rows, {"question": "q17"}])
    monkeypatch.chdir(tmp_path)
    task = JsonlQaTask({"path": "data/train.jsonl"})
    with pytest.raises(ConfigError) as info:
        task.examples("train")
    assert info.value.message.startswith('data/train.jsonl line 17: field "answer" is missing')
    assert info.value.field == "answer"


def test_renamed_field_missing(tmp_path: Path) -> None:
    path = write(tmp_path / "qa.jsonl", capitals(3))
    with pytest.raises(ConfigError, match=r"line 1: row fits no known format \(fields: a, q\)"):
        JsonlQaTask({"path": str(path)}).examples("train")
    with pytest.raises(ConfigError, match='line 1: field "question" is missing'):
        JsonlQaTask({"path": str(path), "format": "qa"}).examples("train")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ConfigError, match="no rows"):
        JsonlQaTask({"path": str(path)}).examples("train")


def test_duplicates_and_overlap(tmp_path: Path) -> None:
    train = write(
        tmp_path / "train.jsonl",
        [
            {"question": "What is up?", "answer": "sky"},
            {"question": "what is  UP", "answer": "ceiling"},
            {"question": "Who?", "answer": "me"},
        ],
    )
    test = write(
        tmp_path / "test.jsonl",
        [{"question": "Who?", "answer": "me"}, {"question": "New?", "answer": "yes"}],
    )
    issues = JsonlQaTask({"train_path": str(train), "test_path": str(test)}).check_data()
    by_kind = {i.kind: i for i in issues}
    assert sorted(by_kind) == ["duplicate", "overlap"]
    assert by_kind["duplicate"].ids == ["qa-train-1", "qa-train-2"]
    assert "different answers" in by_kind["duplicate"].message
    assert by_kind["overlap"].ids == ["qa-test-1", "qa-train-3"]


def test_check_data_reports_malformed(tmp_path: Path) -> None:
    path = write(tmp_path / "qa.jsonl", ["{not json"])
    issues = JsonlQaTask({"path": str(path)}).check_data()
    assert [i.kind for i in issues] == ["malformed"]
    assert "line 1 column 2" in issues[0].message


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("reasoning...\nAnswer: Paris", "Paris"),
        ("Answer: Rome\nAnswer:  Paris.  ", "Paris."),
        ("answer: paris\nmore text", "paris"),
        ("no marker", None),
        ("Answer:   ", None),
    ],
)
def test_extract_default(output: str, expected: str | None) -> None:
    task = JsonlQaTask({"path": "unused.jsonl", "answer_span": "line"})
    assert task.extract(output) == expected


def test_extract_regex_and_match_modes() -> None:
    task = JsonlQaTask(
        {"path": "x.jsonl", "extract_regex": r"<ans>(.*?)</ans>", "answer_span": "line"}
    )
    assert task.extract("<ans>a</ans> then <ans> B </ans>") == "B"
    assert task.extract("<ans> </ans>") is None
    # no regex match: the `Answer:` line a Stratos-trained student writes (format_target)
    assert task.extract("Answer: b") == "b"
    assert task.extract(task.format_target("why", "Paris")) == "Paris"
    assert task.score("  paris. ", "Paris") == 1.0
    assert task.score("Par is", "Paris") == 0.0
    exact = JsonlQaTask({"path": "x.jsonl", "match": "exact"})
    assert exact.score("Paris", "Paris") == 1.0
    assert exact.score("paris", "Paris") == 0.0
    assert exact.score(None, "Paris") == 0.0


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"path": "x", "match": "fuzzy"}, "'match' = 'fuzzy' is not allowed"),
        ({"path": "x", "extract_regex": "("}, "not a valid regex"),
        ({"path": "x", "extract_regex": "abc"}, "capture group"),
        ({"path": "x", "question_field": 3}, "'question_field' must be str"),
        ({"path": "x", "seed": 1.5}, "'seed' must be int"),
        ({"path": "x", "splits": 2}, "unknown param 'splits'"),
        ({}, "no data file"),
    ],
)
def test_bad_params(params: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        JsonlQaTask(params)


def test_normalize_answer() -> None:
    assert normalize_answer("  The  ANSWER\tis\n42. ") == "the answer is 42"
    assert normalize_answer('"Paris!"') == "paris"
    assert normalize_answer("...") == ""


def test_split_by_seed_is_deterministic_and_complete() -> None:
    items = list(range(50))
    train, test = split_by_seed(items, 0.2, 3)
    assert (train, test) == split_by_seed(items, 0.2, 3)
    assert sorted(train + test) == items and len(test) == 10
    assert split_by_seed([1], 0.5, 0) == ([1], [])
    assert split_by_seed([1, 2], 0.01, 0)[1] != []


def test_validate_params_fills_defaults_and_coerces_int_to_float() -> None:
    spec = {"x": Param((float,), 0.5), "n": Param((int,), 3)}
    assert validate_params("t", {"x": 1}, spec) == {"x": 1.0, "n": 3}


def test_discoverable() -> None:
    plugins = Plugins(make_plugin_manager(autoload=False))
    assert {"jsonl-qa", "gsm8k", "mahjong-winning-tiles"} <= set(plugins.tasks.names())
    assert isinstance(plugins.task("jsonl-qa", {"path": "x.jsonl"}), JsonlQaTask)


def test_answer_span_auto_follows_the_gold_answers(tmp_path: Path) -> None:
    one_line = write(tmp_path / "one.jsonl", capitals(4))
    task = JsonlQaTask({"path": str(one_line), "question_field": "q", "answer_field": "a"})
    assert task.extract("Answer: City 1\nQuestion: next?") == "City 1"
    assert task.answer_span() == "line"
    poem = {"question": "A two-line poem?", "answer": "Roses are red,\nviolets are blue."}
    multi = write(tmp_path / "multi.jsonl", [poem, {"question": "Q?", "answer": "A"}])
    task = JsonlQaTask({"path": str(multi), "test_fraction": 0.5})
    output = task.format_target("I know this one.", poem["answer"])
    assert task.extract(output) == poem["answer"]
    assert task.answer_span() == "rest"
    forced = JsonlQaTask({"path": str(multi), "answer_span": "line"})
    assert forced.extract(output) == "Roses are red,"
    with pytest.raises(ConfigError, match="no such file"):
        JsonlQaTask({"path": str(tmp_path / "none.jsonl")}).extract("Answer: x")


def test_skip_bad_rows_counts_logs_and_reports(tmp_path: Path) -> None:
    rows: list[object] = [
        {"question": "a", "answer": "b"},
        {"question": "c"},
        "[1, 2]",
        {"question": "e", "answer": ""},
        {"question": "f", "answer": "g"},
    ]
    path = write(tmp_path / "qa.jsonl", rows)
    with pytest.raises(ConfigError, match='line 2: field "answer" is missing'):
        JsonlQaTask({"path": str(path)}).examples("train")
    task = JsonlQaTask({"path": str(path), "on_bad_row": "skip", "test_fraction": 0.5})
    with structlog.testing.capture_logs() as logs:
        ids = sorted(ex.id for split in ("train", "test") for ex in task.examples(split))
    assert [i.rsplit("-", 1)[1] for i in ids] == ["1", "5"]
    stats = task.stats()
    assert (stats.rows, stats.skipped) == (2, 3)
    assert stats.sources[0].format == "qa"
    assert [b.split(": ", 1)[0] for b in stats.sources[0].bad] == [
        f"{path} line 2", f"{path} line 3", f"{path} line 4"]
    warned = [e for e in logs if e["event"] == "task_rows_skipped"]
    assert len(warned) == 1 and warned[0]["skipped"] == 3
    assert warned[0]["log_level"] == "warning"
    issues = task.check_data()
    assert [i.kind for i in issues] == ["malformed"]
    assert "3 bad row(s) skipped" in issues[0].message and "line 2" in issues[0].message


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = write(tmp_path / "qa.jsonl", [{"question": "c"}, "{oops"])
    with pytest.raises(ConfigError, match="no rows .* all 2 rows were bad") as info:
        JsonlQaTask({"path": str(path), "on_bad_row": "skip"}).examples("train")
    assert 'line 1: field "answer" is missing' in info.value.message


def test_numbers_and_unicode_in_qa_rows(tmp_path: Path) -> None:
    rows = [{"question": "Wie heißt die Hauptstadt von Österreich?", "answer": "Wien"},
            {"question": "√16 = ?", "answer": 4},
            {"question": "日本の首都は？", "answer": "東京"}]
    path = write(tmp_path / "qa.jsonl", rows)
    task = JsonlQaTask({"path": str(path), "test_fraction": 0.34, "match": "exact"})
    answers = sorted(ex.answer for split in ("train", "test") for ex in task.examples(split))
    assert answers == ["4", "Wien", "東京"]
    assert task.score(task.extract("…\nAnswer: 東京"), "東京") == 1.0
