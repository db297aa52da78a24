"""jsonl-qa data formats: OpenAI messages, ShareGPT, Alpaca, mapped Q/A, CSV/Parquet, datasets.

Fixtures follow the shapes public data really has: OpenAI's fine-tuning JSONL (system prompt,
multi-turn with `weight`, tool calls), the ShareGPT/Vicuna dumps (a JSON array of `id` +
`conversations`), tatsu-lab/alpaca (`instruction`/`input`/`output`/`text`, mostly empty
`input`), and OpenAI's legacy `prompt`/`completion` rows.
"""

from __future__ import annotations

import csv
import glob
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from plugins.tasks.formats import DEFAULT_FIELDS as FIELDS
from plugins.tasks.formats import BadRow, RowProblem, Where, detect, parse
from plugins.tasks.jsonl_qa import JsonlQaTask
from stratosd.errors import ConfigError

LONG = "Долгий ответ — " + "lorem ipsum dolor sit amet 🌍 " * 8000  # ~230k characters

OPENAI_CHAT: list[dict[str, Any]] = [
    {"messages": [
        {"role": "system", "content": "Marv is a factual chatbot that is also sarcastic."},
        {"role": "user", "content": "What's the capital of France?"},
        {"role": "assistant", "content": "Paris, as if everyone doesn't know that already."},
    ]},
    {"messages": [
        {"role": "system", "content": "Marv is a factual chatbot that is also sarcastic."},
        {"role": "user", "content": "Who wrote 'Romeo and Juliet'?"},
        {"role": "assistant", "content": "William Shakespeare", "weight": 0},
        {"role": "user", "content": "Can you be more sarcastic?"},
        {"role": "assistant", "content": "Oh, just some guy named William Shakespeare. Ever "
         "heard of him?", "weight": 1},
    ]},
    {"messages": [
        {"role": "user", "content": "What is the weather in San Francisco?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_id", "type": "function", "function": {
                "name": "get_current_weather",
                "arguments": "{\"location\": \"San Francisco, USA\", \"format\": \"celsius\"}",
            }}]},
        {"role": "tool", "tool_call_id": "call_id", "content": "{\"temperature\": 18}"},
        {"role": "assistant", "content": "It is 18 °C in San Francisco."},
    ], "tools": [{"type": "function", "function": {"name": "get_current_weather"}}],
     "parallel_tool_calls": False},
    {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "把这句话翻译成英文："},
                                     {"type": "text", "text": "我爱你 ❤️"}]},
        {"role": "assistant", "content": "I love you ❤️"},
    ]},
    {"messages": [
        {"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and "
         "then she sold half as many clips in May. How many clips did she sell altogether?"},
        {"role": "assistant", "content": "In May she sold 48 / 2 = 24 clips.\n"
         "Altogether 48 + 24 = 72 clips.\nAnswer: 72"},
    ]},
    {"messages": [{"role": "user", "content": "Write a very long answer."},
                  {"role": "assistant", "content": LONG}]},
]

SHAREGPT: list[dict[str, Any]] = [
    {"id": "QWJhYvA_0", "conversations": [
        {"from": "human", "value": "Summarize the main ideas of Jeff Walker's Product Launch "
         "Formula into bullet points as it pertains to a growth marketing agency."},
        {"from": "gpt", "value": "Here are the main ideas:\n\n1. Identify the target "
         "audience\n2. Develop a compelling offer\n3. Use scarcity and urgency"},
        {"from": "human", "value": "Summarize it in one sentence."},
        {"from": "gpt", "value": "Build anticipation, then launch with a time-limited offer."},
    ]},
    {"id": "i6IyJda_0", "conversations": [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "こんにちは！元気ですか？"},
        {"from": "gpt", "value": "こんにちは！元気です 😊"},
    ]},
    {"id": "wNBG8Gp_0", "conversations": [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello! How can I help?"},
        {"from": "human", "value": "Thanks, bye."},
    ]},  # ends with the human: a bad row
]

