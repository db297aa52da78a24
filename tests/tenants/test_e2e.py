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
from schemas.tenants import (
    SubmitTenantJob,
    TenantJobCompleted,
    TenantJobSubmitted,
    TenantRoundCompleted,
    TenantRoundStarted,
    TenantStageStarted,
)
from tests.conftest import start_agent
from tests.tenants.helpers import Events, ask, ctl, small_job, wait_done

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


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
        job = small_job(files)
        reply = await ask(spy, SubmitTenantJob(spec=job, job_id="job-e2e"))
        assert reply.job.job_id == "job-e2e"
        events = await Events().start(spy, "job-e2e")
        done = await wait_done(spy, "job-e2e")
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
        # events: the job's story on stratos.evt.tenant.job-e2e.>, per-tenant state in each
        end = await events.wait_for(TenantJobCompleted)
        await events.stop()
        kinds = [type(e) for e in events.seen]
        assert kinds[0] is TenantJobSubmitted and kinds[-1] is TenantJobCompleted
        assert [e.stage for e in events.seen if isinstance(e, TenantStageStarted)] == [
            "agents", "signature", "select", "evaluate"]
        assert TenantRoundStarted in kinds
        rc = next(e for e in events.seen if isinstance(e, TenantRoundCompleted))
        assert rc.round == 1 and set(rc.weights) == {"t1", "t4"}
        assert all(s.rounds_done == 1 and s.student == "config:tiny" and s.bytes_sent > 0
                   for s in rc.tenants.values())
        assert end.dropped == [] and end.tenants["t1"].accuracy_aggregated is not None
        # stratosctl: the per-tenant table and the replayed watch, as real processes
        st = await asyncio.to_thread(ctl, nats_url, "tenants", "status", "job-e2e")
        assert st.returncode == 0, st.stderr
        assert "acc alone" in st.stdout and "host-t4" in st.stdout and "1/1" in st.stdout
        w = await asyncio.to_thread(ctl, nats_url, "tenants", "watch", "job-e2e",
                                    "--timeout", "30")
        assert w.returncode == 0, w.stderr
        assert "round 1/1" in w.stdout and "job completed" in w.stdout
        assert "bytes sent" in w.stdout
        # the run commands take a tenants job's id too
        rs = await asyncio.to_thread(ctl, nats_url, "status", "job-e2e")
        assert rs.returncode == 0, rs.stderr
        assert rs.stdout == st.stdout
        rw = await asyncio.to_thread(ctl, nats_url, "watch", "job-e2e", "--timeout", "30")
        assert rw.returncode == 0 and rw.stdout == w.stdout, rw.stderr
        nope = await asyncio.to_thread(ctl, nats_url, "status", "no-such-job")
        assert nope.returncode == 4 and "no run with id 'no-such-job'" in nope.stderr
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
