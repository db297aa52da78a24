"""Bus security: per-role NATS permissions and the nats-server config + credentials generator.

Three roles share one NATS account: the daemon (everything), the operator (stratosctl: the
daemon's control API and read-only event replay) and one user per agent (its own telemetry,
job and agent events, its own artifact bucket, and only its own command subjects). Passwords are
random (`secrets`), handed to clients in 0600 files, and stored bcrypt-hashed in the server
config. Subjects come from `schemas.subjects`; nothing here is a policy plugin.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from schemas import subjects
from schemas.base import is_token
from stratosd.artifacts.busstore import agent_bucket
from stratosd.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)

DAEMON_USER = "daemon"
OPERATOR_USER = "operator"
AGENT_USER_PREFIX = "agent-"
SERVER_CONFIG = "nats-server.conf"
# Replies go to inboxes. With nats.py's shared default prefix any user allowed `_INBOX.>` can
# read every reply on the bus; per-user prefixes close that (docs/security.md).
# stratosd.bus.connect passes inbox_prefix(user) whenever a user name is configured.
PRIVATE_INBOXES = True
BCRYPT_COST = 11

_JS = "$JS.API"


@dataclass(frozen=True)
class Permissions:
    """What one NATS user may publish and subscribe to (an allow list; the rest is denied)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False

    def as_conf(self) -> dict[str, object]:
        """The nats-server `permissions` block."""
        out: dict[str, object] = {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": list(self.subscribe)},
        }
        if self.allow_responses:
            # one reply per request received, to its reply subject only (micro endpoints)
            out["allow_responses"] = True
        return out


def artifact_store_subjects(bucket: str) -> tuple[str, ...]:
    """The JetStream API + data subjects the object store client needs (put, get, get_info)
    on one bucket: an agent gets them for its own bucket only (private artifacts).

    Measured with a wiretap on nats-py 2.16 / nats-server 2.15; the CREATE.{stream}.> and
    DIRECT.GET forms are what newer clients (named consumers, direct get) send instead.
    Nothing here creates, updates or deletes a stream: the daemon creates agents' buckets.
    """
    stream = f"OBJ_{bucket}"
    return (
        f"$O.{bucket}.>",  # chunks ($O.b.C.nuid) and meta ($O.b.M.name) via JetStream publish
        f"{_JS}.STREAM.INFO.{stream}",
        f"{_JS}.STREAM.NAMES",  # get() looks the stream up by subject (names only)
        f"{_JS}.STREAM.MSG.GET.{stream}",
        f"{_JS}.DIRECT.GET.{stream}.>",
        f"{_JS}.STREAM.PURGE.{stream}",  # old chunks when a key is overwritten (retries)
        f"{_JS}.CONSUMER.CREATE.{stream}",  # get(): an ephemeral ordered consumer
        f"{_JS}.CONSUMER.CREATE.{stream}.>",
        f"$JS.FC.{stream}.>",  # flow-control replies of that consumer
    )


def daemon_permissions() -> Permissions:
    """The daemon creates streams/KV/object store, commands agents, reads everything."""
    return Permissions(publish=(">",), subscribe=(">",), allow_responses=False)


def agent_permissions(agent_id: str) -> Permissions:
    """Agent `agent_id`: its own telemetry/events/commands, job events, artifacts; no commands."""
    if not is_token(agent_id):
        raise ConfigError(f"agent id {agent_id!r} is not valid: use 1-64 of [a-z0-9_-]",
                          hint="e.g. --agents gpu-1,gpu-2", field="agents")
    group = subjects.agent_cmd_group(agent_id)
    svc = subjects.AGENT_SERVICE
    return Permissions(
        publish=(
            subjects.telemetry(agent_id),
            # job events do not name the agent: see docs/security.md "job events"
            subjects.job_events(agent_id=agent_id),
            f"{subjects.PREFIX}.evt.agent.{agent_id}.>",
            f"$SRV.PING.{subjects.DAEMON_SERVICE}",  # latency probe to the daemon
            # its own artifact bucket only; the daemon copies inputs in and outputs out
            *artifact_store_subjects(agent_bucket(agent_id)),
        ),
        subscribe=(
            f"{group}.>",
            # nats.micro discovery: $SRV.VERB, $SRV.VERB.name, $SRV.VERB.name.id
            "$SRV.*", f"$SRV.*.{svc}", f"$SRV.*.{svc}.*",
            inboxes(agent_user(agent_id)),
        ),
        allow_responses=True,
    )