ALPACA: list[dict[str, Any]] = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1.Eat a balanced diet and make sure to include plenty of fruits and vegetables."
     " \n2. Exercise regularly to keep your body active and strong. \n3. Get enough sleep "
     "and maintain a consistent sleep schedule."},
    {"instruction": "Identify the odd one out.", "input": "Twitter, Instagram, Telegram",
     "output": "Telegram"},
    {"instruction": "Evaluate this sentence for spelling and grammar mistakes",
     "input": "He finnished his meal and left the resturant",
     "output": "He finished his meal and left the restaurant."},
    {"instruction": "Translate to French.", "input": "Good morning, café owner!",
     "output": "Bonjour, propriétaire du café !"},
]


def write_jsonl(path: Path, rows: Sequence[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def all_examples(task: JsonlQaTask) -> list[Any]:
    return task.examples("train") + task.examples("test")


def assert_round_trip(task: JsonlQaTask) -> None:
    """A student trained on format_target scores 1.0 on every gold answer, exact match."""
    for ex in all_examples(task):
        written = task.format_target("Some reasoning first.", ex.answer)
        assert task.extract(written) == ex.answer, ex.id
        assert task.score(task.extract(written), ex.answer) == 1.0


# --- OpenAI messages --------------------------------------------------------------------


def test_openai_chat_shapes(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", OPENAI_CHAT)
    task = JsonlQaTask({"path": str(path), "test_fraction": 0.01, "match": "exact"})
    by_line = {ex.meta["line"]: ex for ex in all_examples(task)}
    assert len(by_line) == len(OPENAI_CHAT)
    assert {ex.meta["format"] for ex in by_line.values()} == {"messages"}
    first = by_line[1]
    assert first.question == ("System: Marv is a factual chatbot that is also sarcastic.\n\n"
                              "User: What's the capital of France?")
    assert first.answer == "Paris, as if everyone doesn't know that already."
    multi = by_line[2]
    assert multi.question.endswith("Assistant: William Shakespeare\n\n"
                                   "User: Can you be more sarcastic?")
    assert multi.answer.startswith("Oh, just some guy")
    tools = by_line[3]
    assert "Assistant called get_current_weather({\"location\": \"San Francisco, USA\"" \
        in tools.question
    assert "Tool result (get_current_weather): {\"temperature\": 18}" in tools.question
    assert tools.answer == "It is 18 °C in San Francisco."
    assert by_line[4].question == "把这句话翻译成英文：我爱你 ❤️"
    assert by_line[4].answer == "I love you ❤️"
    # the target's own `Answer:` line is the gold answer, the text before it the reasoning
    assert by_line[5].answer == "72"
    assert task.reference_reasoning(by_line[5].question, "72") == (
        "In May she sold 48 / 2 = 24 clips.\nAltogether 48 + 24 = 72 clips.")
    assert task.reference_reasoning(first.question, first.answer) is None
    assert by_line[6].answer == LONG.strip()
    assert task.stats().skipped == 0 and task.answer_span() == "line"
    assert_round_trip(task)


@pytest.mark.parametrize(
    ("messages", "field", "needle"),
    [
        ([{"role": "user", "content": "Hi"}], "messages[0]",
         "is a user message; the last message must be the assistant's answer"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None,
          "tool_calls": [{"id": "c", "type": "function",
                          "function": {"name": "f", "arguments": "{}"}}]}],
         "messages[1]", "is a tool call"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}],
         "messages[1].content", "is empty"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x",
                                               "weight": 0}],
         "messages[1].weight", "is 0"),
        ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "x"}],
         "messages", "has no user message"),
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}],
         "messages[0].content", "is empty"),
        ([{"role": "robot", "content": "Hi"}], "messages[0].role", "is 'robot'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
          {"role": "assistant", "content": "a cat"}],
         "messages[0].content[0]", "is a 'image_url' part"),
        (["Hi"], "messages[0]", "must be an object"),
        ([], "messages", "has no messages"),
    ],
)
def test_bad_messages_name_the_field(messages: list[Any], field: str, needle: str) -> None:
    with pytest.raises(RowProblem) as info:
        parse("messages", {"messages": messages}, FIELDS)
    assert info.value.field == field
    assert needle in info.value.reason and f'"{field}"' in info.value.reason


