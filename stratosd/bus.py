"""The bus: connect/drain, JetStream streams/KV/object store, publish, request, micro handlers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError
from nats.micro.request import Request

from schemas import subjects
from schemas.base import Message, decode_or_error, encode
from schemas.commands import REPLY_DECODER
from schemas.errors import ErrorReply
from stratosd.config import StratosConfig
from stratosd.errors import BadMessage, BusUnavailable, NotFound, RemoteError, StratosError

log = structlog.stdlib.get_logger(__name__)


async def connect(
    config: StratosConfig, name: str, url: str | None = None, *, retry_for_s: float = 0.0
) -> Client:
    """Connect to NATS with credentials from config/env; reconnect forever once connected.

    The first connection is tried for about retry_for_s (at least once), so a CLI fails fast
    and an agent started just before its server still gets in.
    """
    url = url or config.resolved_nats_url()
    opts: dict[str, Any] = {
        "servers": [url],
        "name": name,
        "connect_timeout": config.connect_timeout_s,
        "max_reconnect_attempts": max(1, int(retry_for_s / 0.5)),
        "reconnect_time_wait": 0.5,
        "allow_reconnect": True,
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

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc) or type(exc).__name__)
        log.info("nats_error", error=errors[-1])

    async def on_disconnect() -> None:
        log.info("nats_disconnected", url=url)

    async def on_reconnect() -> None:
        log.info("nats_reconnected", url=url)

    try:
        nc = await nats.connect(
            error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
            **opts,
        )
        nc.options["max_reconnect_attempts"] = -1  # once in, never give up
        return nc
    except Exception as exc:  # noqa: BLE001 - nats raises many kinds; all mean "unreachable"
        cause = errors[-1] if errors else str(exc) or type(exc).__name__
        if "authorization" in cause.lower():
            hint = "check STRATOS_NATS_USER and the password file (stratosctl auth init)"
        else:
            hint = ("start stratosd (it embeds a server), or pass --nats URL / set "
                    "STRATOS_NATS_URL")
        raise BusUnavailable(f"cannot connect to NATS at {url}: {cause}", hint=hint) from None


class Bus:
    """A connected client plus the JetStream objects Stratos uses."""

    def __init__(self, nc: Client, config: StratosConfig | None = None) -> None:
        from stratosd.artifacts.transfer import Artifacts

        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self._kv: dict[str, Any] = {}
        self._obs: Any = None
        self._bus_store: Any = None
        # config.artifact_store: large artifacts go there, the bus keeps a reference
        self.artifacts = Artifacts(
            self._artifact_bus_store,
            store_uri=config.artifact_store if config else None,
            min_bytes=config.artifact_store_min_bytes if config else 0)

    # --- setup ---------------------------------------------------------------------------

    async def ensure_streams(self) -> None:
        """Create or update the streams, KV buckets and object store (daemon only)."""
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
            try:
                await self.js.add_stream(cfg)
            except BadRequestError:
                await self.js.update_stream(cfg)
        for bucket in (subjects.RUNS_BUCKET, subjects.AGENTS_BUCKET, subjects.ENDPOINTS_BUCKET,
                       subjects.COSTMODEL_BUCKET):
            self._kv[bucket] = await self.js.create_key_value(
                bucket=bucket, history=5, storage=js_api.StorageType.FILE
            )
        self._obs = await self.js.create_object_store(
            bucket=subjects.ARTIFACTS_BUCKET,
            config=js_api.ObjectStoreConfig(storage=js_api.StorageType.FILE),
        )

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
        """Publish an event into JetStream, deduplicated by its message id."""
        await self.js.publish(subject, encode(event), headers={"Nats-Msg-Id": event.id})

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
