"""The bus: connect/drain, JetStream streams/KV/object store, publish, request, micro handlers."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import nats
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.client import KV_STREAM_TEMPLATE
from nats.js.errors import (
    APIError,
    BadRequestError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.object_store import OBJ_STREAM_TEMPLATE
from nats.micro.request import Request

from schemas import subjects
from schemas.base import Message, decode_or_error, encode
from schemas.commands import REPLY_DECODER
from schemas.errors import ErrorReply
from stratosd.config import DaemonConfig, StratosConfig, split_nats_urls
from stratosd.errors import (
    BadMessage,
    BusUnavailable,
    ConfigError,
    NotFound,
    RemoteError,
    StratosError,
)

log = structlog.stdlib.get_logger(__name__)
# JetStream cannot place the replicas: 10005 no suitable peers, 10023 insufficient resources,
# 10074 replicas > 1 on a server that is not clustered
_PLACEMENT_ERRORS = frozenset({10005, 10023, 10074})


# Reconnect pacing: a dead server's clients move to another cluster member at once (nats-py
# tries each server once before it waits); pings find a silently vanished server within ~30 s.
RECONNECT_WAIT_S = 0.5
PING_INTERVAL_S = 10
MAX_OUTSTANDING_PINGS = 3
# how long publish_event resends an unacknowledged event (a stream's leader election)
PUBLISH_RETRY_S = 20.0
# what a JetStream call meets while a cluster elects a leader or the client reconnects
FAILOVER_ERRORS: tuple[type[Exception], ...] = (
    ServiceUnavailableError, NoStreamResponseError, nats.errors.TimeoutError,
    nats.errors.NoRespondersError)
T = TypeVar("T")


async def through_failover(call: Callable[[], Awaitable[T]], *, within_s: float,
                           on_retry: Callable[[Exception], None], delay_s: float = 0.5,
                           max_delay_s: float | None = None,
                           errors: tuple[type[Exception], ...] = FAILOVER_ERRORS) -> T:
    """call(), again after each of `errors` until within_s has passed (then that error is
    raised); on_retry(error) before each wait; the wait doubles up to max_delay_s (default:
    it stays delay_s)."""
    deadline = time.monotonic() + within_s
    delay, top = delay_s, delay_s if max_delay_s is None else max_delay_s
    while True:
        try:
            return await call()
        except errors as exc:
            if time.monotonic() >= deadline:
                raise
            on_retry(exc)
            await asyncio.sleep(delay)
            delay = min(top, delay * 2)


async def connect(
    config: StratosConfig, name: str, url: str | None = None, *, retry_for_s: float = 0.0
) -> Client:
    """Connect to NATS with credentials from config/env; reconnect forever once connected.

    url (or config.nats_url) may list several servers, comma-separated: the members of one
    cluster. nats-py picks one at random and fails over to the others (and to those the
    cluster advertises); the credentials and TLS settings apply to every one of them.
    The first connection is tried for about retry_for_s (at least once per server), so a CLI
    fails fast and an agent started just before its server still gets in.
    """
    urls = split_nats_urls(url or config.resolved_nats_url())
    opts: dict[str, Any] = {
        "servers": urls,
        "name": name,
        "connect_timeout": config.connect_timeout_s,
        # nats-py counts attempts per server and waits between rounds
        "max_reconnect_attempts": max(1, int(retry_for_s / RECONNECT_WAIT_S / len(urls))),
        "reconnect_time_wait": RECONNECT_WAIT_S,
        "allow_reconnect": True,
        "ping_interval": PING_INTERVAL_S,
        "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
    }
    if config.nats_creds:
        opts["user_credentials"] = str(Path(config.nats_creds).expanduser())
    if config.nats_user:
        from stratosd.auth import inbox_prefix

        opts["user"] = config.nats_user
        opts["password"] = config.nats_password() or ""
        # a private reply prefix: other identities may not subscribe to our replies
        opts["inbox_prefix"] = inbox_prefix(config.nats_user)
    if config.nats_tls_ca:
        import ssl

        ctx = ssl.create_default_context(cafile=config.nats_tls_ca)
        opts["tls"] = ctx

    errors: list[str] = []
    client: list[Client] = []

    def server() -> str:  # host:port only: a URL may carry user:password
        where = client[0].connected_url if client else None
        return f"{where.hostname}:{where.port}" if where else "?"

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc) or type(exc).__name__)
        log.info("nats_error", error=errors[-1])

    async def on_disconnect() -> None:
        log.info("nats_disconnected", servers=len(urls))

    async def on_reconnect() -> None:
        log.info("nats_reconnected", server=server())

    try:
        nc = await nats.connect(
            error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
            **opts,
        )
        nc.options["max_reconnect_attempts"] = -1  # once in, never give up
    except Exception as exc:  # noqa: BLE001 - nats raises many kinds; all mean "unreachable"
        cause = errors[-1] if errors else str(exc) or type(exc).__name__
        if "authorization" in cause.lower():
            hint = "check STRATOS_NATS_USER and the password file (stratosctl auth init)"
        else:
            hint = ("start stratosd (it embeds a server), or pass --nats URL[,URL...] / set "
                    "STRATOS_NATS_URL")
        raise BusUnavailable(f"cannot connect to NATS at {_redact(urls)}: {cause}",
                             hint=hint) from None
    client.append(nc)
    log.info("nats_connected", server=server(), servers=len(urls),
             cluster=nc._server_info.get("cluster"), cluster_nodes=cluster_size(nc))
    return nc


def _redact(urls: list[str]) -> str:
    """The URLs without user:password (a URL may carry them; logs and errors must not)."""
    out = []
    for url in urls:
        if "@" in url:
            parts = urlsplit(url if "://" in url else f"nats://{url}")
            url = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()
        out.append(url)
    return ",".join(out)


def cluster_size(nc: Client) -> int:
    """How many servers the connected server's cluster has; 1 when it is not clustered.

    JetStream's account info does not tell, and `$SYS` is not for ordinary users; the
    server's INFO does: `cluster` names its cluster and `connect_urls` lists the client URLs of
    every member it has a route to, its own included. Servers with `no_advertise` omit the
    list: then the URLs this client was given count.
    """
    info: dict[str, Any] = nc._server_info  # nats-py keeps the INFO it connected with here
    if not info.get("cluster"):
        return 1
    members = {str(u) for u in info.get("connect_urls") or []}
    if members:
        return len(members)
    return max(1, len({(s.hostname, s.port) for s in nc.servers}))


class Bus:
    """A connected client plus the JetStream objects Stratos uses."""

    def __init__(self, nc: Client, config: StratosConfig | None = None) -> None:
        from stratosd.artifacts.transfer import Artifacts

        self.nc = nc
        self.config = config
        self.js: JetStreamContext = nc.jetstream()
        # JetStream replicas of what ensure_streams creates (decided there; 1 until then)
        self.replicas = 1
        self._forced = False
        self._kv: dict[str, Any] = {}
        self._obs: Any = None
        self._bus_store: Any = None
        # config.artifact_store: large artifacts go there, the bus keeps a reference
        self.artifacts = Artifacts(
            self._artifact_bus_store,
            store_uri=config.artifact_store if config else None,
            min_bytes=config.artifact_store_min_bytes if config else 0)

    # --- setup ---------------------------------------------------------------------------

    async def ensure_streams(self, replicas: int | None = None, wait_s: float = 60.0) -> None:
        """Create or update the streams, KV buckets and object store (daemon only).

        New ones get `replicas` (else config.replicas, else min(3, cluster size)); existing
        ones keep theirs unless replicas are forced. A cluster still electing its JetStream
        leader answers "temporarily unavailable": that is retried for up to wait_s.
        """
        if replicas is None and isinstance(self.config, DaemonConfig):
            replicas = self.config.replicas
        nodes = cluster_size(self.nc)
        self._forced = replicas is not None
        self.replicas = replicas if replicas is not None else min(3, nodes)
        log.info("jetstream_replicas", replicas=self.replicas, cluster_nodes=nodes,
                 cluster=self.nc._server_info.get("cluster"),
                 source="forced" if self._forced else "cluster size")
        unavailable = (ServiceUnavailableError, nats.errors.TimeoutError,
                       nats.errors.NoRespondersError)
        try:
            await through_failover(
                self._create_all, within_s=wait_s, delay_s=1.0, errors=unavailable,
                on_retry=lambda exc: log.info("jetstream_unavailable",
                                              error=str(exc) or type(exc).__name__))
        except unavailable as exc:
            raise BusUnavailable(
                f"JetStream did not become available within {wait_s:.0f}s: {exc}",
                hint="check that JetStream is enabled and that a majority of the "
                "cluster's servers are up and routed to each other") from None

    async def _create_all(self) -> None:
        streams = [
            js_api.StreamConfig(
                name=subjects.EVENTS_STREAM, subjects=subjects.EVENTS_SUBJECTS,
                storage=js_api.StorageType.FILE, duplicate_window=120.0,
                max_age=30 * 24 * 3600.0,
            ),
            js_api.StreamConfig(
                name=subjects.TELEMETRY_STREAM, subjects=subjects.TELEMETRY_SUBJECTS,
                storage=js_api.StorageType.FILE, max_age=subjects.TELEMETRY_MAX_AGE_S,
                max_msgs_per_subject=1000,
            ),
        ]
        for cfg in streams:
            await self._with_replicas(cfg.name or "", functools.partial(self._add_stream, cfg))
        for bucket in (subjects.RUNS_BUCKET, subjects.AGENTS_BUCKET, subjects.ENDPOINTS_BUCKET,
                       subjects.COSTMODEL_BUCKET):
            await self.ensure_kv(bucket)
        self._obs = await self._with_replicas(
            OBJ_STREAM_TEMPLATE.format(bucket=subjects.ARTIFACTS_BUCKET),
            lambda r: self.js.create_object_store(
                bucket=subjects.ARTIFACTS_BUCKET,
                config=js_api.ObjectStoreConfig(storage=js_api.StorageType.FILE, replicas=r)))

    async def ensure_kv(self, bucket: str, history: int = 5) -> Any:
        """Create (or bind) a KV bucket with the bus's replicas; call after ensure_streams."""
        self._kv[bucket] = await self._with_replicas(
            KV_STREAM_TEMPLATE.format(bucket=bucket),
            lambda r: self.js.create_key_value(bucket=bucket, history=history,
                                               storage=js_api.StorageType.FILE, replicas=r))
        return self._kv[bucket]

    async def _add_stream(self, cfg: js_api.StreamConfig, replicas: int) -> None:
        cfg.num_replicas = replicas
        try:
            await self.js.add_stream(cfg)
        except BadRequestError as exc:
            if exc.err_code in _PLACEMENT_ERRORS:
                raise
            await self.js.update_stream(cfg)

    async def _with_replicas(self, stream: str, create: Callable[[int], Awaitable[Any]]) -> Any:
        """create(n) with the replicas for stream: kept, scaled (forced) or fewer (no peers)."""
        try:
            existing: js_api.StreamConfig | None = (await self.js.stream_info(stream)).config
        except NotFoundError:
            existing = None
        want = self.replicas
        if existing is not None and (existing.num_replicas or 1) != want:
            if self._forced:  # scale it: the server moves the data
                existing.num_replicas = want
                await self._placed(stream, want, self.js.update_stream(existing))
                log.info("stream_replicas_changed", stream=stream, replicas=want)
            else:
                want = existing.num_replicas or 1
                log.info("stream_replicas_kept", stream=stream, replicas=want,
                         cluster_replicas=self.replicas,
                         hint="restart stratosd with --replicas N to change it")
        if existing is not None or self._forced or want == 1:
            return await self._placed(stream, want, create(want))
        while True:  # auto: the cluster may have fewer JetStream servers than members
            try:
                return await create(want)
            except APIError as exc:
                if exc.err_code not in _PLACEMENT_ERRORS or want == 1:
                    raise
                log.warning("stream_replicas_reduced", stream=stream, replicas=want - 1,
                            wanted=want, error=exc.description)
                want -= 1

    async def _placed(self, stream: str, replicas: int, aw: Awaitable[Any]) -> Any:
        try:
            return await aw
        except APIError as exc:
            if exc.err_code not in _PLACEMENT_ERRORS:
                raise
            raise ConfigError(
                f"JetStream cannot keep {stream} with {replicas} replicas: {exc.description}",
                hint=f"the cluster has {cluster_size(self.nc)} server(s): lower --replicas "
                "(STRATOS_REPLICAS) or add JetStream servers", field="replicas") from None

    async def kv(self, bucket: str) -> Any:
        """A KV bucket handle (bound lazily for agents and the CLI)."""
        if bucket not in self._kv:
            self._kv[bucket] = await self.js.key_value(bucket)
        return self._kv[bucket]

    async def objects(self) -> Any:
        """The artifacts object store."""
        if self._obs is None:
            self._obs = await self.js.object_store(subjects.ARTIFACTS_BUCKET)
        return self._obs

    # --- messages ------------------------------------------------------------------------

    async def publish_event(self, subject: str, event: Message) -> None:
        """Publish an event into JetStream, deduplicated by its message id.

        While a cluster elects a new leader for the stream (a member died: up to ~10 s) the
        publish gets no ack; it is sent again, the same id, for up to PUBLISH_RETRY_S.
        """
        data, headers = encode(event), {"Nats-Msg-Id": event.id}
        await through_failover(
            lambda: self.js.publish(subject, data, headers=headers), within_s=PUBLISH_RETRY_S,
            on_retry=lambda exc: log.info("event_publish_retried", subject=subject,
                                          error=str(exc) or type(exc).__name__))

    async def publish(self, subject: str, message: Message) -> None:
        """Core publish (telemetry: the stream captures it, no ack round trip)."""
        await self.nc.publish(subject, encode(message))

    async def request(self, subject: str, message: Message, timeout: float = 5.0) -> Any:
        """Request/reply; an ErrorReply becomes RemoteError, no responder becomes NotFound."""
        try:
            msg = await self.nc.request(subject, encode(message), timeout=timeout)
        except nats.errors.NoRespondersError:
            raise NotFound(f"nobody serves {subject}",
                           hint="is the daemon/agent running and connected?") from None
        except nats.errors.TimeoutError:
            raise BusUnavailable(f"no reply on {subject} within {timeout:.0f}s",
                                 hint="the service may be overloaded or down") from None
        except nats.errors.MaxPayloadError:
            raise BadMessage("$", f"message larger than the server's max_payload "
                                  f"({self.nc.max_payload} bytes)") from None
        reply = decode_or_error(REPLY_DECODER, msg.data)
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message, reply.hint, reply.field)
        return reply

    # --- artifacts -----------------------------------------------------------------------

    async def _artifact_bus_store(self) -> Any:
        if self._bus_store is None:
            from stratosd.artifacts.busstore import BusStore

            self._bus_store = BusStore(self.js, await self.objects(), subjects.ARTIFACTS_BUCKET)
        return self._bus_store

    async def put_artifact(self, key: str, path: Path) -> str:
        """Upload a file of any size under key (chunked, resumable; see stratosd.artifacts)."""
        return await self.artifacts.put(key, path)

    async def get_artifact(self, key: str, dest: Path) -> Path:
        """Download key into dest, streaming; its sha256 is verified (ArtifactCorrupt)."""
        return await self.artifacts.get(key, dest)

    async def has_artifact(self, key: str) -> bool:
        """True when the object store holds key (the artifact or a reference to it)."""
        return await self.artifacts.exists(key)

    async def delete_artifact(self, key: str) -> None:
        """Delete key with its chunks, wherever they are stored."""
        await self.artifacts.delete(key)

    async def close(self) -> None:
        """Drain (flush pending, unsubscribe) and close."""
        if self.nc.is_connected:
            try:
                await self.nc.drain()
            except Exception:  # noqa: BLE001 - shutdown path
                log.debug("drain_failed", exc_info=True)


