"""Run state in the JetStream KV bucket stratos_runs: the source of truth for resume.

While a cluster member dies and the bucket's stream elects a new leader (a few seconds), or
while the client reconnects to another server, KV calls time out or find no responders. A
run must not fail for that: every call here is retried for up to RETRY_S. A write whose ack
was lost may have landed; its retry then meets a newer revision, which is the write itself
when the stored value is what was written, and a real conflict otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats.errors
import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError

from schemas import subjects
from schemas.base import encode, utc_now
from schemas.commands import RunInfo
from stratosd.bus import FAILOVER_ERRORS, Bus, through_failover
from stratosd.errors import Conflict, NotFound

log = structlog.stdlib.get_logger(__name__)
RUN_DECODER = msgspec.json.Decoder(RunInfo)
RETRY_S = 60.0  # longer than a cluster's leader election and a client's reconnect
TRANSIENT: tuple[type[Exception], ...] = (
    *FAILOVER_ERRORS, nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError, asyncio.TimeoutError)
T = TypeVar("T")


async def retried(op: str, call: Callable[[], Awaitable[T]], retry_s: float = RETRY_S) -> T:
    """call(), again while the bus is failing over; the last error after retry_s."""
    return await through_failover(
        call, within_s=retry_s, delay_s=0.25, max_delay_s=2.0, errors=TRANSIENT,
        on_retry=lambda exc: log.info("store_retried", op=op,
                                      error=str(exc) or type(exc).__name__))


class RunStore:
    """Read and write RunInfo values with optimistic concurrency (revision checks)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def _kv(self) -> Any:
        return await self.bus.kv(subjects.RUNS_BUCKET)

    async def create(self, run: RunInfo) -> RunInfo:
        """Store a new run; Conflict if the id exists."""
        kv = await self._kv()
        data = encode(run)
        tried = False

        async def call() -> int:
            nonlocal tried
            try:
                return int(await kv.create(run.run_id, data))
            except KeyWrongLastSequenceError:
                if tried and (landed := await self._landed(run.run_id, data)) is not None:
                    return landed  # our first try landed; its ack was lost
                raise Conflict(f"run {run.run_id} already exists") from None
            finally:
                tried = True

        rev = await retried("create", call)
        return msgspec.structs.replace(run, revision=rev)

    async def _landed(self, run_id: str, data: bytes) -> int | None:
        """The stored revision when the stored value is exactly data, else None."""
        kv = await self._kv()
        try:
            entry = await retried("get", lambda: kv.get(run_id))
        except KeyNotFoundError:
            return None
        return int(entry.revision) if entry.value == data else None

    async def get(self, run_id: str) -> RunInfo:
        """The run, or NotFound."""
        kv = await self._kv()
        try:
            entry = await retried("get", lambda: kv.get(run_id))
        except KeyNotFoundError:
            raise NotFound(f"no run with id {run_id!r}",
                           hint="list runs with `stratosctl jobs`") from None
        if entry.value is None:
            raise NotFound(f"no run with id {run_id!r}")
        return msgspec.structs.replace(RUN_DECODER.decode(entry.value), revision=entry.revision)

    async def save(self, run: RunInfo, **changes: Any) -> RunInfo:
        """Write run with changes applied; the stored revision must match run.revision."""
        kv = await self._kv()
        new = msgspec.structs.replace(run, updated=utc_now(), **changes)
        data = encode(new)
        tried = False

        async def call() -> int:
            nonlocal tried
            try:
                return int(await kv.update(run.run_id, data, last=run.revision))
            except KeyWrongLastSequenceError:
                if tried and (landed := await self._landed(run.run_id, data)) is not None:
                    log.info("run_write_landed", run_id=run.run_id, revision=landed)
                    return landed  # our first try landed; its ack was lost
                current = await self.get(run.run_id)
                log.warning("run_write_conflict", run_id=run.run_id, expected=run.revision,
                            found=current.revision)
                raise Conflict(f"run {run.run_id} changed concurrently") from None
            finally:
                tried = True

        rev = await retried("save", call)
        return msgspec.structs.replace(new, revision=rev)

    async def list(self) -> list[RunInfo]:
        """All runs, newest first."""
        kv = await self._kv()
        try:
            keys = await retried("keys", kv.keys)
        except NoKeysError:
            return []
        runs = []
        for key in keys:
            try:
                runs.append(await self.get(key))
            except NotFound:
                continue
        return sorted(runs, key=lambda r: r.created, reverse=True)
