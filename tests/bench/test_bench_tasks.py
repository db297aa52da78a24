"""bench/bench_tasks.py runs end to end: verifier acceptance/rejection per task, JSON shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_tasks.py"
QUICK = ("--hands", "5", "--seconds", "0.01", "--generate", "40")


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _sets(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["set"]: s for s in entry["sets"]}


def test_json_reports_every_task_and_the_gsm8k_figures() -> None:
    res = json.loads(_run("--json", *QUICK))  # one object, nothing else
    verifiers = res["verifiers"]
    assert {"gsm8k", "mahjong-winning-tiles", "jsonl-qa"} <= set(verifiers)
    qa = verifiers["jsonl-qa"]  # a reference reasoner maybe (chat targets), no verifier
    assert (qa["verifier"], qa["sets"], qa["note"]) == (False, [], "no verifier")
    gsm = _sets(verifiers["gsm8k"])
    pipeline = gsm["GSM8K-style reference solutions, as verified in the pipeline"]
    assert pipeline["kind"] == "reference" and pipeline["n"] >= 150
    assert pipeline["rate"] >= 0.99 and pipeline["accepted"] <= pipeline["n"]
    for name, s in gsm.items():
        if s["kind"] == "wrong":
            assert s["n"] > 0 and "rejected" in s and 0.0 <= s["rate"] <= 1.0, name
    assert gsm["wrong solutions (shipped), raw"]["rate"] == 1.0
    mahjong = verifiers["mahjong-winning-tiles"]
    assert mahjong["verifier"] and mahjong["reference_reasoner"]
    assert [s["kind"] for s in mahjong["sets"]] == ["reference", "wrong", "wrong"]
    assert mahjong["sets"][0]["n"] == 4 * 5 and mahjong["sets"][0]["rate"] == 1.0
    rows = res["throughput"]
    assert any(r["measurement"] == "gsm8k verify, GSM8K-style solutions" for r in rows)
    assert all(r.get("per_s", 1.0) > 0 for r in rows)


def test_text_mode_prints_the_table() -> None:
    out = _run("--no-throughput", "--hands", "3")
    assert out.startswith("VERIFIERS: acceptance of reference solutions, rejection of wrong")
    assert "GSM8K-style reference solutions, as verified in the pipeline" in out
    assert "(no verifier)" in out and "THROUGHPUT" not in out
