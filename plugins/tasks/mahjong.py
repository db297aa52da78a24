"""Mahjong winning tiles: list every tile that completes a hand (the `mahjong` library decides).

Tiles use compact notation (`123m456p789s11z`); an answer is the sorted tile list `2m 5m 8m`.
The reference reasoning tries each candidate tile and shows either a decomposition of
hand + tile into a pair and melds (`+2m: 11m 123m`) or `+4m: no`; with `derivation = "wins"`
it shows only the winning tiles' decompositions (a third of the length: what a tiny student
learns in minutes on a CPU). The verifier re-checks every claimed decomposition and compares
the answer with the library's ground truth.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from plugins.tasks.base import Param, data_issues, last_marker_text, validate_params
from stratosd import hookimpl
from stratosd.api import DataIssue, Example, Split, TaskPack
from stratosd.errors import ConfigError

SUITS = "mpsz"
HONOR = 27  # first honour tile in 34-format
ORPHANS = (0, 8, 9, 17, 18, 26, 27, 28, 29, 30, 31, 32, 33)
MELDS_PER_LEVEL = {1: 1, 2: 2, 3: 4, 4: 4}
CHIITOI_SHARE = 0.1  # share of 13-tile hands built as seven pairs minus one
MAX_REPEATS = 3000  # repeats in a row before a level counts as exhausted

_GROUP_RE = re.compile(r"([1-9]+)([mpsz])")
_HAND_RE = re.compile(r"Hand:\s*((?:[1-9]+[mpsz])+)")
_LINE_RE = re.compile(r"^\s*\+([1-9][mpsz])\s*:\s*(.*?)\s*$", re.MULTILINE)
_ANSWER_TOKEN_RE = re.compile(r"(?:[1-9]+[mpsz])+")

Group = tuple[int, ...]

# --- notation -------------------------------------------------------------------------


def tile_name(t: int) -> str:
    """`5m` for tile 4 of the 34-format."""
    return f"{t % 9 + 1}{SUITS[t // 9]}"


def parse_tiles(text: str) -> list[int] | None:
    """Tiles (34-format indices, sorted) in compact or spaced notation; None if unparseable."""
    tiles: list[int] = []
    for token in re.split(r"[\s,;]+", text.strip().strip("[](){}.")):
        if not token:
            continue
        if not _ANSWER_TOKEN_RE.fullmatch(token):
            return None
        for digits, suit in _GROUP_RE.findall(token):
            for d in digits:
                n = int(d)
                if suit == "z" and n > 7:
                    return None
                tiles.append(SUITS.index(suit) * 9 + n - 1)
    return sorted(tiles)


def to_counts(tiles: Sequence[int]) -> list[int]:
    """34-format count array."""
    counts = [0] * 34
    for t in tiles:
        counts[t] += 1
    return counts


def to_compact(tiles: Sequence[int]) -> str:
    """`1123m45p` for a tile list (sorted by suit m, p, s, z then number)."""
    out = []
    for s, suit in enumerate(SUITS):
        digits = "".join(str(t % 9 + 1) for t in sorted(tiles) if t // 9 == s)
        if digits:
            out.append(digits + suit)
    return "".join(out)


def format_answer(tiles: Sequence[int]) -> str:
    """Canonical answer: sorted unique tiles separated by spaces."""
    return " ".join(tile_name(t) for t in sorted(set(tiles)))


# --- ground truth (the mahjong library) and decompositions ----------------------------


def winning_tiles(counts: Sequence[int]) -> list[int]:
    """Every tile that completes the hand per `mahjong.agari.Agari`; a 5th copy never does."""
    from mahjong.agari import Agari

    out = []
    work = list(counts)
    for t in range(34):
        if work[t] >= 4:
            continue
        work[t] += 1
        if Agari.is_agari(work):
            out.append(t)
        work[t] -= 1
    return out


def _is_run(g: Group) -> bool:
    return (
        len(g) == 3
        and g[0] < HONOR
        and g[0] // 9 == g[2] // 9
        and g[1] == g[0] + 1
        and g[2] == g[0] + 2
    )


def _is_same(g: Group, n: int) -> bool:
    return len(g) == n and all(t == g[0] for t in g)


def _melds(counts: list[int], start: int) -> list[Group] | None:
    """Split counts into melds (pon first, then chi), lowest tile first; None if impossible."""
    i = start
    while i < 34 and counts[i] == 0:
        i += 1
    if i == 34:
        return []
    if counts[i] >= 3:
        counts[i] -= 3
        rest = _melds(counts, i)
        counts[i] += 3
        if rest is not None:
            return [(i, i, i), *rest]
    if i < HONOR and i % 9 <= 6 and counts[i + 1] and counts[i + 2]:
        for k in (i, i + 1, i + 2):
            counts[k] -= 1
        rest = _melds(counts, i)
        for k in (i, i + 1, i + 2):
            counts[k] += 1
        if rest is not None:
            return [(i, i + 1, i + 2), *rest]
    return None


def decompose(counts: Sequence[int]) -> list[Group] | None:
    """One way to read a complete hand: pair + melds, else seven pairs, else thirteen orphans.

    Used to *show* why a tile wins; which tiles win is decided by the library.
    """
    work = list(counts)
    if sum(work) % 3 == 2:
        for p in range(34):
            if work[p] >= 2:
                work[p] -= 2
                melds = _melds(work, 0)
                work[p] += 2
                if melds is not None:
                    return [(p, p), *melds]
    if sum(work) == 14:
        if all(c in (0, 2) for c in work) and work.count(2) == 7:
            return [(t, t) for t in range(34) if work[t] == 2]
        if all(work[t] >= 1 for t in ORPHANS) and sum(work[t] for t in ORPHANS) == 14:
            return [(t, t) if work[t] == 2 else (t,) for t in ORPHANS]
    return None


def check_decomposition(groups: Sequence[Group], counts: Sequence[int]) -> bool:
    """Are these groups a complete hand made exactly of `counts` (≤4 copies of any tile)?"""
    if any(c > 4 for c in counts) or to_counts([t for g in groups for t in g]) != list(counts):
        return False
    pairs = [g for g in groups if _is_same(g, 2)]
    melds = [g for g in groups if _is_run(g) or _is_same(g, 3)]
    if len(pairs) == 1 and len(melds) == len(groups) - 1:
        return True
    if len(groups) == 7 and len(pairs) == 7 and len({g[0] for g in pairs}) == 7:
        return True
    singles = [g for g in groups if len(g) == 1]
    return (
        len(groups) == 13
        and len(pairs) == 1
        and len(singles) == 12
        and sorted(g[0] for g in groups) == list(ORPHANS)
    )


def format_groups(groups: Sequence[Group]) -> str:
    """`11m 123m 555p`."""
    return " ".join(to_compact(g) for g in groups)


# --- generator --------------------------------------------------------------------------


def _complete_hand(level: int, rng: random.Random) -> list[int] | None:
    """A complete hand for the level (pair + melds, sometimes seven pairs); None on overflow."""
    one_suit = level < 4
    base = rng.randrange(3) * 9
    if level >= 3 and rng.random() < CHIITOI_SHARE:
        pool = list(range(base, base + 9)) if one_suit else list(range(34))
        return [t for t in rng.sample(pool, 7) for _ in range(2)]

    def pick(kind: str) -> Group:
        suit = base if one_suit else rng.randrange(4) * 9
        if suit == HONOR:
            t = HONOR + rng.randrange(7)
            return (t,) * (2 if kind == "pair" else 3)
        if kind == "pair":
            t = suit + rng.randrange(9)
            return (t, t)
        if rng.random() < 0.6:
            t = suit + rng.randrange(7)
            return (t, t + 1, t + 2)
        t = suit + rng.randrange(9)
        return (t, t, t)

    groups = [pick("pair")] + [pick("meld") for _ in range(MELDS_PER_LEVEL[level])]
    tiles = [t for g in groups for t in g]
    return tiles if max(to_counts(tiles)) <= 4 else None


def generate_hand(level: int, rng: random.Random) -> list[int]:
    """A tenpai hand (complete hand minus one tile) of the level's size, sorted."""
    while True:
        tiles = _complete_hand(level, rng)
        if tiles is not None:
            tiles.pop(rng.randrange(len(tiles)))
            return sorted(tiles)


