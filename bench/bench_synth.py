"""Synthesis throughput (rows/s) at concurrency 1 vs 16 against the builtin OpenAI server.

The server runs a tiny random model with `delay_s` latency per request (a remote API), so
the teacher's round trip, not the local model, sets the pace: concurrency should scale
throughput almost linearly until the server's generation lock becomes the limit.

    .venv/bin/python bench/bench_synth.py [--delay 0.2] [--n1 24] [--n16 192]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.stepctx import StepContext  # noqa: E402
from agents.steps import synthesize  # noqa: E402
from plugins.deployers.http_builtin import OpenAIServer  # noqa: E402


def measure(url: str, *, concurrency: int, limit: int, max_new_tokens: int) -> dict[str, float]:
    """One synthesis run in a fresh state dir."""
    args = {
        "task": {"name": "gsm8k", "params": {"synthetic": True, "n_train": 400, "n_test": 5}},
        "teacher": {"backend": "openai", "model": "config:tiny",
                    "params": {"base_url": url, "max_concurrency": 64, "max_retries": 2}},
        "mode": "alignment", "tries": 1, "use_reference": False, "temperature": 0.0,
        "max_new_tokens": max_new_tokens, "concurrency": concurrency, "limit": limit,
    }
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StepContext(job_id="bench", run_id="bench", step="synthesize", args=args,
                          workdir=Path(tmp), inputs={})
        start = time.perf_counter()
        result = synthesize.run(ctx)
        wall = time.perf_counter() - start
    # The step's own rate (first to last example) excludes plugin loading and task setup.
    return {"rows": result["rows"], "wall_s": wall, "rows_per_s": result["rows_per_s"],
            "calls": result["tries_total"]}


def main() -> None:
    """Run both settings and print rows/s and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.2, help="server latency per request (s)")
    ap.add_argument("--n1", type=int, default=24, help="examples at concurrency 1")
    ap.add_argument("--n16", type=int, default=192, help="examples at concurrency 16")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ns = ap.parse_args()
    with OpenAIServer("config:tiny", delay_s=ns.delay, max_new_tokens_cap=64) as server:
        measure(server.url, concurrency=4, limit=8, max_new_tokens=ns.max_new_tokens)  # warm
        c1 = measure(server.url, concurrency=1, limit=ns.n1, max_new_tokens=ns.max_new_tokens)
        c16 = measure(server.url, concurrency=16, limit=ns.n16,
                      max_new_tokens=ns.max_new_tokens)
    print(f"server delay_s={ns.delay}  max_new_tokens={ns.max_new_tokens}")
    for name, r in (("concurrency 1 ", c1), ("concurrency 16", c16)):
        print(f"{name}: {r['rows']:4d} rows, {r['rows_per_s']:6.2f} rows/s "
              f"(step wall {r['wall_s']:.2f} s incl. setup, {r['calls']} teacher calls)")
    print(f"speed-up: {c16['rows_per_s'] / c1['rows_per_s']:.1f}x (target >= 8x)")


if __name__ == "__main__":
    main()
