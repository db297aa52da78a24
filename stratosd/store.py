"""Run state in the JetStream KV bucket stratos_runs: the source of truth for resume."""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError

from schemas import subjects
from schemas.base import encode, utc_now
from schemas.commands import RunInfo
from stratosd.bus import Bus
from stratosd.errors import Conflict, NotFound

log = structlog.stdlib.get_logger(__name__)
RUN_DECODER = msgspec.json.Decoder(RunInfo)


class RunStore:
    """Read and write RunInfo values with optimistic concurrency (revision checks)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def _kv(self) -> Any:
        return await self.bus.kv(subjects.RUNS_BUCKET)

    async def create(self, run: RunInfo) -> RunInfo:
        """Store a new run; Conflict if the id exists."""
        kv = await self._kv()
        try:
            rev = await kv.create(run.run_id, encode(run))
        except KeyWrongLastSequenceError:
            raise Conflict(f"run {run.run_id} already exists") from None
        return msgspec.structs.replace(run, revision=rev)

    async def get(self, run_id: str) -> RunInfo:
        """The run, or NotFound."""
        kv = await self._kv()
        try:
            entry = await kv.get(run_id)
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
        try:
            rev = await kv.update(run.run_id, encode(new), last=run.revision)
        except KeyWrongLastSequenceError:
            current = await self.get(run.run_id)
            log.warning("run_write_conflict", run_id=run.run_id, expected=run.revision,
                        found=current.revision)
            raise Conflict(f"run {run.run_id} changed concurrently") from None
        return msgspec.structs.replace(new, revision=rev)

    async def list(self) -> list[RunInfo]:
        """All runs, newest first."""
        kv = await self._kv()
        try:
            keys = await kv.keys()
        except NoKeysError:
            return []
        runs = []
        for key in keys:
            try:
                runs.append(await self.get(key))
            except NotFound:
                continue
        return sorted(runs, key=lambda r: r.created, reverse=True)