def operator_permissions(user: str = OPERATOR_USER) -> Permissions:
    """stratosctl: the daemon's control API, service discovery, and event replay (watch)."""
    events = subjects.EVENTS_STREAM
    return Permissions(
        publish=(
            f"{subjects.DAEMON_CMD_GROUP}.>",
            "$SRV.*", f"$SRV.*.{subjects.DAEMON_SERVICE}", f"$SRV.*.{subjects.DAEMON_SERVICE}.*",
            f"{_JS}.CONSUMER.CREATE.{events}",  # watch: an ephemeral ordered consumer
            f"{_JS}.CONSUMER.CREATE.{events}.>",  # consumers read; they cannot alter the stream
            f"$JS.FC.{events}.>",
        ),
        subscribe=(inboxes(user),),
    )


def inbox_prefix(user: str) -> str:
    """The reply-subject prefix a client logged in as user should use (private inboxes)."""
    return f"_INBOX_{user}"


def inboxes(user: str) -> str:
    """The subscribe permission for user's reply subjects."""
    return f"{inbox_prefix(user)}.>" if PRIVATE_INBOXES else "_INBOX.>"


def agent_user(agent_id: str) -> str:
    """The NATS user name of an agent."""
    return f"{AGENT_USER_PREFIX}{agent_id}"


def hash_password(password: str) -> str:
    """bcrypt hash nats-server accepts in place of a password ($2b$, cost 11)."""
    try:
        import bcrypt

        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_COST)).decode())
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt  # stdlib up to 3.12; glibc/libxcrypt implement bcrypt
        except ImportError:
            crypt = None  # type: ignore[assignment]
    if crypt is not None:
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH,
                                                    rounds=2**BCRYPT_COST))
        if hashed and hashed.startswith("$2"):
            return hashed
    raise ConfigError("no bcrypt implementation available to hash NATS passwords",
                      hint="pip install bcrypt")


@dataclass
class Identity:
    """One NATS user: its name, role, permissions and (once generated) password."""

    user: str
    role: str
    permissions: Permissions
    agent_id: str | None = None
    password: str = field(default="", repr=False)  # never in a repr, hence never in a log

    @property
    def file_stem(self) -> str:
        """Base name of its env and password files."""
        return self.user


def identities(agent_ids: list[str], operator: str = OPERATOR_USER) -> list[Identity]:
    """daemon, operator, then one identity per agent."""
    if not is_token(operator):
        raise ConfigError(f"operator name {operator!r} is not valid: use 1-64 of [a-z0-9_-]",
                          hint="e.g. --operator alice", field="operator")
    out = [Identity(DAEMON_USER, "daemon", daemon_permissions()),
           Identity(operator, "operator", operator_permissions(operator))]
    seen = {DAEMON_USER, operator}
    for agent_id in agent_ids:
        ident = Identity(agent_user(agent_id), "agent", agent_permissions(agent_id), agent_id)
        if ident.user in seen:
            raise ConfigError(f"duplicate identity {ident.user!r}",
                              hint="each agent id once; the operator name must differ")
        seen.add(ident.user)
        out.append(ident)
    return out


def _q(value: str) -> str:
    # JSON strings are valid nats-server config strings; quoting keeps `$...` from being
    # read as a variable reference.
    return json.dumps(value)


