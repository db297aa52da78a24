"""`openai` teacher: any OpenAI-compatible chat endpoint (OpenAI, DeepSeek, vLLM, builtin).

The key is read from the environment variable named by `api_key_env` (never from the job
spec), kept out of reprs and logs, and redacted from any error text an endpoint echoes back.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx
import msgspec
import structlog

from plugins.teachers.common import (
    RetryPolicy,
    TeacherStats,
    cost_usd,
    param,
    parse_retry_after,
    price_for,
    retryable_status,
)
from schemas.specs import TeacherSpec
from stratosd import hookimpl
from stratosd.api import Generation, TaskPack, TeacherBackend, TeacherRequest
from stratosd.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
_KNOWN_PARAMS = frozenset({
    "base_url", "api_key_env", "max_concurrency", "timeout_s", "max_retries", "backoff_base_s",
    "backoff_max_s", "price_in_per_mtok", "price_out_per_mtok", "max_tokens_field",
    "system_prompt", "send_seed", "send_temperature",
})


class _Secret:
    """A string that never shows itself in repr/str (so tracebacks and logs stay clean)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


class _Failure(Exception):
    """One failed attempt: retryable or not, with the server's Retry-After if any."""

    def __init__(self, message: str, *, retry: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry = retry
        self.retry_after = retry_after


class OpenAITeacher(TeacherBackend):
    """Chat completions over httpx: bounded concurrency, retries with backoff, token costs."""

    name: ClassVar[str] = "openai"
    remote: ClassVar[bool] = True
    description: ClassVar[str] = "OpenAI-compatible chat API (OpenAI, DeepSeek, vLLM, builtin)"

    def __init__(self, spec: TeacherSpec, task: TaskPack | None = None) -> None:
        super().__init__(spec, task)
        p = spec.params
        if "api_key" in p:
            raise ConfigError(
                "teacher param `api_key` is not accepted (a key in a job spec travels over "
                "the bus and into logs): use `api_key_env`, the name of an environment "
                "variable holding the key",
                hint="export the key on the agent host and set api_key_env = \"MY_KEY_VAR\"",
                field="teacher.params.api_key",
            )
        unknown = sorted(set(p) - _KNOWN_PARAMS)
        if unknown:
            raise ConfigError(
                f"unknown openai teacher params: {', '.join(unknown)}",
                hint=f"known params: {', '.join(sorted(_KNOWN_PARAMS))}",
                field=f"teacher.params.{unknown[0]}",
            )
        self.base_url = str(param(p, "base_url", str, OPENAI_BASE_URL)).rstrip("/")
        self.api_key_env = param(p, "api_key_env", str, "OPENAI_API_KEY")
        self.max_concurrency = param(p, "max_concurrency", int, 16, minimum=1)
        self.timeout_s = param(p, "timeout_s", float, 60.0, minimum=0.001)
        self.retry = RetryPolicy(
            max_retries=param(p, "max_retries", int, 5, minimum=0),
            base_s=param(p, "backoff_base_s", float, 0.5, minimum=0.0),
            max_s=param(p, "backoff_max_s", float, 30.0, minimum=0.0),
        )
        self.price = price_for(spec.model, p)
        is_openai = self.base_url.startswith("https://api.openai.com")
        # OpenAI's newer models reject max_tokens; other servers may not know the new name.
        self.max_tokens_field = param(
            p, "max_tokens_field", str, "max_completion_tokens" if is_openai else "max_tokens"
        )
        self.system_prompt = param(p, "system_prompt", str, "")
        self.send_seed = param(p, "send_seed", bool, True)
        # Reasoning models (o-series, gpt-5) refuse any temperature but their default.
        self.send_temperature = param(p, "send_temperature", bool, True)
        self._key = self._read_key(explicit="api_key_env" in p, required=is_openai)
        self.stats = TeacherStats()
        self._client: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"OpenAITeacher(model={self.spec.model!r}, base_url={self.base_url!r})"

    def _read_key(self, *, explicit: bool, required: bool) -> _Secret | None:
        value = os.environ.get(self.api_key_env, "")
        if value:
            return _Secret(value)
        if explicit or required:
            raise ConfigError(
                f"environment variable {self.api_key_env} (api_key_env) is not set on this host",
                hint=f"export {self.api_key_env}=... where the agent runs, or set api_key_env "
                "to the variable that holds the key",
                field="teacher.params.api_key_env",
            )
        return None  # a local endpoint (vLLM, builtin) without auth

    def _redact(self, text: str) -> str:
        if self._key is not None and self._key.get():
            text = text.replace(self._key.get(), "***")
        return text[:500]

    def _ensure_client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            headers = {"Content-Type": "application/json"}
            if self._key is not None:
                headers["Authorization"] = f"Bearer {self._key.get()}"
            limits = httpx.Limits(
                max_connections=self.max_concurrency,
                max_keepalive_connections=self.max_concurrency,
            )
            self._client = httpx.AsyncClient(
                base_url=self.base_url, headers=headers, limits=limits,
                timeout=httpx.Timeout(self.timeout_s),
            )
            self._sem = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop
        assert self._sem is not None
        return self._client, self._sem

    async def generate(
        self,
        requests: Sequence[TeacherRequest],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """One chat completion per request, concurrently up to max_concurrency."""
        client, sem = self._ensure_client()
        gens = await asyncio.gather(*(
            self._one(client, sem, r, max_new_tokens, temperature, seed) for r in requests
        ))
        for g in gens:
            self.stats.add(g)
        return list(gens)

    def _body(self, req: TeacherRequest, max_new_tokens: int, temperature: float,
              seed: int | None) -> dict[str, Any]:
        messages = [{"role": "user", "content": req.prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        body: dict[str, Any] = {
            "model": self.spec.model,
            "messages": messages,
            self.max_tokens_field: max_new_tokens,
        }
        if self.send_temperature:
            body["temperature"] = temperature
        if seed is not None and self.send_seed:
            body["seed"] = seed
        return body

    async def _one(
        self, client: httpx.AsyncClient, sem: asyncio.Semaphore, req: TeacherRequest,
        max_new_tokens: int, temperature: float, seed: int | None,
    ) -> Generation:
        body = self._body(req, max_new_tokens, temperature, seed)
        start = time.perf_counter()
        attempt = 0
        while True:
            self.stats.attempts += 1
            try:
                async with sem:
                    gen = await self._attempt(client, body)
                return _with_latency(gen, (time.perf_counter() - start) * 1000)
            except _Failure as failure:
                if not failure.retry or attempt >= self.retry.max_retries:
                    log.warning("teacher_request_failed", teacher=self.spec.label,
                                attempts=attempt + 1, error=str(failure))
                    return Generation(text="", error=str(failure),
                                      latency_ms=(time.perf_counter() - start) * 1000)
                wait_s = self.retry.delay(attempt, failure.retry_after)
                log.debug("teacher_request_retry", teacher=self.spec.label, attempt=attempt + 1,
                          wait_s=round(wait_s, 3), error=str(failure))
                self.stats.retries += 1
                attempt += 1
                await asyncio.sleep(wait_s)

    async def _attempt(self, client: httpx.AsyncClient, body: dict[str, Any]) -> Generation:
        try:
            resp = await client.post("/chat/completions", json=body)
        except httpx.TimeoutException as exc:
            raise _Failure(f"timeout after {self.timeout_s}s ({type(exc).__name__})",
                           retry=True) from None
        except httpx.TransportError as exc:
            raise _Failure(self._redact(f"connection error: {type(exc).__name__}: {exc}"),
                           retry=True) from None
        if resp.status_code != 200:
            detail = self._redact(resp.text.strip().replace("\n", " "))
            raise _Failure(
                f"HTTP {resp.status_code} from {self.base_url}: {detail}",
                retry=retryable_status(resp.status_code),
                retry_after=_retry_after(resp.headers),
            )
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                refusal = choice["message"].get("refusal")
                raise _Failure(f"no content in the response (refusal: {refusal!r})", retry=False)
            usage = data.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Failure(
                f"malformed response from {self.base_url}: {self._redact(resp.text[:200])!r}",
                retry=False,
            ) from None
        return Generation(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost_usd(prompt_tokens, completion_tokens, self.price),
        )

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _retry_after(headers: httpx.Headers) -> float | None:
    """OpenAI's `retry-after-ms` (precise) first, then the standard Retry-After."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def _with_latency(gen: Generation, latency_ms: float) -> Generation:
    return msgspec.structs.replace(gen, latency_ms=latency_ms)


@hookimpl
def stratos_teacher_backends() -> list[type[TeacherBackend]]:
    """Register the `openai` teacher backend."""
    return [OpenAITeacher]
