"""Task packs: how often each verifier accepts reference solutions and rejects wrong ones, then
throughput (Mahjong hands with library ground truth, reference reasoning + verification, the
GSM8K synthetic generator).

Acceptance and rejection, per task pack with a verifier:
  gsm8k   the shipped GSM8K-style reference solutions (plugins/tasks/data; written in GSM8K's
          format, not taken from it) as the pipeline verifies them (annotations resolved,
          `####` line dropped) and raw; the shipped wrong solutions; every fixture result made
          wrong by one; every fixture with a wrong final answer; synthetic solutions.
  mahjong the reference reasoner on generated hands (levels 1-4); a wrong answer (one more
          tile) and a broken derivation (a winning tile's line replaced by `no`).
Task packs without a verifier or reference set are listed as such.

Run: .venv/bin/python bench/bench_tasks.py [--json] [--hands 200] [--seconds 1.0]
     [--no-throughput]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from itertools import cycle
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins.tasks.data import GSM8K_STYLE, GSM8K_STYLE_WRONG, read_rows  # noqa: E402
from plugins.tasks.gsm8k import Gsm8kTask, canonical_number, solution_text  # noqa: E402
from plugins.tasks.gsm8k_verifier import verify_reasoning, with_a_wrong_result  # noqa: E402
from plugins.tasks.mahjong import (  # noqa: E402
    MahjongTask,
    format_answer,
    generate_hand,
    question_for,
    tile_name,
    to_compact,
    to_counts,
    winning_tiles,
)
from stratosd.api import TaskPack  # noqa: E402
from stratosd.plugins import get_plugins  # noqa: E402

Check = tuple[bool, str]  # (accepted, why)


def tally(name: str, kind: str, results: Iterable[Check]) -> dict[str, Any]:
    """One set's count, accepted or rejected share, and a few reasons for the misses."""
    got = list(results)
    accepted = sum(ok for ok, _ in got)
    hits = accepted if kind == "reference" else len(got) - accepted
    misses = [why for ok, why in got if ok != (kind == "reference")]
    return {
        "set": name,
        "kind": kind,
        "n": len(got),
        "accepted" if kind == "reference" else "rejected": hits,
        "rate": hits / len(got) if got else None,
        "misses": misses[:3],
    }


# --- gsm8k ---------------------------------------------------------------------------------


def _gold(answer_field: str) -> str:
    return canonical_number(answer_field.rsplit("####", 1)[1]) or ""


def _forms(rows: list[dict[str, Any]], form: str) -> Iterator[Check]:
    for row in rows:
        text = solution_text(row["answer"]) if form == "pipeline" else row["answer"]
        yield verify_reasoning(text, _gold(row["answer"]))


def gsm8k_sets() -> list[dict[str, Any]]:
    """Acceptance of the fixture and synthetic solutions, rejection of wrong ones."""
    good, wrong = read_rows(GSM8K_STYLE), read_rows(GSM8K_STYLE_WRONG)
    one_off = [(m, _gold(r["answer"])) for r in good for m in with_a_wrong_result(r["answer"])]
    synthetic = Gsm8kTask({"synthetic": True, "difficulty": 3, "n_train": 300, "n_test": 50})
    return [
        tally(
            "GSM8K-style reference solutions, as verified in the pipeline",
            "reference",
            _forms(good, "pipeline"),
        ),
        tally(
            "GSM8K-style reference solutions, raw (annotations, ####)",
            "reference",
            _forms(good, "raw"),
        ),
        tally("wrong solutions (shipped), as in the pipeline", "wrong", _forms(wrong, "pipeline")),
        tally("wrong solutions (shipped), raw", "wrong", _forms(wrong, "raw")),
        tally(
            "fixture with one result off by one, as in the pipeline",
            "wrong",
            (verify_reasoning(solution_text(m), g) for m, g in one_off),
        ),
        tally(
            "fixture with one result off by one, raw",
            "wrong",
            (verify_reasoning(m, g) for m, g in one_off),
        ),
        tally(
            "fixture with a wrong final answer",
            "wrong",
            (
                verify_reasoning(solution_text(r["answer"]), str(Fraction(_gold(r["answer"])) + 1))
                for r in good
            ),
        ),
        tally(
            "synthetic L3 solutions",
            "reference",
            (verify_reasoning(e.meta["solution"], e.answer) for e in synthetic.examples("train")),
        ),
    ]


