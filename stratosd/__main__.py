"""`stratosd` / `python -m stratosd`: the Stratos daemon."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  stratosd                         embedded nats-server (JetStream) under $STRATOS_HOME/nats
  stratosd --nats nats://10.0.0.5:4222 --config /etc/stratos/stratosd.toml
environment:
  STRATOS_HOME            state dir (default ~/.stratos): embedded server, reports
  STRATOS_NATS_URL        use an existing NATS server or cluster instead of the embedded one
  STRATOS_NATS_CREDS      .creds file; STRATOS_NATS_USER + STRATOS_NATS_PASSWORD for user auth
  STRATOS_DISABLE_PLUGINS comma-separated plugin names to block
"""


def main(argv: list[str] | None = None) -> int:
    """Parse flags, load config, run the daemon until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="stratosd", description="Stratos daemon: picks servers, drives distillation runs "
        "over NATS, keeps state in JetStream.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config file (default $STRATOS_CONFIG)")
    parser.add_argument("--nats", dest="nats_url", help="NATS URL (default: embedded server)")
    parser.add_argument("--home", help="state directory (default $STRATOS_HOME or ~/.stratos)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"])
    args = parser.parse_args(argv)

    from stratosd.config import DaemonConfig, load_config
    from stratosd.daemon import Daemon
    from stratosd.logging import configure_logging
    from stratosd.runtime import run_service

    async def serve() -> None:
        config = load_config(DaemonConfig, args.config, {
            "nats_url": args.nats_url, "home": args.home, "log_level": args.log_level,
            "log_format": args.log_format})
        configure_logging(config.log_level, config.log_format)
        await Daemon(config).run()

    return run_service(serve)


if __name__ == "__main__":
    sys.exit(main())
