"""The built-in OpenAI-compatible server, exercised with real HTTP clients (openai, httpx)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from plugins.deployers.http_builtin import OpenAIServer
from plugins.models import hf


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return hf.resolve_model("config:tiny", cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(tiny_path: str) -> Iterator[OpenAIServer]:
    srv = OpenAIServer(tiny_path, served_name="tiny", max_new_tokens_cap=32)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server: OpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def _chat(client: openai.OpenAI, content: str, **kw: object) -> object:
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], **kw)  # type: ignore[call-overload]


def test_health_and_models(server: OpenAIServer, client: openai.OpenAI) -> None:
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")
    health = httpx.get(server.url.removesuffix("/v1") + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_equals_raw_prompt_generation(server: OpenAIServer, client: openai.OpenAI) -> None:
    prompt = "What is 2+2?\nThink step by step."
    resp = _chat(client, prompt, max_tokens=12)
    expected = hf.generate_batch(server.model, server.tokenizer, [prompt], max_new_tokens=12)[0]
    assert resp.choices[0].message.content == expected.text
    assert resp.choices[0].finish_reason == expected.finish_reason
    assert resp.usage.prompt_tokens == len(prompt)
    assert resp.usage.completion_tokens == expected.completion_tokens


def test_max_tokens_is_capped(client: openai.OpenAI) -> None:
    resp = _chat(client, "x", max_tokens=10_000)
    assert resp.usage.completion_tokens <= 32


def test_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    full = _chat(client, "Hello there", max_tokens=16)
    chunks = list(_chat(client, "Hello there", max_tokens=16, stream=True,
                        stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(p or "" for p in pieces) == full.choices[0].message.content
    assert len([p for p in pieces if p]) > 1  # token by token, not one final blob
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_ends_with_done(server: OpenAIServer) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "ab"}], "max_tokens": 5,
            "stream": True}
    with httpx.stream("POST", server.url + "/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["usage"]["completion_tokens"] >= 1


def test_stop_strings_cut_the_text(server: OpenAIServer, client: openai.OpenAI) -> None:
    full = _chat(client, "abc", max_tokens=20).choices[0].message.content
    assert len(full) >= 4
    stop = full[2:4]
    cut = _chat(client, "abc", max_tokens=20, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = _chat(client, "abc", max_tokens=20, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.find(stop)]


def test_completions_batch(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="tiny", prompt=["a", "bb", "ccc"], max_tokens=4)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    single = client.completions.create(model="tiny", prompt="bb", max_tokens=4)
    assert single.choices[0].text == resp.choices[1].text
    assert resp.usage.prompt_tokens == 6


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
         "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
         "temperature"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_bad_input_is_400_naming_the_field(server: OpenAIServer, body: dict, param: str) -> None:
    resp = httpx.post(server.url + "/chat/completions", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_invalid_json_and_unknown_path(server: OpenAIServer) -> None:
    bad = httpx.post(server.url + "/chat/completions", content=b"{nope")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert httpx.post(server.url + "/embeddings", json={}).status_code == 404
    assert httpx.get(server.url + "/nothing").status_code == 404


def test_faults_are_seeded_and_carry_retry_after(tiny_path: str) -> None:
    body = {"model": "t", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}

    def statuses() -> list[tuple[int, str | None]]:
        with OpenAIServer(tiny_path, served_name="t", faults={429: 0.3, 500: 0.2},
                          fault_seed=7) as srv, httpx.Client() as http:
            out = []
            for _ in range(30):
                r = http.post(srv.url + "/chat/completions", json=body)
                out.append((r.status_code, r.headers.get("retry-after")))
            return out

    first = statuses()
    assert first == statuses()  # same seed, same faults
    codes = [c for c, _ in first]
    assert {200, 429, 500} <= set(codes)
    assert all(ra is not None for c, ra in first if c == 429)


def test_openai_client_retries_through_faults(tiny_path: str) -> None:
    with OpenAIServer(tiny_path, served_name="t", faults={429: 0.3, 503: 0.2},
                      retry_after_s=0.01) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=8)
        for _ in range(5):
            resp = client.chat.completions.create(
                model="t", messages=[{"role": "user", "content": "x"}], max_tokens=2)
            assert resp.choices[0].message.content is not None


def test_model_dir_is_served_by_path(tiny_path: str, tmp_path: Path) -> None:
    with OpenAIServer(tiny_path) as srv:
        assert httpx.get(srv.url + "/models").json()["data"][0]["id"] == tiny_path


def test_stop_ends_keep_alive_connections(tiny_path: str) -> None:
    srv = OpenAIServer(tiny_path, served_name="t")
    srv.start()
    with httpx.Client() as http:
        assert http.get(srv.url + "/models").status_code == 200  # opens a pooled connection
        srv.stop()
        with pytest.raises(httpx.TransportError):
            http.get(srv.url + "/models", timeout=5)


# --- BPE students with real chat templates ------------------------------------------------


@pytest.fixture(scope="module", params=["config:qwen2-tiny", "config:llama3-tiny"])
def bpe_server(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAIServer]:
    path = hf.resolve_model(request.param, cache_dir=tmp_path_factory.mktemp("bpe"))
    srv = OpenAIServer(path, served_name="tiny", max_new_tokens_cap=32)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_bpe_chat_is_the_chat_template_rendering(bpe_server: OpenAIServer) -> None:
    from plugins.models import prompting

    client = openai.OpenAI(base_url=bpe_server.url, api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?\nThink step by step."}]
    resp = client.chat.completions.create(model="tiny", messages=messages,  # type: ignore[arg-type]
                                          max_tokens=12, extra_body={"return_token_ids": True})
    expected = prompting.generate_chat(bpe_server.model, bpe_server.tokenizer, [messages],
                                       max_new_tokens=12)[0]
    raw = resp.model_dump()
    assert raw["prompt_token_ids"] == expected.prompt_token_ids
    assert raw["choices"][0]["token_ids"] == expected.token_ids
    assert resp.choices[0].message.content == expected.text
    assert resp.usage is not None and resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    tok = bpe_server.tokenizer
    rendered = tok.decode(expected.prompt_token_ids)
    assert rendered == tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)


def test_bpe_streaming_matches_non_streaming(bpe_server: OpenAIServer) -> None:
    client = openai.OpenAI(base_url=bpe_server.url, api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model="tiny", messages=msgs,  # type: ignore[arg-type]
                                          max_tokens=16)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=16, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and full.usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_bpe_completions_take_the_tokenizer_special_tokens(bpe_server: OpenAIServer) -> None:
    body = {"model": "tiny", "prompt": ["Hello", "Hi there"], "max_tokens": 3,
            "return_token_ids": True}
    choices = httpx.post(bpe_server.url + "/completions", json=body).json()["choices"]
    tok = bpe_server.tokenizer
    assert [c["prompt_token_ids"] for c in choices] == [
        tok(p)["input_ids"] for p in body["prompt"]]  # Llama-3: BOS once; Qwen2: none
    assert all(1 <= len(c["token_ids"]) <= 3 for c in choices)
