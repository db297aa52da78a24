"""stratosctl start-up: `--help` paths import no heavy package, and the lazily built parser
behaves exactly as the full one (timings belong in bench/bench_ingest.py, not here)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from stratosd.ctl import COMMANDS, SUMMARIES, build_parser, main
from tests.conftest import ROOT

HEAVY = ("nats", "numpy", "rich", "structlog", "torch")
# the subcommands whose modules import only what they need at run time
OWN = ("servers", "submit", "jobs", "status", "watch", "cancel", "plugins", "plan", "eval",
       "endpoints", "undeploy", "report", "auth", "resume")


def imported(*argv: str) -> set[str]:
    """Top-level packages `python -m stratosd.ctl ARGV` imports (from -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "stratosd.ctl", *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: stratosctl" in proc.stdout
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


@pytest.mark.parametrize("argv", [("--help",), ("servers", "--help")])
def test_help_imports_no_nats_or_numpy(argv: tuple[str, ...]) -> None:
    modules = imported(*argv)
    assert "stratosd" in modules  # the probe works
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_every_subcommand_help_skips_the_heavy_packages() -> None:
    for command in OWN:
        heavy = imported(command, "--help") & set(HEAVY)
        assert not heavy, (command, sorted(heavy))


def test_summaries_are_what_the_modules_register() -> None:
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"stratosd.ctl.{name}")
        except ModuleNotFoundError:
            continue
        sub = argparse.ArgumentParser().add_subparsers()
        module.register(sub)
        registered = tuple((a.dest, a.help) for a in sub._choices_actions)
        assert SUMMARIES.get(name) == registered, (
            f"stratosd.ctl.SUMMARIES[{name!r}] must be {registered!r}")


def subcommand(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = action.choices[command]
    return sub


def test_lazy_help_is_the_full_help() -> None:
    assert build_parser(["--help"]).format_help() == build_parser().format_help()
    for command in ("servers", "jobs", "watch", "auth"):
        lazy = subcommand(build_parser([command, "--help"]), command)
        assert lazy.format_help() == subcommand(build_parser(), command).format_help()


@pytest.mark.parametrize("argv", [
    ["servers"],
    ["--nats", "nats://10.0.0.5:4222", "jobs", "--limit", "3", "--json"],
    ["-v", "status", "01abc"],
    ["--home", "/tmp/h", "watch", "r1", "--timeout", "2"],
    ["--verb", "cancel", "r1"],  # abbreviated global option
    ["--config=s.toml", "undeploy", "e1"],
    ["resume", "r1", "--set", "a.b=1", "--watch"],
    ["auth", "init", "--out", "x", "--agents", "gpu-1"],
    ["plan", "job.toml", "--offline", "--selector", "cost-first"],
    [],
])
def test_lazy_parser_reads_argv_as_the_full_one(argv: list[str]) -> None:
    assert build_parser(argv).parse_args(argv) == build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", [["serverz"], ["jobs", "--nope"], ["--nats"], ["status"],
                                  ["--json", "servers"]])
def test_lazy_parser_refuses_as_the_full_one(argv: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as lazy:
        build_parser(argv).parse_args(argv)
    lazy_err = capsys.readouterr().err
    with pytest.raises(SystemExit) as full:
        build_parser().parse_args(argv)
    assert (lazy.value.code, lazy_err) == (full.value.code, capsys.readouterr().err)


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
