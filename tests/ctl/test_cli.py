"""stratosctl against a real daemon process (embedded NATS) and a real agent process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, Proc, wait_until


def ctl(home: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "stratosd.ctl", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "STRATOS_HOME": str(home)}, check=False)


@pytest.fixture
def stack(tmp_path: Path):  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    env = {"STRATOS_HOME": str(home)}
    d = Proc(["-m", "stratosd", "--log-format", "json"], tmp_path / "daemon.log", env)
    assert wait_until(lambda: (home / "nats.url").exists() and "daemon_started" in d.output(),
                      20), d.output()
    a = Proc(["-m", "agents", "--id", "cpu-1", "--price-per-hour", "0.4", "--region", "eu-west",
              "--interval", "0.5", "--log-format", "json"], tmp_path / "agent.log", env)
    yield home, d, a
    a.stop()
    rc = d.stop()
    assert rc == 0, d.output()[-2000:]
    assert "daemon_stopped" in d.output()


def test_servers_table_and_json(stack) -> None:  # type: ignore[no-untyped-def]
    home, _d, _a = stack
    assert wait_until(lambda: "cpu-1" in ctl(home, "servers").stdout, 20)
    out = ctl(home, "servers").stdout
    header = out.splitlines()[0]
    for col in ("ID", "HARDWARE", "PRICE", "LATENCY", "LAST SEEN", "STATUS"):
        assert col in header
    assert "$0.40/h" in out and "eu-west" in out and " up" in out
    rows = json.loads(ctl(home, "servers", "--json").stdout)
    assert rows[0]["offer"]["id"] == "cpu-1"


def test_plugins_lists_builtins(stack) -> None:  # type: ignore[no-untyped-def]
    home, _d, _a = stack
    out = ctl(home, "plugins").stdout
    assert "plugins.selectors.pfg" in out and "stratos (built-in)" in out


def test_user_mistakes_are_one_line_errors(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home, _d, _a = stack
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "examples/mahjong-demo.toml").read_text()
                   .replace("budget_usd = 5.0", 'budget_usd = "lots"'))
    r = ctl(home, "submit", str(bad))
    assert r.returncode == 2
    assert "constraints.budget_usd" in r.stderr and "Traceback" not in r.stderr
    r = ctl(home, "status", "01jnotarunnotarunnotarunno")
    assert r.returncode == 4 and r.stderr.startswith("error: no run")
    r = ctl(home, "submit", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_daemon_unreachable_exit_3(tmp_path: Path) -> None:
    r = ctl(tmp_path / "nohome", "--nats", "nats://127.0.0.1:9", "servers")
    assert r.returncode == 3
    assert r.stderr.startswith("error: cannot connect to NATS") and "hint:" in r.stderr
    assert "Traceback" not in r.stderr


def test_ctl_imports_no_torch() -> None:
    code = ("import sys, stratosd.ctl; stratosd.ctl.build_parser(); "
            "sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
