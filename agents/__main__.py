"""`stratos-agent` / `python -m agents`: the host agent."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  stratos-agent --id gpu-1 --price-per-hour 2.49 --region us-east
  stratos-agent --id a100-eu --price-per-hour 1.80 --region eu-west --nats nats://daemon:4222 \\
      --probe-url eu-west=https://users-eu.example.com/health \\
      --probe-url us-east=https://users-us.example.com/health
  stratos-agent --id cpu-1 --threads 4      # every job gets 4 CPU threads; calibrated with 4
The agent runs only the pipeline steps Stratos defines (probe, prescreen, synthesize, train,
evaluate, deploy), each in a child process; it never runs arbitrary commands. At start (and on
`stratosctl servers --calibrate`) it measures its capacity in a few seconds: matmul TFLOP/s,
memory GB/s, disk and upload MB/s (see agents/calibrate.py). Latency is what users see: the
worst median of the --probe-url targets; without targets it is reported as unknown.
"""


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run the agent until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(
        prog="stratos-agent", description="Stratos host agent: reports hardware, price and "
        "latency, runs pipeline steps for the daemon.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--id", dest="agent_id", help="agent id, [a-z0-9_-] (required)")
    p.add_argument("--price-per-hour", dest="price_usd_per_hour", type=float,
                   help="what this host costs, USD/h")
    p.add_argument("--region", help="region label, e.g. us-east")
    p.add_argument("--nats", dest="nats_url", metavar="URL[,URL...]",
                   help="NATS URL, or a cluster's URLs comma-separated (default: the local "
                   "daemon's)")
    p.add_argument("--config", help="TOML config file (default $STRATOS_CONFIG)")
    p.add_argument("--home", help="state directory (default $STRATOS_HOME or ~/.stratos)")
    p.add_argument("--interval", dest="telemetry_interval_s", type=float,
                   help="telemetry period in seconds (default 5)")
    p.add_argument("--probe-url", action="append", metavar="[LABEL=]URL",
                   help="time HTTP GETs to a URL where users are (repeatable; LABEL names it, "
                   "e.g. us-east=https://...); latency is the worst target's median")
    p.add_argument("--threads", dest="job_threads", type=int, metavar="N",
                   help="CPU threads each job (and the calibration) gets (default 0: torch's "
                   "default)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_const", const=False,
                   help="do not measure capacity at start (the calibrate command still works)")
    p.add_argument("--work-dir", help="job directories (default HOME/agents/ID)")
    p.add_argument("--artifact-store", metavar="URI",
                   help="put large artifacts in file:///shared/path or s3://bucket/prefix; "
                   "the bus carries references (default: the bus's object store)")
    p.add_argument("--artifact-store-min-bytes", type=int, metavar="N",
                   help="only files of at least N bytes go to --artifact-store (default 0)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["auto", "json", "console"])
    args = p.parse_args(argv)

    from agents.agent import Agent
    from stratosd.config import AgentConfig, load_config
    from stratosd.logging import configure_logging
    from stratosd.runtime import run_service

    config_overrides = {k: v for k, v in vars(args).items() if k != "config"}

    async def serve() -> None:
        config = load_config(AgentConfig, args.config, config_overrides)
        if not config.agent_id:
            p.error("--id is required (or agent_id in the config / STRATOS_AGENT_ID)")
        configure_logging(config.log_level, config.log_format)
        await Agent(config).run()

    return run_service(serve)


if __name__ == "__main__":
    sys.exit(main())
