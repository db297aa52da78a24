"""Mahjong winning tiles: ground truth from the library, generator, reasoner, verifier."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mahjong.agari import Agari
from mahjong.tile import TilesConverter

from plugins.tasks.mahjong import (
    MahjongTask,
    decompose,
    generate_hand,
    hand_of,
    parse_tiles,
    question_for,
    to_compact,
    to_counts,
    winning_tiles,
)
from stratosd.api import DataIssue
from stratosd.errors import ConfigError
from stratosd.plugins import Plugins, make_plugin_manager

TASK_MODULES = ("plugins.tasks.jsonl_qa", "plugins.tasks.mahjong", "plugins.tasks.gsm8k")

LEVEL_SIZES = {1: 4, 2: 7, 3: 13, 4: 13}


def library_answer(compact: str) -> set[str]:
    """Winning tiles straight from the library (converter + agari), 5th copy excluded."""
    counts = TilesConverter.one_line_string_to_34_array(compact)
    out = set()
    for t in range(34):
        if counts[t] == 4:
            continue
        counts[t] += 1
        if Agari.is_agari(counts):
            out.add(f"{t % 9 + 1}{'mpsz'[t // 9]}")
        counts[t] -= 1
    return out


@pytest.fixture(scope="module")
def packs() -> dict[int, MahjongTask]:
    return {
        lvl: MahjongTask({"difficulty": lvl, "n_train": 60, "n_test": 30, "seed": 3})
        for lvl in LEVEL_SIZES
    }


@pytest.mark.parametrize("level", sorted(LEVEL_SIZES))
def test_generated_answers_agree_with_library(packs: dict[int, MahjongTask], level: int) -> None:
    task = packs[level]
    for split in ("train", "test"):
        for ex in task.examples(split):
            hand = hand_of(ex.question)
            assert hand is not None and len(hand) == LEVEL_SIZES[level]
            assert max(to_counts(hand)) <= 4
            suits = {t // 9 for t in hand}
            if level < 4:
                assert len(suits) == 1 and 3 not in suits
            gold = set(ex.answer.split())
            assert gold, "only tenpai hands"
            assert gold == library_answer(ex.meta["hand"])
            assert ex.answer == task.extract(f"Answer: {ex.answer}")


def test_display_decomposition_matches_library_on_many_hands() -> None:
    rng = random.Random(7)
    for level in LEVEL_SIZES:
        for _ in range(75):
            counts = to_counts(generate_hand(level, rng))
            wins = set(winning_tiles(counts))
            for t in range(34):
                if counts[t] == 4:
                    assert t not in wins
                    continue
                counts[t] += 1
                assert (decompose(counts) is not None) == (t in wins)
                counts[t] -= 1


def test_fifth_copy_never_wins() -> None:
    assert library_answer("1111234m") == {"4m"}
    task = MahjongTask()
    assert winning_tiles(to_counts(parse_tiles("1111m") or [])) == []
    q = question_for("1111234m")
    assert task.reference_reasoning(q, "4m") is not None
    assert task.verify(q, "+1m: 11m 111m 234m\n+4m: 44m 111m 123m", "1m 4m") is False


def test_special_forms_follow_the_library() -> None:
    task = MahjongTask()
    for compact in ("19m19p19s1234567z", "19m19p19s1234566z", "1133557799m22p4z"):
        q = question_for(compact)
        answer = " ".join(sorted(library_answer(compact), key=lambda s: ("mpsz".index(s[1]), s)))
        reasoning = task.reference_reasoning(q, task.extract(f"Answer: {answer}") or "")
        assert reasoning is not None
        assert task.verify(q, reasoning, answer) is True
    # Seven pairs only counts with seven *different* pairs (library rule).
    assert "4z" not in library_answer("1111335577m22p4z")


def test_deterministic_by_seed_and_test_split_fixed() -> None:
    a = MahjongTask({"difficulty": 2, "n_train": 30, "n_test": 20, "seed": 1})
    b = MahjongTask({"difficulty": 2, "n_train": 30, "n_test": 20, "seed": 1})
    c = MahjongTask({"difficulty": 2, "n_train": 5, "n_test": 20, "seed": 1})
    d = MahjongTask({"difficulty": 2, "n_train": 30, "n_test": 20, "seed": 2})
    assert a.examples("train") == b.examples("train")
    assert a.examples("test") == b.examples("test") == c.examples("test")
    assert a.examples("test") != d.examples("test")


@pytest.mark.parametrize("level", sorted(LEVEL_SIZES))
def test_splits_disjoint_and_distinct(packs: dict[int, MahjongTask], level: int) -> None:
    task = packs[level]
    train = [ex.meta["hand"] for ex in task.examples("train")]
    test = [ex.meta["hand"] for ex in task.examples("test")]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert task.check_data() == []


def test_level1_space_exhausted_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="distinct hands"):
        MahjongTask({"difficulty": 1, "n_train": 800, "n_test": 10}).examples("train")


@pytest.mark.parametrize("level", sorted(LEVEL_SIZES))
def test_reference_reasoning_passes_verifier(packs: dict[int, MahjongTask], level: int) -> None:
    task = packs[level]
    for ex in task.examples("train") + task.examples("test"):
        reasoning = task.reference_reasoning(ex.question, ex.answer)
        assert reasoning is not None
        assert task.verify(ex.question, reasoning, ex.answer) is True
        target = task.format_target(reasoning, ex.answer)
        assert task.extract(target) == ex.answer
        assert task.verify(ex.question, target, ex.answer) is True


def test_reference_refuses_a_wrong_answer() -> None:
    task = MahjongTask()
    assert task.reference_reasoning(question_for("1123m"), "4m") is None
    assert task.reference_reasoning("no hand here", "4m") is None


def corruptions(reasoning: str, answer: str) -> list[tuple[str, str, str]]:
    """(kind, reasoning, answer) variants that must all fail verification."""
    lines = reasoning.splitlines()
    win = next(i for i, line in enumerate(lines) if not line.endswith(": no"))
    head, groups = lines[win].split(": ")
    parts = groups.split()
    j = next((j for j, g in enumerate(parts) if len(g) == 4), len(parts) - 1)
    digits, suit = parts[j][:-1], parts[j][-1]
    out = []

    def replaced(new_groups: list[str]) -> str:
        return "\n".join(lines[:win] + [f"{head}: " + " ".join(new_groups)] + lines[win + 1 :])

    def with_group(group: str) -> list[str]:
        return parts[:j] + [group] + parts[j + 1 :]

    # wrong meld: 123m -> 124m
    bumped = digits[:-1] + str(int(digits[-1]) % 9 + 1)
    out.append(("wrong meld", replaced(with_group(bumped + suit)), answer))
    # missing tile: 123m -> 12m
    out.append(("missing tile", replaced(with_group(digits[:-1] + suit)), answer))
    # extra tile: 11m -> 111m
    out.append(("extra tile", replaced([parts[0][0] + parts[0], *parts[1:]]), answer))
    # groups that reuse the right tiles in an invalid shape: 11m 123m -> 11m1m 23m
    out.append(
        (
            "regrouped",
            replaced(
                [parts[0] + parts[j][0] + suit] + parts[1:j] + [digits[1:] + suit] + parts[j + 1 :]
            ),
            answer,
        )
    )
    # a winning tile claimed `no` while still in the answer
    out.append(
        ("denied winner", "\n".join(lines[:win] + [f"{head}: no"] + lines[win + 1 :]), answer)
    )
    # wrong answer: a tile the reasoning says `no` to, added to the answer
    no_tile = next((line[1:3] for line in lines if line.endswith(": no")), None)
    if no_tile is not None:
        out.append(("wrong answer", reasoning, f"{answer} {no_tile}"))
    # missing answer tile: the reasoning still shows it wins
    ans = answer.split()
    if len(ans) > 1:
        out.append(("dropped tile", reasoning, " ".join(ans[1:])))
    # no reasoning at all
    out.append(("empty", "", answer))
    return out


@pytest.mark.parametrize("level", sorted(LEVEL_SIZES))
def test_corrupted_derivations_fail(packs: dict[int, MahjongTask], level: int) -> None:
    task = packs[level]
    kinds = set()
    for ex in task.examples("test")[:20]:
        reasoning = task.reference_reasoning(ex.question, ex.answer)
        assert reasoning is not None
        for kind, bad_reasoning, bad_answer in corruptions(reasoning, ex.answer):
            assert task.verify(ex.question, bad_reasoning, bad_answer) is False, (kind, ex)
            kinds.add(kind)
    assert {"wrong meld", "missing tile", "extra tile", "wrong answer", "regrouped"} <= kinds


def test_verifier_handpicked_cases() -> None:
    task = MahjongTask()
    q = question_for("1123m")
    gold = " ".join(sorted(library_answer("1123m")))
    good = task.reference_reasoning(q, gold)
    assert good is not None and task.verify(q, good, gold)
    assert gold == "1m 4m"
    assert task.verify(q, "+1m: 11m 123m\n+4m: 11m 234m", gold)
    # the decomposition must be of hand + tile: `+4m` shown as hand + 1m instead
    assert not task.verify(q, "+1m: 11m 123m\n+4m: 11m 123m", gold)
    assert not task.verify(q, "+1m: 111m 23m\n+4m: 11m 234m", gold)
    # a tile both shown winning and denied
    assert not task.verify(q, "+1m: 11m 123m\n+4m: 11m 234m\n+4m: no", gold)
    # a quad is not a meld; four groups of pairs are not seven pairs
    assert not task.verify(question_for("1122m"), "+1m: 111m 122m", "1m 2m")
    # a stated Answer line that disagrees with the answer argument
    assert not task.verify(q, good + "\nAnswer: 1m", gold)
    # unparseable answer or hand
    assert not task.verify(q, good, "banana")
    assert not task.verify("Hand: ???", good, gold)
    # a correct derivation of the wrong tile set (4m only) fails on ground truth
    assert not task.verify(q, "+4m: 11m 234m", "4m")


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Answer: 2m 5m 8m", "2m 5m 8m"),
        ("blah\nAnswer: 8m, 2m,5m.", "2m 5m 8m"),
        ("Answer: 258m", "2m 5m 8m"),
        ("Answer: 5m 5m 2m", "2m 5m"),
        ("Answer: 1z 9p 3s", "9p 3s 1z"),
        ("Answer: 2m\nAnswer: 3p", "3p"),
        ("answer:   `4s`  ", "4s"),
        ("Answer: [1m, 4m]", "1m 4m"),
        ("Answer:", None),
        ("2m 5m", None),
        ("Answer: 8z", None),
        ("Answer: 2m and 5m", None),
        ("Answer: 0m", None),
    ],
)
def test_extract(output: str, expected: str | None) -> None:
    assert MahjongTask().extract(output) == expected


def test_score_and_partial_score() -> None:
    task = MahjongTask()
    assert task.score("5m 2m", "2m 5m") == 1.0
    assert task.score("2m", "2m 5m") == 0.0
    assert task.score(None, "2m") == 0.0
    assert task.partial_score("2m", "2m 5m") == 0.5
    assert task.partial_score("2m 3m", "2m 5m") == pytest.approx(1 / 3)
    assert task.partial_score("2m 5m", "2m 5m") == 1.0
    assert task.partial_score(None, "2m 5m") == 0.0


def test_question_shape_and_prompt() -> None:
    ex = MahjongTask({"n_train": 1, "n_test": 1}).examples("train")[0]
    assert ex.question == f"Hand: {ex.meta['hand']}\nWhich tiles complete this hand?"
    assert to_compact(hand_of(ex.question) or []) == ex.meta["hand"]
    prompt = MahjongTask().prompt(ex.question)
    assert prompt.startswith(ex.question) and prompt.endswith("\n")
    assert "Answer:" in MahjongTask().injection_prompt(ex.question, ex.answer)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"difficulty": 5}, "'difficulty'"),
        ({"difficulty": "2"}, "'difficulty' must be int"),
        ({"n_train": -1}, "'n_train'"),
        ({"n_test": True}, "'n_test' must be int"),
        ({"levels": 2}, "unknown param 'levels'"),
    ],
)
def test_bad_params(params: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        MahjongTask(params)
    assert info.value.field is not None and info.value.field.startswith("task.params.")


def test_discoverable() -> None:
    plugins = Plugins(make_plugin_manager(TASK_MODULES, autoload=False))
    assert "mahjong-winning-tiles" in plugins.tasks
    task = plugins.task("mahjong-winning-tiles", {"difficulty": 3, "n_train": 2, "n_test": 2})
    assert isinstance(task, MahjongTask)
    assert len(task.examples("test")) == 2
    assert all(isinstance(i, DataIssue) for i in task.check_data())


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    size=st.sampled_from([4, 7, 13]),
    suits=st.sampled_from(["m", "p", "s", "mpsz"]),
    data=st.data(),
)
def test_any_hand_reasoning_agrees_with_library(
    size: int, suits: str, data: st.DataObject
) -> None:
    """Hands not made by the generator: display decompositions and verifier follow the library."""
    pool = [t for t in range(34) if "mpsz"[t // 9] in suits]
    tiles = data.draw(st.lists(st.sampled_from(pool), min_size=size, max_size=size))
    counts = to_counts(tiles)
    if max(counts) > 4:
        return
    wins = winning_tiles(counts)
    compact = to_compact(tiles)
    assert {f"{t % 9 + 1}{'mpsz'[t // 9]}" for t in wins} == library_answer(compact)
    for t in range(34):
        if counts[t] < 4:
            counts[t] += 1
            assert (decompose(counts) is not None) == (t in wins)
            counts[t] -= 1
    if wins:
        task = MahjongTask()
        q = question_for(compact)
        answer = task.extract("Answer: " + " ".join(f"{t % 9 + 1}{'mpsz'[t // 9]}" for t in wins))
        assert answer is not None
        reasoning = task.reference_reasoning(q, answer)
        assert reasoning is not None and task.verify(q, reasoning, answer) is True


@pytest.mark.parametrize("level", sorted(LEVEL_SIZES))
def test_wins_derivation_shows_only_winners_and_passes_verifier(level: int) -> None:
    full = MahjongTask({"difficulty": level, "n_train": 30, "n_test": 10, "seed": 3})
    wins = MahjongTask({"difficulty": level, "n_train": 30, "n_test": 10, "seed": 3,
                        "derivation": "wins"})
    assert wins.examples("train") == full.examples("train")
    for ex in wins.examples("train"):
        every = full.reference_reasoning(ex.question, ex.answer) or ""
        reasoning = wins.reference_reasoning(ex.question, ex.answer)
        assert reasoning == "\n".join(x for x in every.splitlines() if not x.endswith(": no"))
        assert len(reasoning.splitlines()) == len(ex.answer.split())
        assert wins.verify(ex.question, reasoning, ex.answer) is True
        assert wins.verify(ex.question, reasoning.splitlines()[0], ex.answer) is (
            len(ex.answer.split()) == 1)
    assert "`+X: no`" not in wins.injection_prompt("Hand: 1123m", "1m 4m")
    with pytest.raises(ConfigError, match="derivation"):
        MahjongTask({"derivation": "short"})