def test_bad_row_names_file_line_and_field(tmp_path: Path) -> None:
    rows: list[object] = [*OPENAI_CHAT[:3], {"messages": [{"role": "user", "content": "Hi"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(BadRow) as info:
        JsonlQaTask({"path": str(path)}).examples("train")
    err = info.value
    assert err.message.startswith(f'{path} line 4: field "messages[0]" is a user message')
    assert err.field == "messages[0]" and err.where.line == 4 and err.hint
    assert isinstance(err, ConfigError)


# --- ShareGPT ----------------------------------------------------------------------------


def test_sharegpt_json_array_as_in_the_dumps(tmp_path: Path) -> None:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT, ensure_ascii=False, indent=2), encoding="utf-8")
    with pytest.raises(BadRow, match=r"sharegpt.json row 3: field \"conversations\[2\]\" is a "
                       "user message"):
        JsonlQaTask({"path": str(path)}).examples("train")
    task = JsonlQaTask({"path": str(path), "on_bad_row": "skip", "test_fraction": 0.01})
    exs = {ex.meta["source_id"]: ex for ex in all_examples(task)}
    assert sorted(exs) == ["QWJhYvA_0", "i6IyJda_0"]
    first = exs["QWJhYvA_0"]
    assert first.question.startswith("User: Summarize the main ideas")
    assert "\n\nAssistant: Here are the main ideas:\n\n1. Identify" in first.question
    assert first.question.endswith("User: Summarize it in one sentence.")
    assert first.answer == "Build anticipation, then launch with a time-limited offer."
    assert exs["i6IyJda_0"].question == ("System: You are a helpful assistant.\n\n"
                                         "User: こんにちは！元気ですか？")
    assert first.meta["row"] == 1 and first.meta["format"] == "sharegpt"
    stats = task.stats()
    assert (stats.rows, stats.skipped) == (2, 1)
    assert "row 3" in stats.sources[0].bad[0]
    assert_round_trip(task)


def test_sharegpt_variants() -> None:
    row = {"system": "Be brief.", "conversations": [
        {"from": "user", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
        {"from": "observation", "value": "-3 °C, snow"},
        {"from": "assistant", "value": "−3 °C and snowing."},
    ]}
    fmt, fields = detect(row, FIELDS) or ("", {})
    rec = parse(fmt, row, fields)
    assert fmt == "sharegpt"
    assert rec.question == (
        "System: Be brief.\n\nUser: Weather in Oslo?\n\n"
        'Assistant called {"name": "weather", "arguments": {"city": "Oslo"}}\n\n'
        "Tool result: -3 °C, snow")
    with pytest.raises(RowProblem, match=r'"conversations\[0\].from" is \'bot\''):
        parse("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, FIELDS)
    with pytest.raises(RowProblem, match=r'"conversations\[1\].value" is empty'):
        parse("sharegpt", {"conversations": [{"from": "human", "value": "q"},
                                             {"from": "gpt", "value": ""}]}, FIELDS)


# --- Alpaca --------------------------------------------------------------------------------


def test_alpaca_with_empty_input_unicode_and_long_rows(tmp_path: Path) -> None:
    rows = [*ALPACA, {"instruction": "Repeat the text.", "input": "", "output": LONG}]
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=4), encoding="utf-8")
    task = JsonlQaTask({"path": str(path), "test_fraction": 0.2, "seed": 1, "match": "exact"})
    exs = {ex.meta["row"]: ex for ex in all_examples(task)}
    assert exs[1].question == "Give three tips for staying healthy."
    assert exs[1].answer.startswith("1.Eat a balanced diet") and "\n2. Exercise" in exs[1].answer
    assert exs[2].question == "Identify the odd one out.\n\nTwitter, Instagram, Telegram"
    assert exs[4].answer == "Bonjour, propriétaire du café !"
    assert exs[5].answer == LONG.strip()
    # a gold answer spans lines, so the whole text after `Answer:` is the model's answer
    assert task.answer_span() == "rest"
    assert task.extract("thinking\nAnswer: Telegram\n") == "Telegram"
    assert_round_trip(task)


def test_alpaca_history_and_bad_rows(tmp_path: Path) -> None:
    row = {"instruction": "And in French?", "input": "", "output": "Bonjour",
           "system": "Translate.", "history": [["Hello in German?", "Hallo"]]}
    rec = parse("alpaca", row, FIELDS)
    assert rec.question == ("System: Translate.\n\nUser: Hello in German?\n\n"
                            "Assistant: Hallo\n\nUser: And in French?")
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        ALPACA[1], {"instruction": "Say hi.", "input": "", "output": ""},
        {"instruction": "Say hi.", "output": ["hi"]}, ALPACA[2]])
    with pytest.raises(BadRow) as info:
        JsonlQaTask({"path": str(path)}).examples("train")
    assert info.value.message.startswith(f'{path} line 2: field "output" is empty')
    task = JsonlQaTask({"path": str(path), "on_bad_row": "skip"})
    with structlog.testing.capture_logs() as logs:
        assert len(all_examples(task)) == 2
    skipped = [e for e in logs if e["event"] == "task_rows_skipped"]
    assert skipped and skipped[0]["skipped"] == 2
    assert 'line 3: field "output" must be a string, got list' in skipped[0]["first"][1]
    loaded = [e for e in logs if e["event"] == "task_data_loaded"]
    assert loaded[0]["format"] == "alpaca" and loaded[0]["rows"] == 2
    malformed = [i for i in task.check_data() if i.kind == "malformed"]
    assert len(malformed) == 1 and "2 bad row(s) skipped" in malformed[0].message