def _conf_list(items: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(_q(i) for i in items) + "]"


def user_block(ident: Identity, password_hash: str) -> str:
    """One entry of authorization.users."""
    p = ident.permissions
    lines = [
        "    {",
        f"      # role: {ident.role}" + (f", agent {ident.agent_id}" if ident.agent_id else ""),
        f"      user: {_q(ident.user)}",
        f"      password: {_q(password_hash)}",
        "      permissions: {",
        f"        publish: {{ allow: {_conf_list(p.publish)} }}",
        f"        subscribe: {{ allow: {_conf_list(p.subscribe)} }}",
    ]
    if p.allow_responses:
        lines.append("        allow_responses: true")
    lines += ["      }", "    }"]
    return "\n".join(lines)


def server_config(users: list[str], *, host: str, port: int, store_dir: str,
                  tls_cert: str | None = None, tls_key: str | None = None) -> str:
    """The nats-server config text (users: rendered user blocks)."""
    parts = [
        "# Generated by `stratosctl auth init`; see docs/security.md.",
        "# Passwords are bcrypt hashes; clients hold the plain ones in 0600 files.",
        f"listen: {_q(f'{host}:{port}')}",
        f"jetstream {{ store_dir: {_q(store_dir)} }}",
    ]
    if tls_cert and tls_key:
        parts.append(f"tls {{ cert_file: {_q(tls_cert)}, key_file: {_q(tls_key)} }}")
    parts += [
        "authorization {",
        "  users: [",
        "\n".join(users),
        "  ]",
        "}",
        "",
    ]
    return "\n".join(parts)


def env_file(ident: Identity, *, url: str, password_path: str, tls_ca: str | None) -> str:
    """The systemd EnvironmentFile of one identity (no secret in it: a path to one)."""
    lines = [
        f"# Stratos NATS identity {ident.user} (role {ident.role}); see docs/security.md",
        f"STRATOS_NATS_URL={url}",
        f"STRATOS_NATS_USER={ident.user}",
        f"STRATOS_NATS_PASSWORD_FILE={password_path}",
    ]
    if tls_ca:
        lines.append(f"STRATOS_NATS_TLS_CA={tls_ca}")
    if ident.agent_id:
        lines.append(f"STRATOS_AGENT_ID={ident.agent_id}")
    return "\n".join(lines) + "\n"


def check_price(agent_id: str, price: float) -> None:
    """An operator price must be a number >= 0 (USD per hour)."""
    if not price >= 0:  # NaN too
        raise ConfigError(f"price {price!r} of agent {agent_id!r} is not a number >= 0",
                          hint="e.g. --price-per-hour 2.5", field="price_per_hour")


def _write_private(path: Path, text: str) -> None:
    # created 0600 from the start: no window in which another user can read the secret
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


@dataclass
class AuthSetup:
    """Everything `stratosctl auth init` writes into one directory."""

    out: Path
    host: str = "127.0.0.1"
    port: int = 4222
    install_dir: str | None = None  # where the files will live (e.g. /etc/stratos)
    store_dir: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    client_url: str | None = None

    @property
    def files_dir(self) -> str:
        """The directory paths inside the env files point to."""
        return self.install_dir or str(self.out.resolve())

    @property
    def url(self) -> str:
        """The URL clients use: --url, else host:port (a wildcard host: this host's name)."""
        if self.client_url:
            return self.client_url
        host = socket.getfqdn() if self.host in ("0.0.0.0", "::") else self.host  # noqa: S104
        scheme = "tls" if self.tls_cert else "nats"
        return f"{scheme}://{host}:{self.port}"

    def password_path(self, ident: Identity) -> Path:
        """Where an identity's password file is written."""
        return self.out / f"{ident.file_stem}.password"

    def planned(self, idents: list[Identity]) -> list[Path]:
        """Every file init would write."""
        files = [self.out / SERVER_CONFIG]
        for ident in idents:
            files += [self.out / f"{ident.file_stem}.env", self.password_path(ident)]
        return files

    def write(self, idents: list[Identity], *, force: bool = False,
              price_per_hour: float | None = None) -> list[Path]:
        """Generate passwords and write config, env and password files; refuse to overwrite.

        price_per_hour: the operator's price of every agent in idents (agent-prices.json)."""
        written = self.planned(idents)
        if price_per_hour is not None:
            check_price("*", price_per_hour)
        existing = [p for p in written if p.exists()]
        if existing and not force:
            raise ConfigError(
                f"{existing[0]} already exists ({len(existing)} file(s) would be overwritten)",
                hint="pass --force to regenerate every credential (all clients need the new "
                "files), or use `stratosctl auth add-agent` to add one agent")
        self.out.mkdir(parents=True, exist_ok=True)
        os.chmod(self.out, 0o700)
        for ident in idents:
            ident.password = secrets.token_urlsafe(32)
        self._write_server_config(idents)
        for ident in idents:
            self._write_client(ident)
        agents = [i.agent_id for i in idents if i.agent_id]
        if price_per_hour is not None and agents:
            written.append(self.set_prices(dict.fromkeys(agents, price_per_hour), fresh=True))
        log.info("auth_config_written", out=str(self.out), users=[i.user for i in idents])
        return written

    def set_prices(self, prices: dict[str, float], *, fresh: bool = False) -> Path:
        """Record operator prices (USD/h) in agent-prices.json, which the daemon reads from
        beside its password file (stratosd.pricing); other agents' prices are kept."""
        from stratosd.pricing import PRICE_KEY, PRICES_FILE

        for agent_id, price in prices.items():
            check_price(agent_id, price)
        path = self.out / PRICES_FILE
        data: dict[str, dict[str, float]] = {}
        if path.exists() and not fresh:
            data = json.loads(path.read_text())
        data.update({a: {PRICE_KEY: float(p)} for a, p in prices.items()})
        _write_private(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    def _write_server_config(self, idents: list[Identity]) -> None:
        store = self.store_dir or f"{self.files_dir}/jetstream"
        blocks = [user_block(i, hash_password(i.password)) for i in idents]
        text = server_config(blocks, host=self.host, port=self.port, store_dir=store,
                             tls_cert=self.tls_cert, tls_key=self.tls_key)
        _write_private(self.out / SERVER_CONFIG, text)

    def _write_client(self, ident: Identity) -> None:
        pw_path = self.password_path(ident)
        _write_private(pw_path, ident.password + "\n")
        env = env_file(ident, url=self.url, password_path=f"{self.files_dir}/{pw_path.name}",
                       tls_ca=self.tls_ca)
        _write_private(self.out / f"{ident.file_stem}.env", env)

    def add_agent(self, agent_id: str, price_per_hour: float | None = None) -> list[Path]:
        """Add one agent user to an existing config (the others keep their passwords), with
        the operator's price when given."""
        if price_per_hour is not None:
            check_price(agent_id, price_per_hour)
        conf = self.out / SERVER_CONFIG
        if not conf.exists():
            raise ConfigError(f"{conf} does not exist",
                              hint="run `stratosctl auth init --out DIR` first")
        ident = Identity(agent_user(agent_id), "agent", agent_permissions(agent_id), agent_id)
        text = conf.read_text()
        if f"user: {_q(ident.user)}" in text:
            raise ConfigError(f"agent {agent_id!r} already has credentials in {conf}",
                              hint="pick another id, or rerun `auth init --force`")
        marker = "\n  ]\n}"
        if marker not in text:
            raise ConfigError(f"{conf} was not written by `stratosctl auth init`",
                              hint="add the user by hand (see docs/security.md)")
        ident.password = secrets.token_urlsafe(32)
        block = user_block(ident, hash_password(ident.password))
        head, _, tail = text.rpartition(marker)
        _write_private(conf, f"{head}\n{block}{marker}{tail}")
        self._write_client(ident)
        written = [conf, self.out / f"{ident.file_stem}.env", self.password_path(ident)]
        if price_per_hour is not None:
            written.append(self.set_prices({agent_id: price_per_hour}))
        log.info("auth_agent_added", out=str(self.out), agent_id=agent_id,
                 price_usd_per_hour=price_per_hour)
        return written
