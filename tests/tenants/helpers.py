"""What the tenants end-to-end tests share: requests to the daemon, waiting for a job, its events
(read back from JetStream), a small job, and `stratosctl` as a real process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
from nats.js import api as js_api

from schemas import subjects
from schemas.base import encode
from schemas.tenants import (
    TENANT_EVENT_DECODER,
    TENANT_REPLY_DECODER,
    AggregationSpec,
    DeploySpec,
    GetTenantJob,
    StudentChoice,
    TenantJob,
    TenantJobState,
    TenantLimits,
    TenantSpec,
)

ROOT = Path(__file__).resolve().parents[2]


async def ask(nc: Any, msg: Any) -> Any:
    """One tenants request to the daemon."""
    raw = await nc.request(subjects.daemon_cmd("tenants"), encode(msg), timeout=10)
    return TENANT_REPLY_DECODER.decode(raw.data)


async def wait_done(nc: Any, job_id: str, timeout: float = 300) -> TenantJobState:
    """The job once it completed or failed."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job: TenantJobState = (await ask(nc, GetTenantJob(job_id=job_id))).job
        if job.state in ("completed", "failed"):
            return job
        assert asyncio.get_running_loop().time() < deadline, f"stuck at {job.stage}"
        await asyncio.sleep(0.5)


class Events:
    """A job's tenant events as they arrive (an ordered consumer of STRATOS_EVENTS)."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self._changed = asyncio.Event()
        self._sub: Any = None

    async def start(self, nc: Any, job_id: str) -> Events:
        """Replay and follow the job's events."""
        async def cb(msg: Any) -> None:
            self.seen.append(TENANT_EVENT_DECODER.decode(msg.data))
            self._changed.set()

        self._sub = await nc.jetstream().subscribe(
            subjects.tenant_events(job_id), cb=cb, ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.ALL, stream=subjects.EVENTS_STREAM)
        return self

    async def wait_for(self, kind: type, timeout: float = 300, **match: Any) -> Any:
        """The first event of kind whose fields equal match."""
        async def loop() -> Any:
            while True:
                for ev in self.seen:
                    if isinstance(ev, kind) and all(getattr(ev, k) == v
                                                    for k, v in match.items()):
                        return ev
                self._changed.clear()
                await self._changed.wait()
        return await asyncio.wait_for(loop(), timeout)

    def types(self) -> list[str]:
        """The tags seen, in order."""
        return [type(e).__struct_config__.tag for e in self.seen]

    async def stop(self) -> None:
        """Unsubscribe."""
        if self._sub is not None:
            await self._sub.unsubscribe()


def small_job(files: dict[str, Path], agents: dict[str, str] | None = None, *, rounds: int = 1,
              steps: int = 3, alone: bool = True, limits: dict[str, TenantLimits] | None = None,
              rule: str = "lora-product-average", deploy: DeploySpec | None = None
              ) -> TenantJob:
    """A job of config:tiny tenants, each on `host-<name>` (or agents[name])."""
    agents = agents or {}
    limits = limits or {}
    return TenantJob(
        name="e2e",
        tenants=[TenantSpec(name=n, agents=[agents.get(n, f"host-{n}")], data_path=str(p),
                            test_fraction=0.2, limits=limits.get(n, TenantLimits()))
                 for n, p in files.items()],
        students=StudentChoice(candidates=["config:tiny"], fit_steps=0, probe_size=4),
        aggregation=AggregationSpec(rule=rule, rounds=rounds, local_steps=steps, lora_r=4,
                                    keep_ranks=2),
        alone_baseline=alone, eval_limit=4, deploy=deploy or DeploySpec())


def ctl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`stratosctl --nats url ARGS` as a real process."""
    return subprocess.run([sys.executable, "-m", "stratosd.ctl", "--nats", url, *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)


def to_dict(obj: Any) -> Any:
    """A struct as plain data (for readable assertion messages)."""
    return msgspec.to_builtins(obj)


async def stop_agents(agents: list[tuple[Any, Any]], nc: Any) -> None:
    """Stop the test's agents (each waited for) and close its bus connection."""
    import asyncio

    for a, task in agents:
        a.stop()
        await asyncio.wait_for(task, 30)
    await nc.close()