# --- Q/A with a field mapping, detection ------------------------------------------------------


def test_field_mapping_and_legacy_prompt_completion(tmp_path: Path) -> None:
    rows = [{"prompt": f"Capital of country {i}?", "completion": f"City {i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "legacy.jsonl", rows)
    mapped = JsonlQaTask({"path": str(path), "fields": {"question": "prompt",
                                                        "answer": "completion"}})
    auto = JsonlQaTask({"path": str(path)})
    assert mapped.examples("train") == auto.examples("train")
    assert auto.examples("train")[0].meta["format"] == "qa"
    renamed = write_jsonl(tmp_path / "chat.jsonl", [
        {"dialog": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}])
    task = JsonlQaTask({"path": str(renamed), "fields": {"messages": "dialog"},
                        "test_fraction": 0.01})
    assert [ex.answer for ex in all_examples(task)] == ["Yo"]


def test_detection_uses_the_first_valid_row_and_format_overrides(tmp_path: Path) -> None:
    rows: list[object] = ["{not json", {"foo": 1}, ALPACA[1], ALPACA[2],
                          {"question": "Q?", "answer": "A"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(BadRow, match=r"mixed.jsonl line 1 column 2: invalid JSON"):
        JsonlQaTask({"path": str(path)}).examples("train")
    task = JsonlQaTask({"path": str(path), "on_bad_row": "skip", "test_fraction": 0.01})
    assert len(all_examples(task)) == 2
    source = task.stats().sources[0]
    assert source.format == "alpaca" and source.skipped == 3
    assert "fits no known format (fields: foo)" in source.bad[1]
    assert 'line 5: field "instruction" is missing (fields: answer, question)' in source.bad[2]
    forced = JsonlQaTask({"path": str(path), "on_bad_row": "skip", "format": "qa",
                          "test_fraction": 0.01})
    assert [ex.answer for ex in all_examples(forced)] == ["A"]


def test_question_fields_conflict_and_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="contradicts fields.question"):
        JsonlQaTask({"path": "x", "question_field": "q", "fields": {"question": "prompt"}})
    with pytest.raises(ConfigError, match="unknown key 'prompt'") as info:
        JsonlQaTask({"path": "x", "fields": {"prompt": "q"}})
    assert info.value.field == "task.params.fields.prompt"
    with pytest.raises(ConfigError, match="'format' = 'chatml' is not allowed"):
        JsonlQaTask({"path": "x", "format": "chatml"})
    with pytest.raises(ConfigError, match="`test_split` needs `dataset`"):
        JsonlQaTask({"path": "x", "test_split": "test"})
    with pytest.raises(ConfigError, match="either `dataset` or data files"):
        JsonlQaTask({"path": "x", "dataset": "acme/x"})


def test_answer_line_and_regex_targets(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}\n#### {2 * i}"}]}
            for i in range(1, 6)]
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    task = JsonlQaTask({"path": str(path), "extract_regex": r"####\s*(\S+)",
                        "test_fraction": 0.2, "match": "exact"})
    exs = all_examples(task)
    assert sorted(ex.answer for ex in exs) == ["10", "2", "4", "6", "8"]
    ex = next(e for e in exs if e.answer == "4")
    assert task.reference_reasoning(ex.question, "4") == "2 + 2 = 4"
    assert task.extract("2 + 2 = 4\n#### 4") == "4"
    assert_round_trip(task)  # the student writes `Answer: 4`: the regex falls back to it


# --- CSV and Parquet --------------------------------------------------------------------------


def test_csv_with_quoted_newlines_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "completion"])
        w.writerow(["Line one\nline two?", "Ja, «sehr» gut"])
        w.writerow(["Q2?", "A2"])
        w.writerow(["Q3?", ""])
    task = JsonlQaTask({"path": str(path), "fields": {"question": "prompt",
                                                      "answer": "completion"}})
    with pytest.raises(BadRow) as info:
        task.examples("train")
    assert info.value.message.startswith(f'{path} line 5: field "completion" is empty')
    skip = JsonlQaTask({"path": str(path), "on_bad_row": "skip", "test_fraction": 0.01,
                        "fields": {"question": "prompt", "answer": "completion"}})
    lines = sorted((ex.meta["line"], ex.question) for ex in all_examples(skip))
    assert lines == [(2, "Line one\nline two?"), (4, "Q2?")]


