"""Tiny job specs for end-to-end tests (every stage runs for real, at toy sizes)."""

from __future__ import annotations

from typing import Any


def tiny_spec(name: str = "e2e", *, deploy: bool = False, **over: Any) -> dict[str, Any]:
    """A Mahjong L1 job: reference teacher (no model), tiny student, a few training steps."""
    spec: dict[str, Any] = {
        "name": name,
        "task": {"name": "mahjong-winning-tiles",
                 "params": {"difficulty": 1, "n_train": 16, "n_test": 8, "seed": 0},
                 "probe_size": 4},
        "teachers": [{"name": "oracle", "backend": "reference", "model": "reference"}],
        "students": [{"model": "config:tiny"}],
        "est_train_hours": 0.001,
        "constraints": {"budget_usd": 100.0},
        "deploy": deploy,
        "train": {"max_steps": 6, "save_steps": 2,
                  "synthesis": {"tries": 1},
                  "prescreen": {"sample_size": 2},
                  "evaluate": {"max_new_tokens": 16, "limit": 4}},
    }
    spec.update(over)
    return spec
