"""Every benchmark script starts and explains itself when run as a file, the way its docstring
and docs/ tell a user to run it (`python bench/NAME.py --help`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("bench_*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_bench_script_runs_as_a_file(script: Path) -> None:
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                         cwd=ROOT / "docs", timeout=60, check=False)  # not the repo root
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
