"""`stratosctl auth init|add-agent`: nats-server config with per-role users, and their secrets."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
files written into --out (mode 0600, directory 0700):
  nats-server.conf           users with bcrypt-hashed passwords and per-role permissions
  daemon.env  operator.env  agent-ID.env
                             STRATOS_NATS_URL / _USER / _PASSWORD_FILE (systemd EnvironmentFile)
  *.password                 the plain password of each identity (never in an env var)
  agent-prices.json          with --price-per-hour: each agent's price in USD/h, set by the
                             operator; install it beside daemon.password (the daemon reads it
                             there and ignores the price an agent declares)

then:  nats-server -c DIR/nats-server.conf   and point stratosd at it with --nats URL
see docs/security.md for the exact permissions of each role.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("auth", help="generate NATS users, permissions and credentials",
                       description="Lock the bus down: one NATS user per role (daemon, "
                       "operator, each agent) with least-privilege permissions.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="auth_command", metavar="ACTION", required=True)

    init = actions.add_parser("init", help="write nats-server.conf and one credential per role",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    init.add_argument("--out", required=True, type=Path, help="directory to write into")
    init.add_argument("--agents", default="",
                      help="comma-separated agent ids, e.g. gpu-1,gpu-2 (more later: add-agent)")
    init.add_argument("--operator", default="operator", help="the operator's user name")
    init.add_argument("--host", default="127.0.0.1",
                      help="address nats-server listens on (0.0.0.0 for remote agents)")
    init.add_argument("--port", type=int, default=4222, help="client port")
    init.add_argument("--url", help="URL clients use (default nats://HOST:PORT)")
    init.add_argument("--install-dir",
                      help="where these files will live, e.g. /etc/stratos (paths in *.env and "
                      "the JetStream store dir point there; default: --out)")
    init.add_argument("--store-dir", help="JetStream store dir (default INSTALL_DIR/jetstream)")
    init.add_argument("--tls-cert", help="server certificate (PEM): enables TLS")
    init.add_argument("--tls-key", help="server private key (PEM)")
    init.add_argument("--tls-ca", help="CA clients verify the server with (STRATOS_NATS_TLS_CA)")
    init.add_argument("--price-per-hour", type=float, metavar="USD",
                      help="the operator's price of each --agents agent (agent-prices.json)")
    init.add_argument("--force", action="store_true",
                      help="overwrite existing files (every credential changes)")
    init.set_defaults(func=main_init)

    add = actions.add_parser("add-agent", help="add one agent user to an existing config")
    add.add_argument("id", help="agent id, [a-z0-9_-]")
    add.add_argument("--out", required=True, type=Path, help="the directory init wrote")
    add.add_argument("--install-dir", help="as given to init")
    add.add_argument("--url", help="URL clients use (default: the one in daemon.env)")
    add.add_argument("--tls-ca", help="as given to init")
    add.add_argument("--price-per-hour", type=float, metavar="USD",
                     help="the agent's price, set by the operator: offers and cost estimates "
                     "use it, whatever the agent declares (agent-prices.json)")
    add.set_defaults(func=main_add)


def main_init(args: argparse.Namespace) -> int:
    """Write the server config and the credential files."""
    from stratosd.auth import AuthSetup, identities
    from stratosd.errors import ConfigError

    agents = [a.strip() for a in args.agents.split(",") if a.strip()]
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together",
                          hint="pass both, or neither for a plain-TCP bus")
    setup = AuthSetup(out=args.out, host=args.host, port=args.port,
                      install_dir=args.install_dir, store_dir=args.store_dir,
                      tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
                      client_url=args.url)
    written = setup.write(identities(agents, args.operator), force=args.force,
                          price_per_hour=args.price_per_hour)
    for path in written:
        print(path)
    print(f"\nstart the server:  nats-server -c {setup.files_dir}/nats-server.conf", flush=True)
    return 0


def _env_value(env: Path, key: str) -> str | None:
    if not env.exists():
        return None
    for line in env.read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1]
    return None


def main_add(args: argparse.Namespace) -> int:
    """Add an agent user; the server picks it up on reload (SIGHUP) or restart."""
    from stratosd.auth import DAEMON_USER, AuthSetup

    daemon_env = args.out / f"{DAEMON_USER}.env"
    pw_file = _env_value(daemon_env, "STRATOS_NATS_PASSWORD_FILE")
    setup = AuthSetup(out=args.out,
                      install_dir=args.install_dir or (str(Path(pw_file).parent) if pw_file
                                                       else None),
                      client_url=args.url or _env_value(daemon_env, "STRATOS_NATS_URL"),
                      tls_ca=args.tls_ca or _env_value(daemon_env, "STRATOS_NATS_TLS_CA"))
    for path in setup.add_agent(args.id, args.price_per_hour):
        print(path)
    print("\nreload the server:  nats-server --signal reload  (or restart it)", flush=True)
    if args.price_per_hour is not None:
        print("copy agent-prices.json beside the daemon's password file (picked up in seconds)",
              flush=True)
    return 0
