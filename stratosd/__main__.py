"""`stratosd` / `python -m stratosd`: the Stratos daemon."""

from __future__ import annotations

import argparse
import gc
import sys

EPILOG = """\
examples:
  stratosd                         embedded nats-server (JetStream) under $STRATOS_HOME/nats
  stratosd --nats nats://10.0.0.5:4222 --config /etc/stratos/stratosd.toml
  stratosd --nats nats://n1:4222,nats://n2:4222,nats://n3:4222   a 3-node cluster, 3 replicas
environment:
  STRATOS_HOME            state dir (default ~/.stratos): embedded server, reports
  STRATOS_NATS_URL        use an existing NATS server or cluster instead of the embedded one
                          (a cluster: its URLs comma-separated; STRATOS_REPLICAS forces replicas)
  STRATOS_NATS_CREDS      .creds file; STRATOS_NATS_USER + STRATOS_NATS_PASSWORD for user auth
  STRATOS_DISABLE_PLUGINS comma-separated plugin names to block
  STRATOS_ARTIFACT_STORE  file:///shared/path or s3://bucket/prefix for large artifacts
  STRATOS_METRICS_PORT    serve Prometheus metrics on this port (docs/operations.md)
"""


def main(argv: list[str] | None = None) -> int:
    """Parse flags, load config, run the daemon until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="stratosd", description="Stratos daemon: picks servers, drives distillation runs "
        "over NATS, keeps state in JetStream.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config file (default $STRATOS_CONFIG)")
    parser.add_argument("--nats", dest="nats_url", metavar="URL[,URL...]",
                        help="NATS URL, or a cluster's URLs comma-separated (default: embedded "
                        "server)")
    parser.add_argument("--replicas", type=int, metavar="N",
                        help="JetStream replicas for streams, KV and object store (default: "
                        "min(3, cluster size) when created; docs/cluster.md)")
    parser.add_argument("--home", help="state directory (default $STRATOS_HOME or ~/.stratos)")
    parser.add_argument("--artifact-store", metavar="URI",
                        help="put large artifacts in file:///shared/path or s3://bucket/prefix; "
                        "the bus carries references (default: the bus's object store)")
    parser.add_argument("--artifact-store-min-bytes", type=int, metavar="N",
                        help="only files of at least N bytes go to --artifact-store (default 0)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: "
                        "off; 0: any free port)")
    parser.add_argument("--metrics-host", metavar="HOST",
                        help="address the metrics endpoint binds (default 127.0.0.1)")
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
            "log_format": args.log_format, "artifact_store": args.artifact_store,
            "artifact_store_min_bytes": args.artifact_store_min_bytes,
            "metrics_port": args.metrics_port, "metrics_host": args.metrics_host,
            "replicas": args.replicas})
        configure_logging(config.log_level, config.log_format)
        daemon = Daemon(config)
        # the start-up heap (modules, plugins) lives as long as the process: keep it out of
        # the full collections that thousands of agents' telemetry triggers (p99 ingest delay)
        gc.collect()
        gc.freeze()
        await daemon.run()

    return run_service(serve)


if __name__ == "__main__":
    sys.exit(main())
