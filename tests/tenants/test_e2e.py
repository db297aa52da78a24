"""A tenants job end to end: a real daemon, two real agents, two tenants, tiny students.

Everything published on the bus (core subjects, JetStream events, object-store chunks) is
captured; the tenants' data files carry canaries that must never appear in any of it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest

from bench.tenant_data import DESIGN, write_tenant_file
from schemas import subjects
from schemas.base import encode
from schemas.tenants import (
    TENANT_REPLY_DECODER,
    AggregationSpec,
    GetTenantJob,
    StudentChoice,
    SubmitTenantJob,
    TenantJob,
    TenantJobState,
    TenantSpec,
)
from tests.conftest import start_agent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def _ask(nc: Any, msg: Any) -> Any:
    raw = await nc.request(subjects.daemon_cmd("tenants"), encode(msg), timeout=10)
    return TENANT_REPLY_DECODER.decode(raw.data)


async def _wait_done(nc: Any, job_id: str, timeout: float = 150) -> TenantJobState:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job = (await _ask(nc, GetTenantJob(job_id=job_id))).job
        if job.state in ("completed", "failed"):
            return job
        assert asyncio.get_running_loop().time() < deadline, f"stuck at {job.stage}"
        await asyncio.sleep(0.5)


def _job(files: dict[str, Path], rule: str = "lora-product-average") -> TenantJob:
    return TenantJob(
        name="e2e",
        tenants=[TenantSpec(name=n, agents=[f"host-{n}"], data_path=str(p), test_fraction=0.2)
                 for n, p in files.items()],
        students=StudentChoice(candidates=["config:tiny"], fit_steps=0, probe_size=4),
        aggregation=AggregationSpec(rule=rule, rounds=1, local_steps=3, lora_r=4, keep_ranks=2),
        eval_limit=4)


async def test_two_tenants_on_two_agents_data_never_leaves(nats_url: str, tmp_path: Path,
                                                           daemon: Any) -> None:
    canaries = {n: f"canary{n}zq" for n in ("t1", "t4")}
    files = {n: write_tenant_file(tmp_path / "private" / n / "data.jsonl", DESIGN[n], 40, 0,
                                  canary=canaries[n]) for n in canaries}
    seen: list[bytes] = []
    spy = await nats.connect(nats_url)

    async def capture(msg: Any) -> None:
        seen.append(msg.subject.encode() + b" " + msg.data)

    await spy.subscribe(">", cb=capture)
    agents = [await start_agent(nats_url, tmp_path, f"host-{n}") for n in files]
    try:
        job = _job(files)
        reply = await _ask(spy, SubmitTenantJob(spec=job, job_id="job-e2e"))
        assert reply.job.job_id == "job-e2e"
        done = await _wait_done(spy, "job-e2e")
        assert done.state == "completed", done.error
        for name, r in done.results.items():
            assert r.state == "ok", r.error
            assert r.agent == f"host-{name}"
            assert r.student == "config:tiny"
            assert r.accuracy_aggregated is not None and r.accuracy_alone is not None
            assert r.bytes.raw_data == files[name].stat().st_size
            assert r.bytes.updates > 0 and r.bytes.mixes > 0 and r.bytes.signature > 0
            assert r.rounds_done == 1
            assert abs(sum(r.weights.values()) - 1) < 1e-6
        assert done.similarity["t1"]["t1"] == 1.0
        assert Path(done.report_paths["markdown"]).read_text().count("## Tenant") == 2
        await spy.flush()
        # the bus: nothing any process published carries a tenant's rows
        assert seen, "the spy saw nothing"
        for canary in canaries.values():
            assert not any(canary.encode() in m for m in seen), f"{canary} crossed the bus"
        # the object store: every stored artifact, read back whole
        obs = await spy.jetstream().object_store(subjects.ARTIFACTS_BUCKET)
        infos = await obs.list()
        assert any(i.name.startswith("job-e2e/") for i in infos)
        for info in infos:
            data = (await obs.get(info.name)).data or b""
            for canary in canaries.values():
                assert canary.encode() not in data, f"{canary} in artifact {info.name}"
        # the same question text stays on its agent too: the daemon's home holds no row
        for path in (tmp_path / "home").rglob("*"):
            if path.is_file():
                blob = path.read_bytes()
                assert not any(c.encode() in blob for c in canaries.values()), path
    finally:
        for a, task in agents:
            a.stop()
            await asyncio.wait_for(task, 30)
        await spy.close()
