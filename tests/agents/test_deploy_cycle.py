"""deploy → health → latency → registered → undeploy, through a real agent and the daemon."""

from __future__ import annotations

import asyncio
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas import subjects
from schemas.commands import EndpointList, ListEndpoints, RunStep, UndeployEndpoint
from tests.conftest import ROOT

TASK = {"name": "mahjong-winning-tiles", "params": {"n_train": 0, "n_test": 4}}


async def _endpoints(daemon: Any) -> EndpointList:
    reply: EndpointList = await daemon.bus.request(subjects.daemon_cmd("endpoints"),
                                                   ListEndpoints())
    return reply


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
                         "task": TASK, "load_requests": 4, "load_max_tokens": 6})
    await daemon.dispatch.send("gpu-1", step)

    async def listed() -> bool:
        return bool((await _endpoints(daemon)).endpoints)

    await _until(listed, 120)
    ep = (await _endpoints(daemon)).endpoints[0]
    assert ep.endpoint_id == "ep-1" and ep.agent_id == "gpu-1" and ep.model == "tiny"
    m = ep.metrics
    assert m["requests"] == 4 and m["errors"] == 0
    assert 0 < m["ttft_ms_p50"] <= m["latency_ms_p50"] <= m["latency_ms_p95"]
    assert m["ttft_ms_p50"] <= m["ttft_ms_p95"] <= m["latency_ms_p95"]
    assert m["tpot_ms_p50"] >= 0 and m["tokens_per_s"] > 0
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


@pytest.fixture
def failing_deployer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed plugin (entry point) whose server fails every request; the step child
    inherits the agent's environment, so it loads the plugin."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "failing_deployer.py").write_text(textwrap.dedent("""
        import time

        from plugins.deployers.http_builtin import OpenAIServer
        from stratosd import hookimpl
        from stratosd.api import Deployer

        class FailingDeployer(Deployer):
            name = "failing"

            def serve(self, ctx):
                server = OpenAIServer(ctx.model, served_name=ctx.served_name,
                                      faults={500: 1.0})
                url = server.start()
                try:
                    ctx.ready(url=url, model=ctx.served_name)
                    while not ctx.should_stop():
                        time.sleep(0.1)
                finally:
                    server.stop()

        @hookimpl
        def stratos_deployers():
            return [FailingDeployer]
    """))
    dist = site / "failing_deployer-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: failing-deployer\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[stratos]\nfailing = failing_deployer\n")
    path = [str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    monkeypatch.delenv("STRATOS_NO_PLUGIN_AUTOLOAD", raising=False)


@pytest.mark.timeout(180)
async def test_unusable_endpoint_fails_the_deploy_job(daemon: Any, agent: Any,
                                                      failing_deployer: None) -> None:
    await daemon.fleet.wait_up("gpu-1", timeout=10)
    step = RunStep(job_id="ep-bad", run_id="adhoc", step="deploy",
                   args={"deployer": "failing", "model": "config:tiny", "served_name": "tiny",
                         "task": TASK, "load_requests": 2})
    await daemon.dispatch.send("gpu-1", step)
    outcome = await daemon.dispatch.wait("ep-bad", timeout=120)
    assert outcome.state == "failed" and outcome.endpoint is None
    assert outcome.error is not None and outcome.error.code == "job_failed"
    found = re.fullmatch(r"endpoint (http://\S+/v1) is not usable: all 2 probe requests failed, "
                         r"the first with HTTP 500: injected fault 500", outcome.error.message)
    assert found is not None, outcome.error.message
    assert not (await _endpoints(daemon)).endpoints  # never registered
    assert not agent.snapshot().endpoints
    with pytest.raises(httpx.ConnectError):  # the serving child stopped its server
        async with httpx.AsyncClient(timeout=5) as client:
            await client.get(found[1].replace("/v1", "/health"))