Handler = Callable[[Any], Awaitable[Message]]


def error_reply(exc: BaseException, source: str) -> ErrorReply:
    """Map an exception to the ErrorReply a client sees."""
    if isinstance(exc, RemoteError):
        return ErrorReply(code=exc.remote_code, message=exc.message, hint=exc.hint,
                          field=exc.field, source=source)
    if isinstance(exc, StratosError):
        return ErrorReply(code=exc.code, message=exc.message, hint=exc.hint, field=exc.field,
                          source=source)
    return ErrorReply(code="internal", message=f"internal error: {type(exc).__name__}",
                      hint="see the server's log", source=source)


def micro_handler(
    decoder: msgspec.json.Decoder[Any], handle: Handler, *, source: str
) -> Callable[[Request], Awaitable[None]]:
    """Wrap a typed handler: decode at the edge, map errors to ErrorReply, log one line."""

    async def endpoint(req: Request) -> None:
        start = time.perf_counter()
        outcome = "ok"
        with structlog.contextvars.bound_contextvars(subject=req.subject):
            try:
                try:
                    cmd = decode_or_error(decoder, req.data)
                except BadMessage as exc:
                    if "Invalid value" in exc.reason and exc.field == "type":
                        raise _unsupported(req.data) from None
                    raise
                reply: Message = await handle(cmd)
            except StratosError as exc:
                outcome = exc.code
                reply = error_reply(exc, source)
            except Exception as exc:  # noqa: BLE001 - handler boundary
                outcome = "internal"
                log.error("handler_failed", exc_info=True)
                reply = error_reply(exc, source)
            await req.respond(encode(reply))
            log.debug("message_handled", outcome=outcome,
                      duration_ms=round((time.perf_counter() - start) * 1000, 2))

    return endpoint


def _unsupported(data: bytes) -> StratosError:
    from stratosd.errors import Unsupported

    try:
        kind = msgspec.json.decode(data).get("type", "?")
    except Exception:  # noqa: BLE001
        kind = "?"
    return Unsupported(f"unsupported command type {kind!r}",
                       hint="upgrade the sender or use a command this side knows")
