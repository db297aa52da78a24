"""deploy → health → latency → registered → undeploy, through a real agent and the daemon."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from schemas import subjects
from schemas.commands import EndpointList, ListEndpoints, RunStep, UndeployEndpoint


async def _endpoints(daemon: Any) -> EndpointList:
    return await daemon.bus.request(subjects.daemon_cmd("endpoints"), ListEndpoints())


async def _until(pred: Any, timeout: float) -> None:
    async def loop() -> None:
        while not await pred():
            await asyncio.sleep(0.1)
    await asyncio.wait_for(loop(), timeout)


@pytest.mark.timeout(180)
async def test_deploy_health_latency_undeploy(daemon: Any, agent: Any) -> None:
    await daemon.fleet.wait_up("gpu-1", timeout=10)
    step = RunStep(job_id="ep-1", run_id="adhoc", step="deploy",
                   args={"deployer": "builtin", "model": "config:tiny", "served_name": "tiny",
                         "load_requests": 4})
    await daemon.dispatch.send("gpu-1", step)

    async def listed() -> bool:
        return bool((await _endpoints(daemon)).endpoints)

    await _until(listed, 120)
    ep = (await _endpoints(daemon)).endpoints[0]
    assert ep.endpoint_id == "ep-1" and ep.agent_id == "gpu-1" and ep.model == "tiny"
    assert ep.metrics["latency_ms_p95"] >= ep.metrics["latency_ms_p50"] > 0
    assert ep.metrics["tokens_per_s"] > 0
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(ep.url.replace("/v1", "/health"))).status_code == 200
        r = await client.post(f"{ep.url}/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "Hand: 1123m"}],
            "max_tokens": 4})
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    # the agent reports the endpoint in its telemetry as well
    assert ep.url in agent.snapshot().endpoints

    reply = await daemon.bus.request(subjects.daemon_cmd("undeploy"),
                                     UndeployEndpoint(endpoint_id="ep-1"), timeout=60)
    assert reply.state == "undeploying"

    async def gone() -> bool:
        return not (await _endpoints(daemon)).endpoints

    await _until(gone, 60)
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(timeout=5) as client:
            await client.get(ep.url.replace("/v1", "/health"))
