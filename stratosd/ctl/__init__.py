"""stratosctl: the operator's command line. Errors are one line and an exit code, never a trace.

Exit codes: 0 ok, 1 other failure, 2 usage/config, 3 daemon or bus unreachable, 4 rejected.
"""

from __future__ import annotations

import argparse
import sys
import traceback

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
            "endpoints", "report", "auth", "demo", "resume")


def build_parser() -> argparse.ArgumentParser:
    """The full parser (subcommands register themselves)."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="stratosctl", description="Operate Stratos: servers, jobs, plans, reports.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nats", dest="nats_url",
                        help="NATS URL (default: $STRATOS_NATS_URL or the local daemon's)")
    parser.add_argument("--config", help="TOML config (default $STRATOS_CONFIG)")
    parser.add_argument("--home", help="state dir (default $STRATOS_HOME or ~/.stratos)")
    parser.add_argument("--verbose", "-v", action="store_true", help="tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"stratosd.ctl.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"stratosd.ctl.{name}":
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
    parser = build_parser()
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
