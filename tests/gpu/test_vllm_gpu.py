"""vLLM on a GPU: the teacher backend answers in chat format, and the deployer serves LoRA
adapters by name on one base (the run's adapter, a second one, and the base itself)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.conftest import MODEL, Record
from tests.plugins.test_trainers import AddTask

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

PROMPTS = [AddTask().prompt(f"{a}+{b}") for a, b in ((1, 2), (3, 4), (5, 5), (9, 8))]


async def test_vllm_teacher_answers_chat_requests(record: Record) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed: install stratos[vllm]")
    from plugins.teachers.vllm import VLLMTeacher
    from schemas.specs import TeacherSpec
    from stratosd.api import TeacherRequest

    # chat: config: models default to raw prompts (as the hf teacher); this one has ChatML.
    # enforce_eager: no torch.compile or CUDA graphs, a start in seconds.
    spec = TeacherSpec(backend="vllm", model=MODEL, params={
        "gpu_memory_utilization": 0.25, "max_model_len": 512, "load_timeout_s": 240,
        "chat": True, "enforce_eager": True})
    teacher = VLLMTeacher(spec, AddTask())
    try:
        t0 = time.monotonic()
        warm = await teacher.generate([TeacherRequest(prompt=PROMPTS[0])], max_new_tokens=4)
        record("vLLM teacher engine start", time.monotonic() - t0, "s")
        assert warm[0].error is None, warm[0].error
        requests = [TeacherRequest(prompt=AddTask().prompt(f"{a}+{b}"), question=f"{a}+{b}")
                    for a in range(10) for b in range(10)]
        t0 = time.monotonic()
        gens = await teacher.generate(requests, max_new_tokens=64, temperature=0.0, seed=0)
        seconds = time.monotonic() - t0
        assert [g.error for g in gens] == [None] * len(requests)
        tokens = sum(g.completion_tokens for g in gens)
        assert tokens > 0 and all(g.prompt_tokens > 0 for g in gens)
        record("vLLM teacher generation (100 prompts, batched)", tokens / seconds, "tokens/s")
        # greedy: the same batch answers the same. Not compared with the 100-prompt batch:
        # vLLM is batch-invariant only with VLLM_BATCH_INVARIANT=1, and a random-init model's
        # logits have near-ties that another batch shape's rounding can flip.
        again = [await teacher.generate(requests[:8], max_new_tokens=64, temperature=0.0,
                                        seed=0) for _ in range(2)]
        assert [g.text for g in again[0]] == [g.text for g in again[1]]
    finally:
        await teacher.aclose()


def _chat(url: str, model: str, prompt: str) -> Any:
    import httpx

    return httpx.post(url + "/chat/completions", timeout=60, json={
        "model": model, "temperature": 0.0, "max_tokens": 8,
        "messages": [{"role": "user", "content": prompt}]})


def test_vllm_deployer_serves_lora_adapters_by_name(lora_adapter: Path, exported: Path,
                                                    record: Record) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed: install stratos[vllm]")
    import httpx

    from agents.steps.deploy_probe import probe_endpoint
    from plugins.deployers.vllm import VllmDeployer
    from stratosd.api import DeployContext

    ready = threading.Event()
    stop = threading.Event()
    seen: dict[str, Any] = {}

    def on_ready(*, url: str, model: str, **_: Any) -> None:
        seen.update(url=url, model=model)
        ready.set()

    ctx = DeployContext(
        model=MODEL, adapter=lora_adapter, host="127.0.0.1", port=0, served_name="student",
        params={"adapters": {"exported": str(exported / "adapter")}, "max_model_len": 512,
                "gpu_memory_utilization": 0.25, "enforce_eager": True,
                "startup_timeout_s": 240},
        ready=on_ready, should_stop=stop.is_set)

    def serve() -> None:
        try:
            VllmDeployer().serve(ctx)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            seen["error"] = exc
            ready.set()

    thread = threading.Thread(target=serve, daemon=True)
    t0 = time.monotonic()
    thread.start()
    try:
        assert ready.wait(270) and "error" not in seen, seen.get("error")
        record("vLLM server start with 2 adapters (eager)", time.monotonic() - t0, "s")
        url = seen["url"]
        assert seen["model"] == "student"
        cards = httpx.get(url + "/models", timeout=10).json()["data"]
        served = {m["id"]: m.get("parent") for m in cards}
        assert {"student", "student-base", "exported"} <= set(served), served
        # --lora-modules' base_model_name: each adapter's card names the base it runs on
        assert served["student"] == served["exported"] == "student-base", served
        answers: dict[str, list[str]] = {}
        for name in ("student", "exported", "student-base"):
            replies = [_chat(url, name, p) for p in PROMPTS]
            assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
            answers[name] = [r.json()["choices"][0]["message"]["content"] for r in replies]
        # the exported adapter is the same weights under another name; the base is not
        assert answers["student"] == answers["exported"]
        assert answers["student"] != answers["student-base"], answers
        assert _chat(url, "no-such-adapter", PROMPTS[0]).status_code == 404
        probe = probe_endpoint(url, "student", PROMPTS, requests=16, max_tokens=64)
        metrics = probe.metrics()
        assert not probe.errors, probe.errors
        record("vLLM endpoint time to first token (p50, adapter)", metrics["ttft_ms_p50"], "ms")
        record("vLLM endpoint generation (1 stream, adapter)", metrics["tokens_per_s"],
               "tokens/s")
    finally:
        stop.set()
        thread.join(60)
