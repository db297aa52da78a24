"""The deploy step end to end with the built-in server, and the vLLM deployer's guard rails."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import openai
import pytest

from agents.stepctx import StepContext
from agents.steps import deploy
from agents.steps.deploy_probe import GENERIC_PROMPT, percentile, probe_endpoint
from plugins.deployers.http_builtin import OpenAIServer
from plugins.deployers.vllm import VllmDeployer
from plugins.models import hf
from stratosd import hookimpl
from stratosd.api import DeployContext, Deployer
from stratosd.errors import ConfigError, JobFailed, MissingDependency
from stratosd.plugins import Plugins, get_plugins, make_plugin_manager
from tests.conftest import free_port

TASK = {"name": "mahjong-winning-tiles", "params": {"n_train": 0, "n_test": 3}}
LATENCY_KEYS = {"ttft_ms_p50", "ttft_ms_p95", "tpot_ms_p50", "tpot_ms_p95", "latency_ms_p50",
                "latency_ms_p95", "tokens_per_s"}


class LineQueue:
    """A StepContext channel that hands each protocol line to the test as it is written."""

    def __init__(self) -> None:
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.lines.put(json.loads(line))
        return len(text)

    def flush(self) -> None:
        pass

    def wait_for(self, kind: str, timeout: float = 45.0) -> dict[str, Any]:
        while True:
            msg = self.lines.get(timeout=timeout)
            if msg["kind"] == kind:
                return msg


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("STRATOS_HOME", str(tmp_path / "home"))
    return hf.resolve_model("config:tiny")


class Running:
    """A deploy step running in a thread with a stop flag the test controls."""

    def __init__(self, ctx: StepContext, stop: threading.Event) -> None:
        self.ctx, self.stop = ctx, stop
        self.result: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = deploy.run(self.ctx)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc
            self.ctx.send("error", message=str(exc))

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def start_step(tmp_path: Path) -> Iterator[Any]:
    running: list[Running] = []

    def start(args: dict[str, Any], inputs: dict[str, Path] | None = None) -> tuple[Running,
                                                                                    LineQueue]:
        chan = LineQueue()
        stop = threading.Event()
        ctx = StepContext(job_id="j1", run_id="r1", step="deploy", args=args,
                          workdir=tmp_path / f"w{len(running)}", inputs=inputs or {},
                          channel=chan, stop_flag=stop.is_set)  # type: ignore[arg-type]
        run = Running(ctx, stop)
        running.append(run)
        return run, chan

    yield start
    for run in running:
        run.stop.set()
        run.thread.join(timeout=30)


def test_deploy_builtin_serves_until_stopped(tiny: str, start_step: Any) -> None:
    run, chan = start_step({"deployer": "builtin", "model": tiny, "served_name": "student",
                            "task": TASK, "load_requests": 3, "load_max_tokens": 4})
    ready = chan.wait_for("ready")
    assert ready["model"] == "student" and ready["deployer"] == "builtin"
    metrics = ready["metrics"]
    assert metrics["requests"] == 3 and metrics["errors"] == 0
    assert LATENCY_KEYS <= set(metrics) and all(isinstance(v, float) for v in metrics.values())
    assert 0 < metrics["ttft_ms_p50"] <= metrics["latency_ms_p50"]  # first token, then the rest
    assert metrics["ttft_ms_p95"] <= metrics["latency_ms_p95"]
    assert metrics["latency_ms_p95"] >= metrics["latency_ms_p50"] > 0
    assert metrics["tpot_ms_p95"] >= metrics["tpot_ms_p50"] >= 0
    assert metrics["tokens_per_s"] > 0

    client = openai.OpenAI(base_url=ready["url"], api_key="unused", max_retries=0)
    resp = client.chat.completions.create(
        model="student", messages=[{"role": "user", "content": "1+1="}], max_tokens=3)
    assert resp.usage is not None and resp.usage.completion_tokens >= 1
    assert run.thread.is_alive()  # still serving

    result = run.finish()
    assert result["stopped"] is True and result["url"] == ready["url"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(ready["url"] + "/models", timeout=2)


def test_deploy_an_adapter_input(tiny: str, tmp_path: Path, start_step: Any) -> None:
    from peft import LoraConfig, get_peft_model

    base, _ = hf.load_model(tiny, for_training=True)
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(adapter))
    run, chan = start_step({"model": "config:tiny", "served_name": "lora", "load_requests": 0},
                           inputs={"model": adapter})
    ready = chan.wait_for("ready")
    models = httpx.get(ready["url"] + "/models").json()["data"]
    assert [m["id"] for m in models] == ["lora"]
    assert run.finish()["stopped"] is True


@pytest.fixture
def server(tiny: str) -> Iterator[OpenAIServer]:
    with OpenAIServer(tiny, served_name="student") as srv:
        yield srv


def test_probe_times_each_streamed_request(server: OpenAIServer) -> None:
    task = get_plugins().task(TASK["name"], TASK["params"])  # type: ignore[arg-type]
    prompts = [task.prompt(ex.question) for ex in task.examples("test")]
    probe = probe_endpoint(server.url, "student", prompts, requests=4, max_tokens=5)
    assert probe.requests == 4 and probe.errors == [] and len(probe.samples) == 4
    for s in probe.samples:
        assert 0 < s.ttft_ms <= s.total_ms
        assert 1 <= s.tokens <= 5
        assert s.tpot_ms is None if s.tokens == 1 else s.tpot_ms is not None and s.tpot_ms >= 0
    metrics = probe.metrics()
    assert metrics["latency_ms_p50"] == percentile([s.total_ms for s in probe.samples], 0.5)
    assert metrics["tokens_per_s"] == pytest.approx(
        sum(s.tokens for s in probe.samples) / sum(s.total_ms / 1000 for s in probe.samples))


def test_failed_requests_give_no_latency_sample(tiny: str) -> None:
    with OpenAIServer(tiny, served_name="student", faults={500: 0.5}, fault_seed=1) as srv:
        probe = probe_endpoint(srv.url, "student", ["1+1="], requests=8, max_tokens=3)
    assert probe.errors and probe.samples  # this seed fails some, not all
    assert len(probe.errors) + len(probe.samples) == probe.requests == 8
    assert all(e == "HTTP 500: injected fault 500" for e in probe.errors)
    metrics = probe.metrics()
    assert metrics["errors"] == len(probe.errors)
    assert metrics["latency_ms_p50"] == percentile([s.total_ms for s in probe.samples], 0.5)


def test_probe_where_nothing_listens_has_no_latency() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    probe = probe_endpoint(url, "student", ["1+1="], requests=3, max_tokens=3)
    assert probe.samples == [] and len(probe.errors) == 3
    assert probe.errors[0].startswith("ConnectError")
    assert probe.metrics() == {"requests": 3.0, "errors": 3.0}  # no p50 of nothing, never 0


def test_probe_prompts_are_the_tasks_test_prompts(tmp_path: Path) -> None:
    ctx = StepContext(job_id="j1", run_id="r1", step="deploy", workdir=tmp_path, inputs={},
                      args={"task": TASK})
    task = get_plugins().task(TASK["name"], TASK["params"])  # type: ignore[arg-type]
    examples = task.examples("test")
    assert deploy.probe_prompts(ctx, 2) == [task.prompt(ex.question) for ex in examples[:2]]
    assert deploy.probe_prompts(ctx, 8) == [task.prompt(ex.question) for ex in examples]
    ctx.args = {}
    assert deploy.probe_prompts(ctx, 8) == [GENERIC_PROMPT]
    ctx.args = {"task": {"params": {}}}
    with pytest.raises(ConfigError) as info:
        deploy.probe_prompts(ctx, 8)
    assert info.value.field == "args.task"


@pytest.mark.parametrize(("arg", "value"), [("load_requests", -1), ("load_max_tokens", 0),
                                            ("load_requests", "8"), ("load_timeout_s", 0)])
def test_bad_probe_args_name_the_field(tmp_path: Path, arg: str, value: Any) -> None:
    ctx = StepContext(job_id="j1", run_id="r1", step="deploy", workdir=tmp_path, inputs={},
                      args={"model": "config:tiny", arg: value})
    with pytest.raises(ConfigError) as info:
        deploy.run(ctx)
    assert info.value.field == f"args.{arg}"


class FailingDeployer(Deployer):
    """The built-in server with every POST failing (500): up and healthy, yet not usable."""

    name = "failing"
    started: ClassVar[list[OpenAIServer]] = []

    def serve(self, ctx: DeployContext) -> None:
        server = OpenAIServer(ctx.model, served_name=ctx.served_name, faults={500: 1.0})
        self.started.append(server)
        url = server.start()
        try:
            ctx.ready(url=url, model=ctx.served_name)
            while not ctx.should_stop():
                threading.Event().wait(0.1)
        finally:
            server.stop()


class FailingPlugin:
    @hookimpl
    def stratos_deployers(self) -> list[type[Deployer]]:
        return [FailingDeployer]


def test_deploy_fails_when_every_probe_request_fails(tiny: str, tmp_path: Path) -> None:
    ctx = StepContext(job_id="j1", run_id="r1", step="deploy", workdir=tmp_path, inputs={},
                      args={"deployer": "failing", "model": tiny, "task": TASK,
                            "load_requests": 2})
    ctx.plugins = Plugins(make_plugin_manager(autoload=False, extra=[FailingPlugin()]))
    with pytest.raises(JobFailed) as info:
        deploy.run(ctx)
    url = FailingDeployer.started[-1].url
    assert info.value.message == (f"endpoint {url} is not usable: all 2 probe requests failed, "
                                  "the first with HTTP 500: injected fault 500")
    assert [m for m in ctx.messages if m["kind"] == "ready"] == []  # never announced
    with pytest.raises(httpx.ConnectError):  # and the server is gone with the step
        httpx.get(url.removesuffix("/v1") + "/health", timeout=2)


def test_unknown_deployer_names_the_field(tmp_path: Path) -> None:
    ctx = StepContext(job_id="j1", run_id="r1", step="deploy", workdir=tmp_path, inputs={},
                      args={"deployer": "nope", "model": "config:tiny"})
    with pytest.raises(ConfigError) as info:
        deploy.run(ctx)
    assert info.value.field == "deployer"


def test_vllm_says_why_it_cannot_run_here(tmp_path: Path) -> None:
    reason = VllmDeployer().unavailable_reason()
    if reason is None:
        pytest.skip("vllm and a CUDA GPU are present")
    assert "stratos[vllm]" in reason or "CUDA" in reason
    ctx = StepContext(job_id="j1", run_id="r1", step="deploy", workdir=tmp_path, inputs={},
                      args={"deployer": "vllm", "model": "config:tiny"})
    with pytest.raises(MissingDependency, match="cannot run on this host"):
        deploy.run(ctx)
    with pytest.raises(MissingDependency):
        VllmDeployer().serve(DeployContext(model="config:tiny", adapter=None, host="127.0.0.1",
                                           port=0, served_name="s"))


def test_vllm_command_serves_an_adapter_on_its_base(tiny: str, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "config:tiny", "r": 16}))
    ctx = DeployContext(model="config:tiny", adapter=adapter, host="0.0.0.0", port=8001,
                        served_name="student", params={"max_model_len": 1024})
    cmd = VllmDeployer().command(ctx, 8001)
    assert cmd[1:4] == ["-m", "vllm.entrypoints.cli.main", "serve"]
    assert cmd[4] == tiny  # `vllm serve MODEL`; config: refs resolve to a local dir
    assert json.loads(cmd[cmd.index("--lora-modules") + 1]) == {
        "name": "student", "path": str(adapter), "base_model_name": "student-base"}
    assert "--enable-lora" in cmd and cmd[cmd.index("--max-lora-rank") + 1] == "16"
    assert cmd[cmd.index("--max-model-len") + 1] == "1024"
    assert cmd[cmd.index("--port") + 1] == "8001"
