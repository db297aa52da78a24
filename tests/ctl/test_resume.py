"""`stratosctl resume`, and how watch/status/jobs show a run stopped by its budget: real
stratosctl processes against a real daemon (in this event loop) and nats-server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest

from schemas.events import RunBudgetExhausted, RunFailed
from stratosd.ctl.resume import parse_sets, parse_value
from stratosd.errors import ConfigError
from tests.conftest import ROOT
from tests.daemon.test_resume import submit, use_fakes


async def ctl(daemon: Any, *args: str) -> tuple[int, str, str]:
    """Run stratosctl against the daemon's bus; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stratosd.ctl", "--nats", daemon.url, *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 50)
    return int(proc.returncode or 0), out.decode(), err.decode()


@pytest.mark.timeout(120)
async def test_stopped_run_is_shown_and_resumed_from_the_cli(daemon: Any) -> None:
    use_fakes(daemon, budget=True)
    run_id, events = await submit(daemon, constraints={"budget_usd": 5.0})
    await events.until(lambda: bool(events.of(RunBudgetExhausted)))
    command = f"stratosctl resume {run_id} --set constraints.budget_usd=10"

    rc, out, _ = await ctl(daemon, "watch", run_id)
    assert rc == 4, out  # a stopped run ends the watch
    assert "run stopped before train: budget $5.00, spent $5.00, the rest needs about $4.00" \
        in out
    assert f"hint: raise the budget above $9.00 and go on: {command}" in out

    rc, out, _ = await ctl(daemon, "status", run_id)
    assert rc == 0 and "state    stopped   stage train" in out
    assert command in out and "kept     every finished stage" in out
    rc, out, _ = await ctl(daemon, "jobs")
    assert rc == 0 and " stopped " in out and "1 run(s) stopped at their budget" in out

    rc, out, err = await ctl(daemon, "resume", run_id, "--set", "constraints.budget_usd=12",
                             "--watch")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{run_id} running (constraints.budget_usd=12)"
    # the replay shows the stop, then the watch goes on with the resumed run to its end
    assert lines.index("↻ resumed at train with constraints.budget_usd=12") > \
        next(i for i, line in enumerate(lines) if "run stopped" in line)
    assert lines[-1] == "run completed"
    assert (await daemon.store.get(run_id)).spec.constraints.budget_usd == 12

    rc, _, err = await ctl(daemon, "resume", run_id)
    assert rc == 4
    assert err.startswith(f"error: run {run_id} already completed") and "hint:" in err


async def test_bad_set_is_refused_naming_it(daemon: Any) -> None:
    fakes = use_fakes(daemon, retries=0)
    fakes.failures["probe_teachers"] = 1
    run_id, events = await submit(daemon)
    await events.until(lambda: bool(events.of(RunFailed)))

    rc, _, err = await ctl(daemon, "resume", run_id, "--set", "budget")
    assert rc == 2 and err.startswith("error: --set 'budget': expected KEY=VALUE")
    rc, _, err = await ctl(daemon, "resume", run_id, "--set", "constraints.budgt=1")
    assert rc == 2 and "constraints.budgt" in err and "Traceback" not in err
    rc, _, err = await ctl(daemon, "resume", run_id, "--set", "constraints.budget_usd=lots")
    assert rc == 2 and 'set constraints.budget_usd="lots"' in err
    assert (await daemon.store.get(run_id)).state == "failed"

    rc, out, err = await ctl(daemon, "resume", run_id, "--json")
    assert rc == 0, err
    assert '"state": "running"' in out


def test_help_shows_examples() -> None:
    r = subprocess.run([sys.executable, "-m", "stratosd.ctl", "resume", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30, check=False)
    out = r.stdout
    assert r.returncode == 0
    assert "stratosctl resume 01j9z... --set constraints.budget_usd=12" in out
    assert "--watch" in out and "KEY=VALUE" in out


def test_set_values_are_toml_or_json_scalars() -> None:
    assert parse_value("12") == 12 and parse_value("0.5") == 0.5
    assert parse_value("true") is True and parse_value("null") is None
    assert parse_value('"x y"') == "x y" and parse_value("injection") == "injection"
    assert parse_value("[1, 2]") == [1, 2] and parse_value("2024-01-01") == "2024-01-01"
    assert parse_sets(["a.b=1", "c=x=y"]) == {"a.b": 1, "c": "x=y"}
    for bad in ("=1", "a..b=1", "a b=1", "nokey"):
        with pytest.raises(ConfigError) as info:
            parse_sets([bad])
        assert bad in info.value.message