def generate_split(
    level: int, n: int, rng: random.Random, exclude: set[str] | None = None
) -> list[list[int]]:
    """n distinct hands not in `exclude`; ConfigError when the level has too few."""
    seen: set[str] = set()
    exclude = exclude or set()
    hands: list[list[int]] = []
    misses = 0
    while len(hands) < n:
        hand = generate_hand(level, rng)
        key = to_compact(hand)
        if key in seen or key in exclude:
            misses += 1
            if misses > MAX_REPEATS:
                raise ConfigError(
                    f"mahjong difficulty {level}: found only {len(hands)} distinct hands "
                    f"({misses} repeats in a row), {n} asked for",
                    hint="lower n_train/n_test or raise the difficulty",
                    field="task.params.n_train",
                )
            continue
        seen.add(key)
        hands.append(hand)
        misses = 0
    return hands


# --- the task pack ------------------------------------------------------------------------


class MahjongTask(TaskPack):
    """Which tiles complete this hand? Generated hands, four difficulty levels."""

    name: ClassVar[str] = "mahjong-winning-tiles"
    description: ClassVar[str] = (
        "Mahjong winning tiles: list every tile that completes a hand (mahjong library oracle)"
    )
    PARAMS: ClassVar[dict[str, Param]] = {
        "difficulty": Param(
            (int,),
            1,
            "1 = one suit 4 tiles, 2 = 7 tiles, 3 = 13 tiles, 4 = all suits 13 tiles",
            choices=(1, 2, 3, 4),
        ),
        "n_train": Param((int,), 200, "number of training hands", min=0),
        "n_test": Param((int,), 100, "number of held-out test hands", min=1),
        "seed": Param((int,), 0, "seed of the generator (train and test have their own streams)"),
        "derivation": Param(
            (str,),
            "all",
            "reasoning format: all = a line per candidate tile (`+4m: no` too), "
            "wins = only the winning tiles' decompositions",
            choices=("all", "wins"),
        ),
    }

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self.cfg = validate_params(self.name, self.params, self.PARAMS)
        self._splits: dict[str, list[Example]] | None = None

    # data ------------------------------------------------------------------------------------

    def _build(self) -> dict[str, list[Example]]:
        level, seed = self.cfg["difficulty"], self.cfg["seed"]
        # The test split has its own stream so it never depends on n_train.
        test = generate_split(
            level, self.cfg["n_test"], random.Random(f"mahjong-test-{level}-{seed}")
        )
        held = {to_compact(h) for h in test}
        train = generate_split(
            level, self.cfg["n_train"], random.Random(f"mahjong-train-{level}-{seed}"), held
        )
        return {
            split: [self._example(split, i, h, level) for i, h in enumerate(hands)]
            for split, hands in (("train", train), ("test", test))
        }

    @staticmethod
    def _example(split: str, i: int, hand: list[int], level: int) -> Example:
        compact = to_compact(hand)
        return Example(
            id=f"mj{level}-{split}-{i:05d}",
            question=question_for(compact),
            answer=format_answer(winning_tiles(to_counts(hand))),
            meta={"hand": compact, "difficulty": level},
        )

    def examples(self, split: Split) -> list[Example]:
        """Generated hands of the split, deterministic by seed."""
        if self._splits is None:
            self._splits = self._build()
        return self._splits[split]

    def check_data(self) -> list[DataIssue]:
        """Generated splits are distinct and disjoint by construction; re-checked anyway."""
        return data_issues(lambda: {s: self.examples(s) for s in ("train", "test")})

    # prompts ----------------------------------------------------------------------------------

    def prompt(self, question: str) -> str:
        """The question and the answer format (short: tiny students read it verbatim)."""
        return f"{question}\nAnswer with the tiles, e.g. `Answer: 2m 5m`.\n"

    def injection_prompt(self, question: str, answer: str) -> str:
        """Show the answer and the derivation format the verifier reads."""
        if self.cfg["derivation"] == "wins":
            lines = ("For each tile X that completes the hand write one line: `+X: ` and the "
                     "hand plus X split into one pair and melds (e.g. `+2m: 11m 123m`). ")
        else:
            lines = ("For each candidate tile X write one line: `+X: ` and the hand plus X "
                     "split into one pair and melds (e.g. `+2m: 11m 123m`), or `+X: no` when "
                     "it does not win. ")
        return (f"{question}\nThe correct answer is: {answer}\n{lines}"
                "End with `Answer: <tiles>`.\n")

    # answers ----------------------------------------------------------------------------------

    def extract(self, output: str) -> str | None:
        """Tiles after the last `Answer:` in canonical form; None if absent or unparseable."""
        text = last_marker_text(output)
        if text is None:
            return None
        tiles = parse_tiles(text.replace("`", ""))
        return format_answer(tiles) if tiles else None

    def score(self, predicted: str | None, gold: str) -> float:
        """1.0 when the predicted tile set equals the gold set."""
        p, g = _tile_set(predicted), _tile_set(gold)
        return 1.0 if p is not None and p == g else 0.0

    def partial_score(self, predicted: str | None, gold: str) -> float:
        """Jaccard overlap of predicted and gold tile sets."""
        p, g = _tile_set(predicted), _tile_set(gold)
        if p is None or g is None or not (p | g):
            return 0.0
        return len(p & g) / len(p | g)

    # reasoning -------------------------------------------------------------------------------

    def reference_reasoning(self, question: str, answer: str) -> str | None:
        """One line per candidate tile: a decomposition when it wins, `no` otherwise (only the
        winning lines with `derivation = "wins"`)."""
        hand = hand_of(question)
        if hand is None:
            return None
        counts = to_counts(hand)
        truth = winning_tiles(counts)
        if _tile_set(answer) != set(truth):
            return None  # no correct derivation leads to a wrong answer
        lines = []
        for t in candidates(hand):
            if t in truth:
                counts[t] += 1
                groups = decompose(counts)
                counts[t] -= 1
                if groups is None:  # library and display disagree: refuse rather than lie
                    return None
                lines.append(f"+{tile_name(t)}: {format_groups(groups)}")
            elif self.cfg["derivation"] == "all":
                lines.append(f"+{tile_name(t)}: no")
        return "\n".join(lines)

    def verify(self, question: str, reasoning: str, answer: str) -> bool | None:
        """Every claimed decomposition is valid, every answer tile has one, answer is true."""
        hand = hand_of(question)
        claimed = _tile_set(answer)
        if hand is None or claimed is None:
            return False
        counts = to_counts(hand)
        if any(c > 4 for c in counts):
            return False
        stated = self.extract(reasoning)
        if stated is not None and _tile_set(stated) != claimed:
            return False
        shown: set[int] = set()
        denied: set[int] = set()
        for name, rest in _LINE_RE.findall(reasoning):
            parsed = parse_tiles(name)
            if not parsed:
                return False
            t = parsed[0]
            if rest.lower().rstrip(".") == "no":
                denied.add(t)
                continue
            groups = _parse_groups(rest)
            if groups is None or counts[t] >= 4:
                return False
            counts[t] += 1
            ok = check_decomposition(groups, counts)
            counts[t] -= 1
            if not ok:
                return False
            shown.add(t)
        if shown & denied or shown != claimed:
            return False
        return claimed == set(winning_tiles(counts))


def question_for(compact: str) -> str:
    """The question for a hand in compact notation."""
    return f"Hand: {compact}\nWhich tiles complete this hand?"


def hand_of(question: str) -> list[int] | None:
    """The hand in a question (`Hand: 1123m`), or None."""
    m = _HAND_RE.search(question)
    return parse_tiles(m.group(1)) if m else None


def candidates(hand: Sequence[int]) -> list[int]:
    """Tiles worth trying: every tile of each suit held (honours count as one suit)."""
    suits = {t // 9 for t in hand}
    return [t for t in range(34) if t // 9 in suits]


def _tile_set(answer: str | None) -> set[int] | None:
    if answer is None:
        return None
    tiles = parse_tiles(answer)
    return set(tiles) if tiles else None


def _parse_groups(text: str) -> list[Group] | None:
    groups: list[Group] = []
    for token in text.split():
        m = _GROUP_RE.fullmatch(token)
        if not m:
            return None
        tiles = parse_tiles(token)
        if tiles is None:
            return None
        groups.append(tuple(tiles))
    return groups or None


@hookimpl
def stratos_tasks() -> list[type[TaskPack]]:
    """Register the Mahjong winning-tiles task pack."""
    return [MahjongTask]
