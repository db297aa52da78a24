"""StratosConfig / DaemonConfig / AgentConfig: TOML file, then STRATOS_* env, then CLI flags."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from stratosd.errors import ConfigError


def default_home() -> str:
    """$STRATOS_HOME, else ~/.stratos."""
    return os.environ.get("STRATOS_HOME") or str(Path.home() / ".stratos")


class StratosConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Settings shared by the daemon, agents and stratosctl. Secrets come only from env/files."""

    home: str = msgspec.field(default_factory=default_home)
    # one URL or several, comma-separated (the servers of one cluster; any of them will do)
    nats_url: str | None = None
    nats_creds: str | None = None  # a .creds file (nkeys/JWT)
    nats_user: str | None = None
    # the password is read from this file, or from $STRATOS_NATS_PASSWORD
    nats_password_file: str | None = None
    nats_tls_ca: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    connect_timeout_s: Annotated[float, Meta(gt=0.0)] = 5.0
    # where large artifacts go: file:///shared/path or s3://bucket/prefix (unset: the bus's
    # object store); the bus then carries only a reference. Smaller files stay on the bus.
    artifact_store: str | None = None
    artifact_store_min_bytes: Annotated[int, Meta(ge=0)] = 0

    @property
    def home_path(self) -> Path:
        """home as a Path (created on demand by the components that write there)."""
        return Path(self.home).expanduser()

    def nats_password(self) -> str | None:
        """The NATS password, from $STRATOS_NATS_PASSWORD or nats_password_file."""
        if os.environ.get("STRATOS_NATS_PASSWORD"):
            return os.environ["STRATOS_NATS_PASSWORD"]
        if self.nats_password_file:
            try:
                return Path(self.nats_password_file).expanduser().read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read nats_password_file {self.nats_password_file!r}: {exc}",
                    hint="fix the path or set STRATOS_NATS_PASSWORD",
                    field="nats_password_file",
                ) from None
        return None

    def resolved_nats_url(self) -> str:
        """nats_url, else the URL an embedded daemon wrote to home/nats.url, else localhost."""
        if self.nats_url:
            return self.nats_url
        marker = self.home_path / "nats.url"
        if marker.exists():
            return marker.read_text().strip()
        return "nats://127.0.0.1:4222"

    def nats_urls(self) -> list[str]:
        """resolved_nats_url() split into its servers (see split_nats_urls)."""
        return split_nats_urls(self.resolved_nats_url())


class DaemonConfig(StratosConfig, kw_only=True, forbid_unknown_fields=True):
    """Daemon settings. Without nats_url the daemon starts an embedded nats-server."""

    embedded_port: int = -1
    embedded_host: str = "127.0.0.1"
    # nats-server config for the embedded server (e.g. from `stratosctl auth init`)
    embedded_config: str | None = None
    missed_heartbeats: Annotated[int, Meta(ge=1)] = 3
    liveness_check_s: Annotated[float, Meta(gt=0.0)] = 1.0
    kv_flush_s: Annotated[float, Meta(gt=0.0)] = 5.0
    ingest_report_s: Annotated[float, Meta(gt=0.0)] = 60.0
    job_ack_timeout_s: Annotated[float, Meta(gt=0.0)] = 5.0
    stage_retries: Annotated[int, Meta(ge=0)] = 2
    handler_grace_s: Annotated[float, Meta(ge=0.0)] = 10.0
    # Prometheus metrics (docs/operations.md): unset = off; 0 = any free port (logged)
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] | None = None
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 to let a remote Prometheus scrape
    metrics_agents: bool = True  # per-agent series (11 + 3 per GPU); off for huge fleets
    # JetStream replicas of the streams, KV buckets and object store the daemon creates:
    # unset = min(3, the cluster's size) for new ones, existing ones keep theirs (docs/cluster.md)
    replicas: Annotated[int, Meta(ge=1, le=5)] | None = None


class AgentConfig(StratosConfig, kw_only=True, forbid_unknown_fields=True):
    """Agent settings: identity, price, region, telemetry cadence, calibration, thread cap."""

    agent_id: str = ""
    price_usd_per_hour: Annotated[float, Meta(ge=0.0)] = 0.0
    region: str = ""
    telemetry_interval_s: Annotated[float, Meta(gt=0.0)] = 5.0
    # user-facing latency targets: "URL" or "LABEL=URL" (e.g. "us-east=https://...")
    probe_url: str | list[str] | None = None
    work_dir: str | None = None
    max_jobs: Annotated[int, Meta(ge=1)] = 4
    grace_s: Annotated[float, Meta(ge=0.0)] = 20.0
    calibrate: bool = True  # measure capacity at start (agents.calibrate)
    job_threads: Annotated[int, Meta(ge=0)] = 0  # CPU threads per job child; 0: torch default

    @property
    def probe_urls(self) -> list[str]:
        """probe_url as a list (one string or several)."""
        if self.probe_url is None:
            return []
        return [self.probe_url] if isinstance(self.probe_url, str) else list(self.probe_url)

    @property
    def work_path(self) -> Path:
        """Where job work dirs and run state live."""
        return Path(self.work_dir).expanduser() if self.work_dir else self.home_path / "agents" / (
            self.agent_id or "agent"
        )


C = TypeVar("C", bound=StratosConfig)


def split_nats_urls(value: str) -> list[str]:
    """Comma- (or space-) separated NATS URLs as a list, in order, duplicates dropped."""
    urls = [u.strip() for u in value.replace(" ", ",").split(",")]
    out = list(dict.fromkeys(u for u in urls if u))
    if not out:
        raise ConfigError(f"no NATS URL in {value!r}",
                          hint="pass nats://host:port, or several separated by commas",
                          field="nats_url")
    return out


def _env_overrides(cls: type[StratosConfig]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        value = os.environ.get(f"STRATOS_{field.name.upper()}")
        if value is not None and value != "":
            out[field.name] = value
    return out


def load_config(
    cls: type[C], path: str | None = None, overrides: dict[str, Any] | None = None
) -> C:
    """Merge TOML file (path or $STRATOS_CONFIG), STRATOS_* env and overrides, then validate."""
    data: dict[str, Any] = {}
    path = path or os.environ.get("STRATOS_CONFIG")
    if path:
        try:
            data.update(tomllib.loads(Path(path).expanduser().read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist",
                              hint="pass an existing file with --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid TOML: {exc}",
                              hint="fix the syntax at the position shown") from None
    if isinstance(data.get("nats_url"), list):  # TOML: nats_url = ["nats://a:4222", ...]
        data["nats_url"] = ",".join(map(str, data["nats_url"]))
    data.update(_env_overrides(cls))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(data, cls, strict=False)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        field = msg.rsplit("`$.", 1)[-1].rstrip("`") if "`$." in msg else None
        raise ConfigError(
            f"invalid configuration: {msg}",
            hint="check the field in the config file, STRATOS_* env vars and flags",
            field=field,
        ) from None