# --- mahjong -------------------------------------------------------------------------------


def mahjong_sets(hands: int) -> list[dict[str, Any]]:
    """The reference reasoner on generated hands; a wrong answer; a broken derivation."""
    task = MahjongTask()
    ref: list[Check] = []
    wrong_answer: list[Check] = []
    broken: list[Check] = []
    for level in (1, 2, 3, 4):
        rng = random.Random(f"bench-{level}")
        for _ in range(hands):
            hand = generate_hand(level, rng)
            truth = winning_tiles(to_counts(hand))
            q, a = question_for(to_compact(hand)), format_answer(truth)
            reasoning = task.reference_reasoning(q, a)
            if reasoning is None:
                ref.append((False, f"no reference reasoning for {q!r}"))
                continue
            ref.append((bool(task.verify(q, reasoning, a)), q))
            extra = [t for t in sorted(set(hand)) if t not in truth][:1]
            if extra:
                wrong_answer.append(
                    (bool(task.verify(q, reasoning, format_answer(sorted([*truth, *extra])))), q)
                )
            first = f"+{tile_name(truth[0])}:"
            lines = [
                ln if not ln.startswith(first) else f"{first} no" for ln in reasoning.splitlines()
            ]
            broken.append((bool(task.verify(q, "\n".join(lines), a)), q))
    return [
        tally(f"reference reasoning, generated hands L1-4 ({hands} each)", "reference", ref),
        tally("right derivation, answer with one tile too many", "wrong", wrong_answer),
        tally("a winning tile's line replaced by `no`", "wrong", broken),
    ]


def verifier_report(hands: int) -> dict[str, Any]:
    """Per registered task pack: its sets, or why it has none."""
    out: dict[str, Any] = {}
    for name in get_plugins().tasks.names():
        cls = get_plugins().tasks.get(name)
        has_verifier = cls.verify is not TaskPack.verify
        has_reasoner = cls.reference_reasoning is not TaskPack.reference_reasoning
        entry: dict[str, Any] = {"verifier": has_verifier, "reference_reasoner": has_reasoner}
        if name == "gsm8k":
            entry["sets"] = gsm8k_sets()
        elif name == "mahjong-winning-tiles":
            entry["sets"] = mahjong_sets(hands)
        else:
            entry["sets"] = []
            entry["note"] = "no verifier" if not has_verifier else "no reference set in this bench"
        out[name] = entry
    return out


# --- throughput ----------------------------------------------------------------------------


def rate(fn: Callable[[], object], seconds: float) -> tuple[float, int]:
    """Calls per second of fn() over about `seconds` (after one warm-up call)."""
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed, n


