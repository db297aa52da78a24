"""Task-pack throughput: Mahjong hands generated (with library ground truth) per second per
difficulty, reference reasoning + verification per second, and the GSM8K synthetic generator.

Run: .venv/bin/python bench/bench_tasks.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Iterator
from itertools import cycle
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins.tasks.gsm8k import Gsm8kTask  # noqa: E402
from plugins.tasks.mahjong import (  # noqa: E402
    MahjongTask,
    format_answer,
    generate_hand,
    question_for,
    to_compact,
    to_counts,
    winning_tiles,
)


def rate(fn: object, seconds: float) -> tuple[float, int]:
    """Calls per second of fn() over about `seconds`."""
    assert callable(fn)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed, n


def main() -> None:
    """Print one line per measurement."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args()
    task = MahjongTask()
    print(f"{'measurement':<44} {'per second':>12} {'calls':>8} {'avg chars':>10}")
    for level in (1, 2, 3, 4):
        rng = random.Random(level)

        def make_hand(rng: random.Random = rng, level: int = level) -> None:
            hand = generate_hand(level, rng)
            format_answer(winning_tiles(to_counts(hand)))

        per_s, n = rate(make_hand, args.seconds)
        print(f"{f'mahjong L{level} hand + ground truth':<44} {per_s:>12,.0f} {n:>8}")

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

        per_s, n = rate(reason_verify, args.seconds)
        avg = sum(lengths) / len(lengths)
        print(
            f"{f'mahjong L{level} reference reasoning + verify':<44} {per_s:>12,.0f} {n:>8}"
            f" {avg:>10.0f}"
        )

    start = time.perf_counter()
    MahjongTask({"difficulty": 4, "n_train": 2000, "n_test": 500}).examples("train")
    print(
        f"{'mahjong L4 task, 2000 train + 500 test (s)':<44} {time.perf_counter() - start:>12.3f}"
    )
    for level in (1, 2, 3):
        start = time.perf_counter()
        g = Gsm8kTask({"synthetic": True, "difficulty": level, "n_train": 2000, "n_test": 500})
        exs = g.examples("train")
        gen_s = time.perf_counter() - start
        start = time.perf_counter()
        ok = sum(
            bool(g.verify(e.question, g.reference_reasoning(e.question, e.answer) or "", e.answer))
            for e in exs
        )
        ver_s = time.perf_counter() - start
        print(f"{f'gsm8k synthetic L{level} problems generated':<44} {2500 / gen_s:>12,.0f}")
        print(
            f"{f'gsm8k synthetic L{level} reasoning + verify':<44} {len(exs) / ver_s:>12,.0f}"
            f" {ok:>8}"
        )


if __name__ == "__main__":
    main()