def test_parquet_alpaca_as_on_the_hub(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{**r, "text": f"Below is an instruction...\n\n### Instruction:\n{r['instruction']}"}
            for r in ALPACA]
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    task = JsonlQaTask({"path": str(path), "test_fraction": 0.25})
    exs = all_examples(task)
    assert len(exs) == 4 and {ex.meta["format"] for ex in exs} == {"alpaca"}
    assert all("row" in ex.meta for ex in exs)


# --- datasets ------------------------------------------------------------------------------


@pytest.fixture
def hf() -> Any:
    return pytest.importorskip("datasets")


def test_save_to_disk_dataset_dict_and_dataset(tmp_path: Path, hf: Any) -> None:
    train = hf.Dataset.from_list(ALPACA[:3])
    test = hf.Dataset.from_list(ALPACA[3:])
    hf.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    task = JsonlQaTask({"dataset": str(tmp_path / "dd"), "test_split": "test"})
    assert len(task.examples("train")) == 3
    assert [ex.answer for ex in task.examples("test")] == ["Bonjour, propriétaire du café !"]
    assert task.examples("test")[0].meta == {"file": f"{tmp_path / 'dd'}[test]", "row": 1,
                                             "format": "alpaca"}
    with pytest.raises(ConfigError, match=r"has no split 'validation' \(splits: test, train\)"):
        JsonlQaTask({"dataset": str(tmp_path / "dd"), "test_split": "validation"}).examples(
            "train")
    # Arrow needs one type per column: the rows with string content (list content is JSON's)
    rows = [OPENAI_CHAT[i] for i in (0, 1, 2, 4)]
    hf.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    one = JsonlQaTask({"dataset": str(tmp_path / "one"), "test_fraction": 0.25})
    exs = sorted(all_examples(one), key=lambda ex: ex.meta["row"])
    # Arrow gives every message every key (None where absent): still read as messages
    assert len(exs) == 4 and {ex.meta["format"] for ex in exs} == {"messages"}
    assert exs[2].answer == "It is 18 °C in San Francisco."
    assert "Tool result (get_current_weather)" in exs[2].question
    assert exs[3].answer == "72"