def throughput(seconds: float, n_generated: int) -> list[dict[str, Any]]:
    """Hands, reasoning + verification and generator rates."""
    task = MahjongTask()
    rows: list[dict[str, Any]] = []
    for level in (1, 2, 3, 4):
        rng = random.Random(level)

        def make_hand(rng: random.Random = rng, level: int = level) -> None:
            hand = generate_hand(level, rng)
            format_answer(winning_tiles(to_counts(hand)))

        per_s, n = rate(make_hand, seconds)
        rows.append(
            {"measurement": f"mahjong L{level} hand + ground truth", "per_s": per_s, "calls": n}
        )
        pool = []
        for _ in range(200):
            hand = generate_hand(level, rng)
            pool.append(
                (question_for(to_compact(hand)), format_answer(winning_tiles(to_counts(hand))))
            )
        lengths: list[int] = []

        def reason_verify(
            it: Iterator[tuple[str, str]] = cycle(pool), lengths: list[int] = lengths
        ) -> None:
            q, a = next(it)
            reasoning = task.reference_reasoning(q, a)
            assert reasoning is not None and task.verify(q, reasoning, a)
            lengths.append(len(task.format_target(reasoning, a)))

        per_s, n = rate(reason_verify, seconds)
        rows.append(
            {
                "measurement": f"mahjong L{level} reference reasoning + verify",
                "per_s": per_s,
                "calls": n,
                "avg_chars": sum(lengths) / len(lengths),
            }
        )
    start = time.perf_counter()
    MahjongTask({"difficulty": 4, "n_train": n_generated, "n_test": n_generated // 4}).examples(
        "train"
    )
    rows.append(
        {
            "measurement": f"mahjong L4 task, {n_generated} + {n_generated // 4} hands (s)",
            "seconds": time.perf_counter() - start,
        }
    )
    fixture = cycle(
        [(solution_text(r["answer"]), _gold(r["answer"])) for r in read_rows(GSM8K_STYLE)]
    )

    def verify_fixture() -> None:
        verify_reasoning(*next(fixture))

    per_s, n = rate(verify_fixture, seconds)
    rows.append({"measurement": "gsm8k verify, GSM8K-style solutions", "per_s": per_s, "calls": n})
    for level in (1, 2, 3):
        start = time.perf_counter()
        g = Gsm8kTask(
            {
                "synthetic": True,
                "difficulty": level,
                "n_train": n_generated,
                "n_test": n_generated // 4,
            }
        )
        exs = g.examples("train")
        gen_s = time.perf_counter() - start
        start = time.perf_counter()
        for e in exs:
            g.verify(e.question, g.reference_reasoning(e.question, e.answer) or "", e.answer)
        ver_s = time.perf_counter() - start
        rows.append(
            {
                "measurement": f"gsm8k synthetic L{level} problems generated",
                "per_s": (n_generated * 5 // 4) / gen_s,
            }
        )
        rows.append(
            {
                "measurement": f"gsm8k synthetic L{level} reasoning + verify",
                "per_s": len(exs) / ver_s,
                "calls": len(exs),
            }
        )
    return rows


def print_report(res: dict[str, Any]) -> None:
    """The human-readable output."""
    print("VERIFIERS: acceptance of reference solutions, rejection of wrong ones")
    print(f"  {'task':<22} {'set':<62} {'n':>5} {'accepted':>9} {'rejected':>9}")
    for name, entry in res["verifiers"].items():
        if not entry["sets"]:
            print(f"  {name:<22} {'(' + entry['note'] + ')':<62}")
        for s in entry["sets"]:
            rate = "n/a" if s["rate"] is None else f"{s['rate']:.1%}"
            acc, rej = (rate, "") if s["kind"] == "reference" else ("", rate)
            print(f"  {name:<22} {s['set']:<62} {s['n']:>5} {acc:>9} {rej:>9}")
            for why in s["misses"]:
                print(f"  {'':<22}   miss: {why[:100]}")
    if res.get("throughput"):
        print("\nTHROUGHPUT")
        print(f"  {'measurement':<48} {'per second':>12} {'calls':>8} {'avg chars':>10}")
        for r in res["throughput"]:
            if "seconds" in r:
                print(f"  {r['measurement']:<48} {r['seconds']:>12.3f} s")
                continue
            calls = f"{r['calls']:>8}" if "calls" in r else " " * 8
            chars = f" {r['avg_chars']:>10.0f}" if "avg_chars" in r else ""
            print(f"  {r['measurement']:<48} {r['per_s']:>12,.0f} {calls}{chars}")


def main() -> None:
    """Measure, then print a table or (--json) one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--hands", type=int, default=200, help="mahjong hands per level")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per rate measurement")
    parser.add_argument(
        "--generate",
        type=int,
        default=2000,
        help="training examples generated per generator measurement",
    )
    parser.add_argument("--no-throughput", action="store_true", help="only the verifiers")
    args = parser.parse_args()
    res: dict[str, Any] = {"verifiers": verifier_report(args.hands)}
    if not args.no_throughput:
        res["throughput"] = throughput(args.seconds, args.generate)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_report(res)


if __name__ == "__main__":
    main()
