"""Synthetic tenant data for the tenants bench and tests: Q/A JSONL mixes of four tasks.

Tasks (one-digit answers with task-specific answer distributions, which is what a tiny
random-init student with LoRA learns first): A `max a b`, B `min a b`, C `odd a b` → (a·b) mod 2,
D `mod a b` → (a+b) mod 3.
A tenant's file mixes them in given shares; questions are unique within a file.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from pathlib import Path

TASKS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "A": ("max", max),
    "B": ("min", min),
    "C": ("odd", lambda a, b: (a * b) % 2),
    "D": ("mod", lambda a, b: (a + b) % 3),
}
# The bench's design: T1 = A, T2 = A, T3 = ½A + ½B, T4 = ½C + ½D.
DESIGN: dict[str, dict[str, float]] = {
    "t1": {"A": 1.0}, "t2": {"A": 1.0}, "t3": {"A": 0.5, "B": 0.5}, "t4": {"C": 0.5, "D": 0.5},
}


def rows_for(mix: Mapping[str, float], n: int, seed: int) -> list[dict[str, str]]:
    """n rows drawn from the mix (each task's share rounded), questions unique, shuffled."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for key, share in sorted(mix.items()):
        word, fn = TASKS[key]
        pairs = [(a, b) for a in range(10) for b in range(10)]
        rng.shuffle(pairs)
        for a, b in pairs[: min(len(pairs), round(n * share))]:
            rows.append({"question": f"{word} {a} {b}", "answer": str(fn(a, b))})
    rng.shuffle(rows)
    return rows


def write_tenant_file(path: Path, mix: Mapping[str, float], n: int, seed: int,
                      canary: str | None = None) -> Path:
    """Write a tenant's JSONL; canary (a unique marker) is appended to one question."""
    rows = rows_for(mix, n, seed)
    if canary is not None and rows:
        rows[0] = {**rows[0], "question": f"{rows[0]['question']} {canary}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
