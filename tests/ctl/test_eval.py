"""`stratosctl eval`: a tiny local model on a task, results as a JSON file and an event."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from schemas import subjects
from tests.conftest import ROOT


async def test_eval_writes_json_and_publishes_an_event(daemon: Any, nats_url: str,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    cmd = [sys.executable, "-m", "stratosd.ctl", "--nats", nats_url, "eval",
           "--task", "mahjong-winning-tiles", "--param", "difficulty=1", "--param", "n_train=8",
           "--param", "n_test=4", "--model", "config:tiny", "--limit", "4",
           "--max-new-tokens", "8", "--out", str(out)]
    r = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                timeout=120, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["n"] == 4 and 0.0 <= result["ci_low"] <= result["accuracy"] <= \
        result["ci_high"] <= 1.0
    for key in ("latency_ms_mean", "latency_ms_p95", "tokens_per_s"):
        assert key in result
    assert "ACCURACY" in r.stdout and "95% CI" in r.stdout
    subject = r.stdout.split("event:")[1].split()[0]
    assert subject.startswith("stratos.evt.job.stratosctl.")
    msg = await daemon.bus.js.get_last_msg(subjects.EVENTS_STREAM, subject)
    event = json.loads(msg.data)
    assert event["type"] == "job_completed" and event["step"] == "evaluate"
    assert event["result"]["n"] == 4


def test_eval_bad_param_is_a_usage_error() -> None:
    r = subprocess.run([sys.executable, "-m", "stratosd.ctl", "eval", "--task", "gsm8k",
                        "--param", "nonsense", "--model", "config:tiny"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT, check=False)
    assert r.returncode == 2 and "key=value" in r.stderr
