"""The README's demo, fast variant: daemon, three agents, every stage, a deployed endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_fast_demo_runs_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "stratosd.ctl", "demo", "--fast", "--demo-home", str(home)],
        capture_output=True, text=True, timeout=580, cwd=ROOT, check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((home / "demo-summary.json").read_text())
    assert summary["state"] == "completed"
    assert summary["server"] in ("cpu-a", "cpu-b", "cpu-c")
    # the tiny general teacher knows nothing of Mahjong: the strategy must come out as injection
    assert summary["teacher_probe_accuracy"] == 0.0
    assert summary["strategy"] == "injection"
    assert summary["rows_synthesised"] > 0
    assert summary["endpoint"].startswith("http://127.0.0.1:")
    assert "Q: 'Hand:" in summary["endpoint_answer"]
    report = Path(summary["report"])
    assert report.exists() and "score" in report.read_text().lower()
    for stage in ("select_server", "probe_teachers", "synthesize", "train", "evaluate", "deploy",
                  "report"):
        assert f"✓ {stage}" in out
    # every process stopped cleanly
    for log in ("daemon", "cpu-a", "cpu-b", "cpu-c"):
        text = (home / "logs" / f"{log}.log").read_text()
        assert ("daemon_stopped" if log == "daemon" else "agent_stopped") in text
