"""Teacher backends against real endpoints and processes: the builtin OpenAI-compatible
server over a tiny model (with injected faults), a local HTTP server, a worker process."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import structlog

from plugins.teachers.common import MicroBatcher, RetryPolicy, parse_retry_after, price_for
from plugins.teachers.hf_local import HFTeacher
from plugins.teachers.openai_api import OpenAITeacher
from plugins.teachers.reference import ReferenceTeacher
from schemas.specs import TeacherSpec
from stratosd.api import Generation, TeacherRequest
from stratosd.errors import ConfigError, MissingDependency
from stratosd.plugins import Plugins, make_plugin_manager

SECRET = "sk-test-0123456789abcdef-SECRET"


def openai_spec(base_url: str, model: str = "config:tiny", **params: Any) -> TeacherSpec:
    return TeacherSpec(backend="openai", model=model, params={"base_url": base_url, **params})


def reqs(n: int) -> list[TeacherRequest]:
    return [TeacherRequest(prompt=f"What is {i} plus {i}?") for i in range(n)]


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[Any]:
    from plugins.deployers.http_builtin import OpenAIServer

    server = OpenAIServer("config:tiny", faults={429: 0.3, 500: 0.2}, fault_seed=1,
                          max_new_tokens_cap=8)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)  # the module's server loads a tiny model (imports torch)
async def test_openai_retries_through_faults_and_counts_tokens(tiny_server: Any) -> None:
    teacher = OpenAITeacher(openai_spec(
        tiny_server.url, max_retries=12, backoff_base_s=0.01, max_concurrency=4,
        price_in_per_mtok=1000.0, price_out_per_mtok=2000.0,
    ))
    gens = await teacher.generate(reqs(20), max_new_tokens=6, seed=3)
    await teacher.aclose()
    assert [g.error for g in gens] == [None] * 20
    s = teacher.stats
    assert s.requests == 20 and s.failures == 0
    assert s.retries > 0 and s.attempts == 20 + s.retries  # faults were hit and retried
    assert all(g.prompt_tokens > 0 and 0 < g.completion_tokens <= 6 for g in gens)
    assert s.prompt_tokens == sum(g.prompt_tokens for g in gens)
    assert s.completion_tokens == sum(g.completion_tokens for g in gens)
    expected = (s.prompt_tokens * 1000.0 + s.completion_tokens * 2000.0) / 1e6
    assert s.cost_usd == pytest.approx(expected)


@pytest.mark.slow
async def test_openai_does_not_retry_other_4xx(tiny_server: Any) -> None:
    teacher = OpenAITeacher(openai_spec(tiny_server.url, model="no-such-model",
                                        max_retries=5, backoff_base_s=0.01))
    [gen] = await teacher.generate(reqs(1))
    await teacher.aclose()
    # A fault draw may come first (retried); the 404 itself ends it at once.
    assert gen.error is not None and "HTTP 404" in gen.error
    assert teacher.stats.failures == 1


class _EchoAuth(BaseHTTPRequestHandler):
    """Answers 401 and echoes the Authorization header back, like a careless proxy."""

    def log_message(self, *a: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"error": f"bad key {self.headers.get('Authorization')}"}).encode()
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def echo_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _EchoAuth)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_key_never_appears_in_errors_reprs_or_logs(
    echo_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_TEACHER_KEY", SECRET)
    teacher = OpenAITeacher(openai_spec(echo_server, model="m", api_key_env="MY_TEACHER_KEY"))
    with structlog.testing.capture_logs() as logs:
        [gen] = await teacher.generate(reqs(1))
    await teacher.aclose()
    assert gen.error is not None and "HTTP 401" in gen.error and "***" in gen.error
    assert SECRET not in gen.error
    assert SECRET not in repr(teacher) and SECRET not in repr(vars(teacher))
    assert teacher.stats.attempts == 1  # 401 is not retried
    assert any(e["event"] == "teacher_request_failed" for e in logs)
    assert SECRET not in repr(logs)


def test_key_only_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="api_key_env") as err:
        OpenAITeacher(openai_spec("http://x/v1", api_key=SECRET))
    assert err.value.field == "teacher.params.api_key" and SECRET not in str(err.value)
    monkeypatch.delenv("NOPE_KEY", raising=False)
    with pytest.raises(ConfigError, match="NOPE_KEY"):
        OpenAITeacher(openai_spec("http://x/v1", api_key_env="NOPE_KEY"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAITeacher(TeacherSpec(backend="openai", model="gpt-4o"))
    with pytest.raises(ConfigError, match="max_retrys"):
        OpenAITeacher(openai_spec("http://x/v1", max_retrys=3))
    OpenAITeacher(openai_spec("http://127.0.0.1:1/v1"))  # a local server needs no key


async def test_connection_errors_are_retried_then_reported() -> None:
    teacher = OpenAITeacher(openai_spec("http://127.0.0.1:1/v1", max_retries=2,
                                        backoff_base_s=0.001))
    [gen] = await teacher.generate(reqs(1))
    await teacher.aclose()
    assert gen.error is not None and gen.error.startswith("connection error")
    assert teacher.stats.attempts == 3 and teacher.stats.retries == 2


def test_prices_and_retry_policy() -> None:
    assert price_for("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert price_for("openai/gpt-4o") == (2.50, 10.00)
    assert price_for("Qwen/Qwen2.5-7B-Instruct") == (0.0, 0.0)
    assert price_for("gpt-4o", {"price_in_per_mtok": 1, "price_out_per_mtok": 2}) == (1.0, 2.0)
    policy = RetryPolicy(base_s=1.0, max_s=8.0)
    for attempt in range(6):
        ceiling = min(8.0, 2.0**attempt)
        assert ceiling / 2 <= policy.delay(attempt) <= ceiling
    assert policy.delay(0, retry_after=3.0) == 3.0
    assert policy.delay(0, retry_after=100.0) == 8.0
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None


async def test_micro_batcher_fills_batches_and_groups_by_settings() -> None:
    batches: list[tuple[int, float, list[str]]] = []

    async def run_batch(rs: list[TeacherRequest], max_new: int, temp: float,
                        _seed: int | None) -> list[Generation]:
        batches.append((max_new, temp, [r.prompt for r in rs]))
        if any(r.prompt == "boom" for r in rs):
            raise RuntimeError("device lost")
        return [Generation(text=r.prompt.upper()) for r in rs]

    mb = MicroBatcher(run_batch, batch_size=3)
    outs = await asyncio.gather(
        *(mb.submit([TeacherRequest(prompt=f"p{i}")], max_new_tokens=8, temperature=0.0,
                    seed=None) for i in range(5)),
        mb.submit([TeacherRequest(prompt="hot")], max_new_tokens=8, temperature=0.7, seed=1),
    )
    assert [o[0].text for o in outs] == ["P0", "P1", "P2", "P3", "P4", "HOT"]
    assert [len(b[2]) for b in batches] == [3, 2, 1] and batches[-1][1] == 0.7
    [failed] = await mb.submit([TeacherRequest(prompt="boom")], max_new_tokens=8,
                               temperature=0.0, seed=None)
    assert failed.error == "RuntimeError: device lost"


async def test_reference_teacher_only_justifies_known_answers() -> None:
    from plugins.tasks.gsm8k import Gsm8kTask

    task = Gsm8kTask({"synthetic": True, "n_train": 3, "n_test": 1})
    ex = task.examples("train")[0]
    teacher = ReferenceTeacher(TeacherSpec(backend="reference", model="gsm8k"), task)
    fwd, inj = await teacher.generate([
        TeacherRequest(prompt=task.prompt(ex.question), question=ex.question),
        TeacherRequest(prompt="", question=ex.question, answer=ex.answer),
    ])
    assert fwd.error is not None and "known answers" in fwd.error
    assert inj.error is None and task.extract(inj.text) == ex.answer


@pytest.mark.slow
@pytest.mark.timeout(180)  # a child process imports torch: slow on a loaded host
async def test_hf_teacher_batches_in_a_worker_process() -> None:
    torch_before = "torch" in sys.modules
    teacher = HFTeacher(TeacherSpec(backend="hf", model="config:tiny",
                                    params={"batch_size": 4}))
    try:
        # Six concurrent single-request calls → batches of up to 4 in the child.
        results = await asyncio.gather(*(
            teacher.generate([r], max_new_tokens=5) for r in reqs(6)
        ))
        again = await teacher.generate(reqs(2), max_new_tokens=5)
    finally:
        await teacher.aclose()
    gens = [g for batch in results for g in batch]
    assert all(g.error is None and 0 < g.completion_tokens <= 5 for g in gens)
    assert [g.text for g in again] == [g.text for g in gens[:2]]  # greedy: deterministic
    assert len({g.latency_ms for g in gens}) <= 3  # shared batches, not six solo calls
    if not torch_before:
        assert "torch" not in sys.modules


def test_hf_teacher_refuses_a_missing_path(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="does not exist") as err:
        HFTeacher(TeacherSpec(backend="hf", model=str(tmp_path / "missing")))
    assert err.value.field == "teacher.model"


@pytest.mark.slow
@pytest.mark.timeout(180)  # a child process imports torch: slow on a loaded host
async def test_hf_teacher_load_failure_is_a_failed_generation(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = HFTeacher(TeacherSpec(backend="hf", model=str(tmp_path),  # no model in it
                                    params={"load_timeout_s": 60}))
    [gen] = await teacher.generate(reqs(1), max_new_tokens=2)
    await teacher.aclose()
    assert gen.error is not None and "could not load" in gen.error


def test_vllm_needs_the_extra() -> None:
    from plugins.teachers.vllm import VLLMTeacher, vllm_unavailable_reason

    if vllm_unavailable_reason() is None:
        pytest.skip("vllm is installed here")
    with pytest.raises(MissingDependency) as err:
        VLLMTeacher(TeacherSpec(backend="vllm", model="Qwen/Qwen2.5-0.5B-Instruct"))
    assert "stratos[vllm]" in err.value.hint


def test_backends_are_registered() -> None:
    names = set(Plugins(make_plugin_manager(autoload=False)).teachers.names())
    assert {"openai", "hf", "vllm", "reference"} <= names
