"""Evaluation throughput (answers/s) of a tiny model on CPU, batch 1 vs batch 16.

Both runs score the same examples with the same greedy generation, so the accuracy must
match; only the batching differs. Target: batch 16 at least 4x the answers/s of batch 1.

    .venv/bin/python bench/bench_eval.py [--model config:small] [--n 48] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins.models.evaluate import evaluate, local_generator  # noqa: E402
from stratosd.plugins import get_plugins  # noqa: E402


def main() -> None:
    """Run both batch sizes and print answers/s and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="config:small")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0 = torch default; 1 avoids spinning on busy CPUs)")
    args = parser.parse_args()
    os.environ.setdefault("STRATOS_HOME", tempfile.mkdtemp(prefix="stratos-bench-"))

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    params = {"synthetic": True, "n_train": 0, "n_test": args.n} if args.task == "gsm8k" else {
        "n_train": 0, "n_test": args.n}
    task = get_plugins().task(args.task, params)
    examples = task.examples("test")[: args.n]
    generate = local_generator(args.model, max_new_tokens=args.max_new_tokens)
    evaluate(task, examples[:2], generate, batch_size=2)  # warm-up: first-call overheads

    rows = {}
    for batch in (1, 16):
        start = time.perf_counter()
        result = evaluate(task, examples, generate, batch_size=batch)
        wall = time.perf_counter() - start
        rows[batch] = (result, wall)
        print(f"batch {batch:>2}: {result.n} answers in {wall:6.2f}s = "  # noqa: T201
              f"{result.n / wall:7.2f} answers/s, {result.tokens_per_s:8.1f} tokens/s, "
              f"p95 latency {result.latency_ms_p95:7.1f} ms/answer, "
              f"accuracy {result.accuracy:.3f}")
    r1, w1 = rows[1]
    r16, w16 = rows[16]
    ratio = (r16.n / w16) / (r1.n / w1)
    print(f"model {args.model}, task {args.task}, {len(examples)} examples, "  # noqa: T201
          f"max_new_tokens {args.max_new_tokens}, torch threads {torch.get_num_threads()}")
    print(f"speed-up batch 16 / batch 1: {ratio:.2f}x (target >= 4x)")  # noqa: T201
    if r1.accuracy != r16.accuracy:
        print("warning: accuracy differs between batch sizes")  # noqa: T201


if __name__ == "__main__":
    main()
