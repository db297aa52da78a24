"""bench/bench_study.py runs end to end: JSON shape, scores in [0, 1], assumptions printed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_study.py"
REGISTERED = {"pfg", "hardware-first", "cost-first", "latency-first", "random", "weighted-sum"}


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=50, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _check_interval(stats: dict[str, Any]) -> None:
    for name, r in stats["selectors"].items():
        lo, hi = r["ci95"]
        assert 0.0 <= lo <= r["mean_score"] <= hi <= 1.0, (name, r)
        assert 0.0 <= r["win_rate"] <= 1.0, (name, r)


def test_quick_json_shape() -> None:
    res = json.loads(_run("--quick", "--json", "--scenarios", "20"))  # one object, nothing else
    assert set(res["selectors"]) >= REGISTERED | {"accuracy-first"}
    _check_interval(res)
    assert res["scenarios"] == 20
    assert abs(sum(r["win_rate"] for r in res["selectors"].values()) - 1.0) < 1e-9
    assert isinstance(res["pfg_improvement_pct"], float)
    assert res["best_single_objective"] in {"hardware-first", "accuracy-first", "cost-first",
                                            "latency-first", "random"}
    assert set(res["paper_set"]["selectors"]) == {"pfg", "accuracy-first", "cost-first",
                                                  "random"}
    _check_interval(res["paper_set"])
    assert res["weights"] == dict.fromkeys(("accuracy", "latency", "train_time", "cost"), 1.0)
    assert any(line.startswith("ASSUMPTIONS") for line in res["assumptions"])


def test_weights_and_seed_are_used() -> None:
    args = ("--json", "--scenarios", "6", "--fleet-sizes", "50", "--seed", "3")
    a = json.loads(_run(*args, "--weights", "accuracy=2,cost=0.5"))
    assert a["weights"] == {"accuracy": 2.0, "latency": 1.0, "train_time": 1.0, "cost": 0.5}
    assert a["seed"] == 3 and a["fleets"]["gen-50"] == 50
    b = json.loads(_run(*args, "--weights", "accuracy=2,cost=0.5"))
    assert a["selectors"] == b["selectors"]  # seeded: the same study twice


def test_text_mode_prints_assumptions() -> None:
    out = _run("--scenarios", "8", "--fleet-sizes", "50", "--synthetic-book")
    for needle in ("ASSUMPTIONS", "accuracy(P) =", "memory: plugins.students.candidates",
                   "time and $: stratosd.costmodel", "SYNTHETIC records", "fleets: catalog",
                   "scenario grid:", "weights {'accuracy': 1.0", "percentile bootstrap",
                   "RESULTS", "accuracy-first", "paper: Stratos 0.55",
                   "Measured mini-study: not in this bench"):
        assert needle in out, needle
    table = out[out.index("size   acc"):].splitlines()[1:6]
    assert [row.split()[0] for row in table] == ["0.5B", "1.5B", "3B", "7B", "14B"]
