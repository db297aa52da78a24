"""`[deploy] enabled = true`: after the last round one endpoint serves every tenant's tuned
weights by the tenant's name (the built-in multi-adapter server: no GPU here). Only weights
move to the serving agent, counted per tenant; tenant events reach `stratos_on_event`
plugins; `stratosctl tenants cancel` stops the endpoint like `stratosctl undeploy`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from bench.tenant_data import DESIGN, write_tenant_file
from schemas.tenants import (
    DeploySpec,
    SubmitTenantJob,
    TenantEndpointReady,
    TenantJobCancelled,
    TenantJobCompleted,
    TenantJobSubmitted,
    TenantRoundCompleted,
)
from stratosd import hookimpl
from tests.conftest import start_agent
from tests.tenants.helpers import Events, ask, ctl, small_job, stop_agents, wait_done

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


class Observer:
    """A plugin that records every event the daemon shows its observers."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    @hookimpl
    def stratos_on_event(self, event: Any) -> None:
        self.seen.append(event)


def chat(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "max 3 7"}],
        "max_tokens": 4})


async def test_one_endpoint_serves_every_tenant_by_name(nats_url: str, tmp_path: Path,
                                                        daemon: Any) -> None:
    observer = Observer()
    daemon.plugins.pm.register(observer, name="test-observer")
    canaries = {n: f"canary{n}zq" for n in ("t1", "t4")}
    files = {n: write_tenant_file(tmp_path / "private" / n / "data.jsonl", DESIGN[n], 40, i,
                                  canary=canaries[n]) for i, n in enumerate(canaries)}
    agents = [await start_agent(nats_url, tmp_path, f"host-{n}") for n in files]
    nc = await nats.connect(nats_url)
    try:
        job = small_job(files, rounds=1, steps=2, alone=False,
                        deploy=DeploySpec(enabled=True, load_requests=1))
        await ask(nc, SubmitTenantJob(spec=job, job_id="job-serve"))
        events = await Events().start(nc, "job-serve")
        done = await wait_done(nc, "job-serve")
        assert done.state == "completed", done.error
        [ep] = done.endpoints
        # served on t1's agent (the first tenant's) with builtin-multi: the agent has no GPU
        assert ep.state == "serving" and ep.agent == "host-t1"
        assert ep.deployer == "builtin-multi" and ep.names == {"t1": "t1", "t4": "t4"}
        # t1 is served where it lives (nothing moved); t4's ΔW crossed, counted
        assert ep.weights_bytes["t1"] == 0 and ep.weights_bytes["t4"] > 0
        r1, r4 = done.results["t1"], done.results["t4"]
        assert r1.bytes.weights == 0 and r4.bytes.weights == ep.weights_bytes["t4"]
        assert r4.bytes.from_agent > r4.bytes.weights
        assert r1.endpoint_url == r4.endpoint_url == ep.url and r4.served_name == "t4"
        assert r1.spent_s > 0 and r1.spent_usd > 0  # metered at the agent's $1/h
        for name in ("t1", "t4", "config:tiny"):
            reply = await asyncio.to_thread(chat, ep.url, name)
            assert reply.status_code == 200, reply.text
            assert reply.json()["model"] == name
            assert reply.json()["choices"][0]["message"]["role"] == "assistant"
        missing = await asyncio.to_thread(chat, ep.url, "t9")
        assert missing.status_code == 404, missing.text
        ready = await events.wait_for(TenantEndpointReady)
        assert ready.endpoint.url == ep.url
        # the plugin saw the tenant events, as it sees run events
        kinds = [type(e) for e in observer.seen]
        assert {TenantJobSubmitted, TenantRoundCompleted, TenantEndpointReady,
                TenantJobCompleted} <= set(kinds)
        # stratosctl: the endpoint in `tenants status`, the report and `endpoints`
        st = await asyncio.to_thread(ctl, nats_url, "tenants", "status", "job-serve")
        assert st.returncode == 0, st.stderr
        assert ep.url in st.stdout and "t4 served at" in st.stdout and "model=t4" in st.stdout
        report = Path(done.report_paths["markdown"]).read_text()
        assert "## Endpoint" in report and "weights only" in report and ep.url in report
        eps = await asyncio.to_thread(ctl, nats_url, "endpoints")
        assert ep.endpoint_id in eps.stdout, eps.stdout
        # only weights moved: no canary in any artifact
        obs = await nc.jetstream().object_store("stratos_artifacts")
        for info in await obs.list():
            data = (await obs.get(info.name)).data or b""
            assert not any(c.encode() in data for c in canaries.values()), info.name
        # cancelling the (finished) job stops its endpoint, as `stratosctl undeploy` does
        out = await asyncio.to_thread(ctl, nats_url, "tenants", "cancel", "job-serve")
        assert out.returncode == 0, out.stderr
        assert "endpoints stopped" in out.stdout and ep.endpoint_id in out.stdout
        await events.wait_for(TenantJobCancelled)
        for _ in range(100):
            if all(e.endpoint_id != ep.endpoint_id for e in await daemon.endpoints()):
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the endpoint was never removed")
        with pytest.raises(httpx.TransportError):
            await asyncio.to_thread(chat, ep.url, "t1")
        st = await asyncio.to_thread(ctl, nats_url, "tenants", "status", "job-serve")
        assert "stopped" in st.stdout
        await events.stop()
    finally:
        await stop_agents(agents, nc)