def test_local_data_folder_via_datasets(tmp_path: Path, hf: Any) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [*SHAREGPT[:2]])
    write_jsonl(folder / "test.jsonl", [SHAREGPT[0]])
    task = JsonlQaTask({"dataset": str(folder), "test_split": "test",
                        "cache_dir": str(tmp_path / "hf")})
    assert len(task.examples("train")) == 2 and len(task.examples("test")) == 1
    assert task.check_data()[0].kind == "overlap"


def _cache_as_hub(hf: Any, tmp_path: Path, repo: str, rows: list[dict[str, Any]]) -> Path:
    """Leave in `cache/datasets` what `load_dataset(repo)` leaves after a download."""
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    hf.load_dataset("json", data_files={"train": str(src)}, cache_dir=str(tmp_path / "build"))
    built = Path(glob.glob(str(tmp_path / "build" / "json" / "*" / "0.0.0" / "*"))[0])
    owner, name = repo.split("/")
    dst = tmp_path / "cache" / "datasets" / f"{owner}___{name}" / "default" / "0.0.0" / "abc"
    shutil.copytree(built, dst)
    for f in dst.glob("json-*"):
        f.rename(dst / f.name.replace("json-", f"{name}-", 1))
    info = json.loads((dst / "dataset_info.json").read_text())
    info.update(config_name="default", dataset_name=name)
    (dst / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path / "cache"


def test_hub_id_from_the_datasets_cache_offline(tmp_path: Path, hf: Any) -> None:
    cache = _cache_as_hub(hf, tmp_path, "acme/tiny-alpaca", ALPACA)
    before = hf.config.HF_HUB_OFFLINE
    task = JsonlQaTask({"dataset": "acme/tiny-alpaca", "cache_dir": str(cache),
                        "test_fraction": 0.25})
    assert len(all_examples(task)) == 4
    assert task.examples("train")[0].meta["file"] == "acme/tiny-alpaca[train]"
    assert hf.config.HF_HUB_OFFLINE == before  # offline only while loading


def test_hub_id_from_a_hub_snapshot(tmp_path: Path, hf: Any) -> None:
    repo = tmp_path / "cache" / "hub" / "datasets--acme--chat"
    snap = repo / "snapshots" / ("a" * 40) / "data"
    snap.mkdir(parents=True)
    write_jsonl(snap / "train.jsonl", OPENAI_CHAT[:4])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    task = JsonlQaTask({"dataset": "acme/chat", "cache_dir": str(tmp_path / "cache"),
                        "test_fraction": 0.25})
    assert len(all_examples(task)) == 4


def test_uncached_hub_id_says_offline_and_how_to_download(tmp_path: Path, hf: Any) -> None:
    task = JsonlQaTask({"dataset": "acme/not-here", "cache_dir": str(tmp_path / "cache")})
    before = hf.config.HF_HUB_OFFLINE
    with pytest.raises(ConfigError) as info:
        task.examples("train")
    assert hf.config.HF_HUB_OFFLINE == before
    err = info.value
    assert "'acme/not-here' is not in the local cache" in err.message
    assert "HF_DATASETS_OFFLINE=1" in err.message
    assert "load_dataset('acme/not-here')" in err.hint
    assert "hf download --repo-type dataset acme/not-here" in err.hint
    assert err.field == "task.params.dataset"
    with pytest.raises(ConfigError, match="no such directory"):
        JsonlQaTask({"dataset": str(tmp_path / "nope")}).examples("train")


def test_where_renders_line_row_and_column() -> None:
    assert str(Where("a.jsonl", line=3)) == "a.jsonl line 3"
    assert str(Where("a.jsonl", line=3, column=7)) == "a.jsonl line 3 column 7"
    assert str(Where("acme/x[train]", row=9)) == "acme/x[train] row 9"
