"""The agent's outbox: job events that must reach the daemon, kept on disk until JetStream acks.

A terminal event (`job_completed`, `job_failed`, ...) is appended to a journal and fsynced
before anything tries to publish it; a background task publishes the journal in order and
retries, with backoff, until JetStream acknowledges each entry. An agent that dies or restarts
with entries pending publishes them when it starts again. Publishing twice is harmless: each
event carries its id as `Nats-Msg-Id` (the stream deduplicates) and the daemon applies an
outcome idempotently.

The journal is one JSON record per line: `add` (subject, event tag, the event as sent) or
`ack` (the id). Acks are not fsynced: losing one only repeats a publish.

`STRATOS_FAULT_JOB_EVENTS` (tests and drills only) injects faults at this publish path:
comma-separated `MODE:TAG[:COUNT]` where MODE is `fail` (the publish raises, the outbox
retries) or `lose` (the event is dropped as if JetStream had acked it, for the daemon's
reconciliation to find), TAG an event tag such as `job_completed`, COUNT how many publishes of
that tag it hits (default 1).

`STRATOS_OUTBOX_AUDIT` (benchmarks only, e.g. bench/bench_chaos.py) names a file to which every
`put` and every JetStream ack is appended as one JSON line (`{"op": "put"|"acked", "id", ...}`),
so that what agents published can be compared with what the stream holds; unset, nothing is
written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal

import msgspec
import nats.errors
import structlog

from schemas.base import Message, encode
from stratosd.errors import BusUnavailable, ConfigError

log = structlog.stdlib.get_logger(__name__)

FAULTS_ENV = "STRATOS_FAULT_JOB_EVENTS"
AUDIT_ENV = "STRATOS_OUTBOX_AUDIT"
FaultMode = Literal["fail", "lose"]
Publish = Callable[[str, bytes, str], Coroutine[Any, Any, None]]


class _Record(msgspec.Struct, omit_defaults=True):
    """One journal line (a local file format, not a wire message)."""

    op: Literal["add", "ack"]
    id: str
    subject: str = ""
    kind: str = ""
    data: msgspec.Raw = msgspec.Raw(b"null")


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(_Record)
_AUDIT_ENCODER = msgspec.json.Encoder()


class Faults:
    """Injected publish faults by event tag (see the module docstring); empty in production."""

    def __init__(self, spec: str = "") -> None:
        self.left: dict[str, list[tuple[FaultMode, int]]] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            mode, _, rest = item.partition(":")
            tag, _, count = rest.partition(":")
            if mode not in ("fail", "lose") or not tag or not (count or "1").isdigit():
                raise ConfigError(f"bad {FAULTS_ENV} entry {item!r}",
                                  hint="use MODE:TAG[:COUNT], MODE fail or lose, "
                                  "e.g. fail:job_completed:1", field=FAULTS_ENV)
            self.left.setdefault(tag, []).append((mode, int(count or 1)))  # type: ignore[arg-type]

    @classmethod
    def from_env(cls) -> Faults:
        """The faults named in $STRATOS_FAULT_JOB_EVENTS."""
        return cls(os.environ.get(FAULTS_ENV, ""))

    def take(self, kind: str) -> FaultMode | None:
        """The fault for this publish of an event tagged kind, if one is left."""
        queue = self.left.get(kind)
        if not queue:
            return None
        mode, count = queue[0]
        if count <= 1:
            queue.pop(0)
        else:
            queue[0] = (mode, count - 1)
        return mode


class Outbox:
    """Job events on disk until JetStream acknowledges them, published in order."""

    def __init__(self, path: Path, publish: Publish, *, faults: Faults | None = None,
                 retry_max_s: float = 5.0) -> None:
        self.path = path
        self.publish = publish  # (subject, payload, msg_id); raises unless JetStream acked
        self.faults = faults or Faults()
        self.retry_max_s = retry_max_s
        self.pending: dict[str, _Record] = {}  # id → record, oldest first
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        audit = os.environ.get(AUDIT_ENV, "")
        self.audit = Path(audit) if audit else None  # see the module docstring
        self._load()

    def _load(self) -> None:
        """Read the journal; rewrite it with only the pending entries (drops a torn tail)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                rec = _DECODER.decode(line)
            except msgspec.DecodeError:
                log.warning("outbox_line_skipped", path=str(self.path), size=len(line))
                continue
            if rec.op == "add":
                self.pending[rec.id] = rec
            else:
                self.pending.pop(rec.id, None)
        self._rewrite()
        if self.pending:
            log.info("outbox_pending", events=len(self.pending), path=str(self.path))

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            for rec in self.pending.values():
                fh.write(_ENCODER.encode(rec) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def _append(self, rec: _Record, *, sync: bool) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, _ENCODER.encode(rec) + b"\n")
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    async def put(self, subject: str, event: Message) -> None:
        """Store the event durably (append + fsync), then hand it to the publisher."""
        kind = str(type(event).__struct_config__.tag)
        rec = _Record(op="add", id=event.id, subject=subject, kind=kind,
                      data=msgspec.Raw(encode(event)))
        async with self._lock:
            await asyncio.to_thread(self._append, rec, sync=True)
            self.pending[rec.id] = rec
            self._drained.clear()
        self._audit("put", rec.id, subject=subject, kind=kind)
        self._wake.set()

    def start(self) -> None:
        """Start publishing (pending entries from an earlier life go first)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="agent-outbox")
        self._wake.set()

    async def _run(self) -> None:
        delay = 0.2
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                rec = next(iter(self.pending.values()))
                try:
                    await self._deliver(rec)
                except nats.errors.MaxPayloadError:
                    log.error("job_event_dropped", event_id=rec.id, subject=rec.subject,
                              reason="larger than the server's max_payload")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every failure means "try again"
                    log.warning("job_event_publish_retry", event_id=rec.id, subject=rec.subject,
                                kind=rec.kind, retry_in_s=delay, error=str(exc) or repr(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2.0, self.retry_max_s)
                    continue
                delay = 0.2
                await self._ack(rec)
            self._drained.set()

    async def _deliver(self, rec: _Record) -> None:
        fault = self.faults.take(rec.kind)
        if fault == "lose":
            log.warning("job_event_fault_injected", mode="lose", event_id=rec.id,
                        subject=rec.subject, kind=rec.kind)
            return
        if fault == "fail":
            log.warning("job_event_fault_injected", mode="fail", event_id=rec.id,
                        subject=rec.subject, kind=rec.kind)
            raise BusUnavailable(f"injected fault: publish of {rec.kind} failed")
        await self.publish(rec.subject, bytes(rec.data), rec.id)

    async def _ack(self, rec: _Record) -> None:
        async with self._lock:
            self.pending.pop(rec.id, None)
            try:
                if self.pending:
                    await asyncio.to_thread(self._append, _Record(op="ack", id=rec.id),
                                            sync=False)
                else:  # everything is out: start the journal afresh
                    await asyncio.to_thread(os.truncate, self.path, 0)
            except OSError:
                log.warning("outbox_ack_not_written", event_id=rec.id, exc_info=True)
        self._audit("acked", rec.id)
        log.debug("job_event_published", event_id=rec.id, subject=rec.subject)

    def _audit(self, op: str, event_id: str, **fields: str) -> None:
        """One line in the audit file, when $STRATOS_OUTBOX_AUDIT names one (never fails)."""
        if self.audit is None:
            return
        line = _AUDIT_ENCODER.encode({"op": op, "id": event_id, **fields}) + b"\n"
        try:
            fd = os.open(self.audit, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)  # one write per line: whole lines even when killed
            finally:
                os.close(fd)
        except OSError:
            log.warning("outbox_audit_not_written", path=str(self.audit), exc_info=True)

    async def drain(self, timeout: float) -> bool:
        """Wait until every entry is published (True) or timeout passes (False)."""
        if not self.pending:
            return True
        self._wake.set()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return not self.pending
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Publish what can be published within timeout; the rest waits on disk."""
        if self._task is None:
            return
        if not await self.drain(timeout):
            log.warning("outbox_left_pending", events=len(self.pending), path=str(self.path))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
