"""Private artifacts: each agent reads and writes only its own object store bucket.

On a bus with users (every identity `stratosctl auth init` writes), agent X's NATS user may
touch only the bucket `agent_bucket(X)`; the shared `stratos_artifacts` bucket is the daemon's.
The daemon, which may read every bucket, moves what a job needs:

- `place` (before a job is sent): the bucket exists; each input found in the shared bucket is
  copied into the agent's bucket unless the same content is there already. An input that only
  the agent's bucket holds (its own checkpoint) is left alone.
- `collect` (once the job has an outcome): what the job wrote into the agent's bucket (its
  output artifacts, and objects of the run that appeared or changed since `place`, such as
  checkpoints) is copied into the shared bucket, where the stages, resume and export find it.

Keys stay what they were (`run_id/name`): only the bucket differs. Copies go through a
temporary file on the daemon's host; an artifact kept in an external store (file://, s3://)
has only its reference copied. See docs/security.md, "Private artifacts".
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from schemas import subjects
from schemas.artifacts import ArtifactIndex, ArtifactManifest, ArtifactRef
from schemas.commands import RunStep
from stratosd.artifacts.busstore import BusStore, agent_bucket
from stratosd.artifacts.transfer import Artifacts
from stratosd.config import StratosConfig
from stratosd.errors import NotFound

log = structlog.stdlib.get_logger(__name__)
Fingerprint = tuple[str, ...]


def enabled(config: StratosConfig | None) -> bool:
    """Private artifacts are on whenever the client logs in with a user name (a secured bus,
    where agents are not allowed the shared bucket)."""
    return config is not None and bool(config.nats_user)


async def open_bucket(bus: Any, bucket: str, *, create: bool = False) -> BusStore:
    """A BusStore on bucket; create it (the daemon, with the bus's replicas) when missing."""
    try:
        obs = await bus.js.object_store(bucket)
    except NotFoundError:
        if not create:
            raise NotFound(
                f"the artifact bucket {bucket!r} does not exist yet",
                hint="the daemon creates an agent's bucket before sending it its first job; "
                "on a secured bus both daemon and agents must log in with a user "
                "(docs/security.md, private artifacts)") from None
        obs = await bus.js.create_object_store(
            bucket=bucket, config=js_api.ObjectStoreConfig(
                storage=js_api.StorageType.FILE, replicas=max(1, int(bus.replicas))))
        log.info("agent_bucket_created", bucket=bucket, replicas=bus.replicas)
    return BusStore(bus.js, obs, bucket)


class Bucket:
    """One object store bucket: its BusStore (bound or created on first use) and Artifacts."""

    def __init__(self, bus: Any, name: str, *, create: bool = False) -> None:
        self.bus = bus
        self.name = name
        self.create = create
        self._store: BusStore | None = None
        cfg = bus.config
        self.artifacts = Artifacts(self.store, store_uri=cfg.artifact_store if cfg else None,
                                   min_bytes=cfg.artifact_store_min_bytes if cfg else 0)

    async def store(self) -> BusStore:
        """The bucket's BusStore."""
        if self._store is None:
            self._store = await open_bucket(self.bus, self.name, create=self.create)
        return self._store


def agent_artifacts(bus: Any, agent_id: str) -> Artifacts:
    """The agent's own view: its bucket only (the daemon creates it before the first job)."""
    return Bucket(bus, agent_bucket(agent_id)).artifacts


def fingerprint(info: Any, index: ArtifactIndex | None) -> Fingerprint:
    """What identifies an object's content: its digest, or its index's sha256 and store."""
    if isinstance(index, ArtifactRef):
        return ("ref", index.store, index.key, index.sha256)
    if isinstance(index, ArtifactManifest):
        return ("manifest", index.sha256)
    return ("plain", str(info.size), str(info.digest or "").lower())


class AgentBuckets:
    """The daemon's side: create agents' buckets, place job inputs, collect job outputs."""

    def __init__(self, bus: Any, tmp_dir: Path | None = None) -> None:
        self.bus = bus
        self.tmp_dir = tmp_dir
        self.shared = Bucket(bus, subjects.ARTIFACTS_BUCKET)
        self.shared.artifacts = bus.artifacts  # the daemon's own settings
        self._agents: dict[str, Bucket] = {}
        # job_id → (agent, run prefix, fingerprints of the run's objects when it was sent)
        self._sent: dict[str, tuple[str, str, dict[str, Fingerprint]]] = {}

    def of(self, agent_id: str) -> Bucket:
        """agent_id's bucket (created on first use)."""
        if agent_id not in self._agents:
            self._agents[agent_id] = Bucket(self.bus, agent_bucket(agent_id), create=True)
        return self._agents[agent_id]

    async def place(self, agent_id: str, step: RunStep) -> None:
        """Make step's inputs readable by agent_id: copy them from the shared bucket."""
        dst = self.of(agent_id)
        await dst.store()  # the bucket exists before the agent's first upload
        for key in step.inputs.values():
            if await self._copy(self.shared, dst, key):
                log.info("artifact_placed", key=key, agent_id=agent_id, job_id=step.job_id)
        prefix = f"{step.run_id or 'adhoc'}/"
        self._sent[step.job_id] = (agent_id, prefix, await self._snapshot(dst, prefix))
        while len(self._sent) > 4096:  # a job sent and never waited for
            self._sent.pop(next(iter(self._sent)))

    async def collect(self, agent_id: str, job_id: str, outputs: Iterable[str]) -> None:
        """Copy what job_id wrote into agent_id's bucket into the shared bucket."""
        src = self.of(agent_id)
        keys = set(outputs)
        sent = self._sent.pop(job_id, None)
        if sent is not None and sent[0] == agent_id:
            _agent, prefix, before = sent
            now = await self._snapshot(src, prefix)
            keys |= {k for k, fp in now.items() if before.get(k) != fp}
        for key in sorted(keys):
            if await self._copy(src, self.shared, key):
                log.info("artifact_collected", key=key, agent_id=agent_id, job_id=job_id)

    async def _snapshot(self, bucket: Bucket, prefix: str) -> dict[str, Fingerprint]:
        store = await bucket.store()
        try:
            infos = await store.obs.list(ignore_deletes=True)
        except NotFoundError:  # an empty bucket
            return {}
        out: dict[str, Fingerprint] = {}
        for info in infos:
            name = str(info.name)
            if name.startswith(prefix) and ".chunks/" not in name:
                found = await store.lookup(name)
                if found is not None:
                    out[name] = fingerprint(*found)
        return out

    async def _copy(self, src: Bucket, dst: Bucket, key: str) -> bool:
        """Copy key from src to dst unless dst holds the same; False when nothing was copied
        (absent from src, or already there)."""
        src_store, dst_store = await src.store(), await dst.store()
        found = await src_store.lookup(key)
        if found is None:
            return False
        have = await dst_store.lookup(key)
        if have is not None and fingerprint(*have) == fingerprint(*found):
            return False
        if isinstance(found[1], ArtifactRef):  # the external store holds the bytes
            await dst_store.put_index(key, found[1])
            return True
        if self.tmp_dir is not None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.tmp_dir, prefix="artifact-copy-") as tmp:
            path = await src.artifacts.get(key, Path(tmp) / "blob")
            await dst.artifacts.put(key, path)
        return True
