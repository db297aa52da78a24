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


# --- vllm: the worker's use of vLLM's API, against vLLM 0.34's real names and shapes ---------
# (vllm/entrypoints/llm.py LLM.__init__/chat/generate, sampling_params.py SamplingParams,
# outputs.py RequestOutput/CompletionOutput, platforms/interface.py Platform), served by a
# stand-in `vllm` package so the real worker process runs here without a GPU.

FAKE_VLLM = {
    "vllm/__init__.py": '''
import json, os

class SamplingParams:  # a msgspec.Struct in vLLM: keywords only, unknown names rejected
    def __init__(self, *, n=1, temperature=1.0, top_p=1.0, top_k=0, seed=None,
                 max_tokens=16, stop=None):
        self.temperature, self.seed, self.max_tokens = temperature, seed, max_tokens

class CompletionOutput:
    def __init__(self, index, text, token_ids, cumulative_logprob, logprobs,
                 finish_reason=None, stop_reason=None):
        self.index, self.text, self.token_ids = index, text, token_ids

class RequestOutput:
    def __init__(self, request_id, prompt, prompt_token_ids, prompt_logprobs, outputs,
                 finished, **kwargs):
        self.prompt, self.prompt_token_ids, self.outputs = prompt, prompt_token_ids, outputs

def _out(i, prompt, sp):
    text = f"{prompt}|t={sp.temperature}|seed={sp.seed}"
    ids = list(range(min(sp.max_tokens, 3))) + [2]  # the eos id is in token_ids, not text
    return RequestOutput(str(i), prompt, [1] * len(prompt.split()), None,
                         [CompletionOutput(0, text, ids, None, None, "stop")], True)

class LLM:
    def __init__(self, model, *, tokenizer=None, tensor_parallel_size=1, dtype="auto",
                 seed=0, gpu_memory_utilization=None, enforce_eager=False, **kwargs):
        unknown = set(kwargs) - {"max_model_len"}  # **kwargs go to EngineArgs
        if unknown:
            raise TypeError(f"unexpected EngineArgs {unknown}")
        with open(os.environ["FAKE_VLLM_RECORD"], "w") as fh:
            json.dump({"model": model, "tensor_parallel_size": tensor_parallel_size,
                       "dtype": dtype, "seed": seed, "enforce_eager": enforce_eager,
                       "gpu_memory_utilization": gpu_memory_utilization, **kwargs,
                       "mp": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")}, fh)

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None,
                 priority=None, tokenization_kwargs=None, mm_processor_kwargs=None):
        assert use_tqdm is False and len(sampling_params) == len(prompts)
        return [_out(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, sampling_params))]

    def chat(self, messages, sampling_params=None, use_tqdm=True, lora_request=None,
             priority=None, chat_template=None, chat_template_content_format="auto",
             add_generation_prompt=True, continue_final_message=False, tools=None,
             chat_template_kwargs=None, tokenization_kwargs=None, mm_processor_kwargs=None):
        assert use_tqdm is False and len(sampling_params) == len(messages)
        return [_out(i, "chat:" + "/".join(f"{m['role']}={m['content']}" for m in conv), sp)
                for i, (conv, sp) in enumerate(zip(messages, sampling_params))]
''',
    "vllm/platforms/__init__.py": '''
import os

class _Platform:
    def is_cuda_alike(self):
        return os.environ.get("FAKE_VLLM_GPU") == "1"

    @classmethod
    def get_device_name(cls, device_id=0):
        return "Fake GPU"

current_platform = _Platform()
''',
}


@pytest.fixture
def fake_vllm(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A stand-in `vllm` on this process's path and the worker's PYTHONPATH; the JSON file
    the stand-in writes LLM(...)'s arguments to."""
    root = tmp_path / "fake"
    for rel, text in FAKE_VLLM.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", str(root))
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(tmp_path / "llm.json"))
    monkeypatch.setenv("FAKE_VLLM_GPU", "1")
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    return tmp_path / "llm.json"


