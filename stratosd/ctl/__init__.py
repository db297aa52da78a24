"""stratosctl: the operator's command line. Errors are one line and an exit code, never a trace.

Exit codes: 0 ok, 1 other failure, 2 usage/config, 3 daemon or bus unreachable, 4 rejected.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

EPILOG = """\
typical session:
  stratosd &                                  # daemon + embedded NATS
  stratos-agent --id gpu-1 --price-per-hour 2.5 &
  stratosctl servers                          # the fleet
  stratosctl plan examples/mahjong-demo.toml  # which server, and why
  stratosctl submit examples/mahjong-demo.toml --watch
  stratosctl report RUN_ID
"""

COMMANDS = ("servers", "submit", "jobs", "watch", "cancel", "plugins", "plan", "eval",
            "endpoints", "report", "auth", "demo", "resume", "tenants", "export")

# What each module in COMMANDS registers (subcommand, one-line help), in its order. From this
# `stratosctl --help` lists every subcommand without importing one, and `stratosctl X ...`
# imports only X's module: an operator's `--help` never waits for nats, msgspec or numpy. A
# module missing here simply registers itself (correct, only slower);
# tests/ctl/test_startup.py keeps this table equal to what the modules register.
SUMMARIES: dict[str, tuple[tuple[str, str], ...]] = {
    "servers": (("servers", "list agents: hardware, price, measured capacity, latency, last "
                 "seen, status"),),
    "submit": (("submit", "submit a job (TOML) and print its run id"),),
    "jobs": (("jobs", "list submitted jobs (runs), newest first"),
             ("status", "one run's state, stage results and error")),
    "watch": (("watch", "follow a run's events live (replays its history first)"),),
    "cancel": (("cancel", "cancel a run (its running job is stopped)"),),
    "plugins": (("plugins", "installed plugins: name, package, version, provides"),),
    "plan": (("plan", "dry-run server selection: Pareto set, estimates, the pick"),),
    "eval": (("eval", "evaluate a model on a task's held-out split"),),
    "endpoints": (("endpoints", "deployed OpenAI-compatible endpoints"),
                  ("undeploy", "stop serving an endpoint")),
    "report": (("report", "a finished run's report (Markdown, JSON, plots)"),),
    "auth": (("auth", "generate NATS users, permissions and credentials"),),
    "demo": (("demo", "run the whole pipeline locally: daemon, 3 agents, a Mahjong "
              "distillation"),),
    "resume": (("resume", "go on with a failed or stopped run where it ended"),),
    "tenants": (("tenants", "per-tenant students and adapters (ACME)"),),
    "export": (("export", "write a run's trained student: adapter and merged model"),),
}


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats", dest="nats_url",
                        help="NATS URL (default: $STRATOS_NATS_URL or the local daemon's)")
    parser.add_argument("--config", help="TOML config (default $STRATOS_CONFIG)")
    parser.add_argument("--home", help="state dir (default $STRATOS_HOME or ~/.stratos)")
    parser.add_argument("--verbose", "-v", action="store_true", help="tracebacks on errors")


class _Probe(argparse.ArgumentParser):
    """The global options and the first positional, to learn which subcommand argv names."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def command_in(argv: Sequence[str]) -> str | None:
    """The subcommand argv names, if any (argparse's own reading of it: abbreviated options
    and option values are skipped as the real parser skips them)."""
    probe = _Probe(add_help=False)
    _global_options(probe)
    probe.add_argument("command", nargs="?")
    try:
        known, _ = probe.parse_known_args(list(argv))
    except ValueError:
        return None  # the real parser reports the mistake
    return known.command if isinstance(known.command, str) else None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser. Without argv every subcommand module registers itself; with argv only the
    module of the subcommand argv names does, the others are listed from SUMMARIES."""
    import importlib
    import importlib.util

    parser = argparse.ArgumentParser(
        prog="stratosctl", description="Operate Stratos: servers, jobs, plans, reports.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = command_in(argv) if argv is not None else None
    for name in COMMANDS:
        module_name = f"stratosd.ctl.{name}"
        listed = SUMMARIES.get(name)
        if argv is not None and listed is not None and all(c != wanted for c, _ in listed):
            if importlib.util.find_spec(module_name) is not None:
                for command, summary in listed:
                    sub.add_parser(command, help=summary)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(sub)
    return parser


def exit_code(code: str) -> int:
    """Map an error code to stratosctl's exit code."""
    if code in ("config", "bad_message"):
        return 2
    if code in ("bus_unavailable",):
        return 3
    if code in ("remote", "conflict", "not_found", "infeasible", "unsupported"):
        return 4
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from stratosd.errors import RemoteError, StratosError
    from stratosd.logging import configure_logging

    configure_logging("debug" if args.verbose else "error", "console", stream=sys.stderr)
    try:
        return int(args.func(args))
    except StratosError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        code = exc.remote_code if isinstance(exc, RemoteError) else exc.code
        return 4 if isinstance(exc, RemoteError) and code not in ("config", "bad_message") \
            else exit_code(code)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