def vllm_spec(model: str = "org/teacher", **params: Any) -> TeacherSpec:
    return TeacherSpec(backend="vllm", model=model, params={"load_timeout_s": 60, **params})


async def test_vllm_worker_drives_the_engine_through_vllms_api(fake_vllm: Any) -> None:
    from plugins.teachers.vllm import VLLMTeacher

    teacher = VLLMTeacher(vllm_spec(max_model_len=512, dtype="bfloat16", enforce_eager=True,
                                    gpu_memory_utilization=0.25))
    try:
        gens = await teacher.generate(reqs(2), max_new_tokens=8, temperature=0.7, seed=5)
        greedy = await teacher.generate(reqs(1), max_new_tokens=1)
    finally:
        await teacher.aclose()
    assert json.loads(fake_vllm.read_text()) == {
        "model": "org/teacher", "tensor_parallel_size": 1, "dtype": "bfloat16", "seed": 0,
        "enforce_eager": True, "gpu_memory_utilization": 0.25, "max_model_len": 512,
        "mp": "spawn"}  # a fork after the driver's init would break vLLM's engine process
    # one user turn per prompt through LLM.chat; one seed per prompt, counting up
    assert [g.text for g in gens] == [
        "chat:user=What is 0 plus 0?|t=0.7|seed=5", "chat:user=What is 1 plus 1?|t=0.7|seed=6"]
    assert [(g.prompt_tokens, g.completion_tokens, g.error) for g in gens] == [(5, 4, None)] * 2
    assert greedy[0].text.endswith("|t=0.0|seed=None") and greedy[0].completion_tokens == 2


async def test_vllm_worker_reads_raw_prompts_for_config_models_and_says_when_no_gpu(
        fake_vllm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from plugins.teachers.vllm import VLLMTeacher

    raw = VLLMTeacher(vllm_spec(chat=False))
    try:
        [gen] = await raw.generate(reqs(1), max_new_tokens=4)
    finally:
        await raw.aclose()
    assert gen.text.startswith("What is 0 plus 0?|")  # LLM.generate, no chat template
    assert VLLMTeacher(vllm_spec("config:tiny")).chat is False  # as the hf teacher
    assert VLLMTeacher(vllm_spec()).chat is True
    monkeypatch.setenv("FAKE_VLLM_GPU", "0")
    nogpu = VLLMTeacher(vllm_spec())
    [gen] = await nogpu.generate(reqs(1), max_new_tokens=4)
    await nogpu.aclose()
    assert gen.error is not None and "no CUDA GPU visible" in gen.error


@pytest.mark.parametrize(("params", "field"), [
    ({"dtype": "bf16"}, "dtype"), ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"enforce_eager": "yes"}, "enforce_eager"), ({"max_model_len": 8}, "max_model_len"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
])
def test_vllm_engine_params_vllm_would_refuse_fail_with_their_field(
        params: dict[str, Any], field: str) -> None:
    from plugins.teachers.vllm import engine_kwargs

    with pytest.raises(ConfigError) as err:
        engine_kwargs(params)
    assert err.value.field == f"teacher.params.{field}" and err.value.hint


def test_vllm_engine_kwargs_are_llm_arguments() -> None:
    from plugins.teachers.vllm import engine_kwargs

    # LLM.__init__'s own keywords, plus max_model_len through **kwargs into EngineArgs
    llm_args = {"tensor_parallel_size", "dtype", "seed", "gpu_memory_utilization",
                "enforce_eager", "max_model_len"}
    full = engine_kwargs({"max_model_len": 1024, "dtype": "half", "enforce_eager": True,
                          "tensor_parallel_size": 2, "seed": 3})
    assert set(full) <= llm_args
    assert full["tensor_parallel_size"] == 2 and full["dtype"] == "half"
    assert engine_kwargs({}) == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9,
                                 "seed": 0}


def test_backends_are_registered() -> None:
    names = set(Plugins(make_plugin_manager(autoload=False)).teachers.names())
    assert {"openai", "hf", "vllm", "reference"} <= names
