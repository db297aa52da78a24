"""Evaluate a model on a task pack: accuracy with a Wilson interval, partial credit, latency.

A generator is any `Callable[[list[str]], list[GenOut-like]]` (objects with `text`,
`completion_tokens`, optionally `prompt_tokens`, `latency_ms`, `error`) taking user messages
(`task.prompt(question)`): a local model (`local_generator`, which renders them as the
endpoint does) or an OpenAI-compatible endpoint (`endpoint_generator`, which sends them as
chat messages). Both follow `plugins.models.prompting`, the format the student trained on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import msgspec
import structlog

from plugins.models import prompting
from schemas.stages import EvalRecord, EvalResult
from stratosd.api import Example, TaskPack
from stratosd.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)

MAX_RECORDS = 50
OUTPUT_CHARS = 400


class GenLike(Protocol):
    """What evaluation reads from a generation."""

    text: str
    completion_tokens: int


Generate = Callable[[list[str]], Sequence[Any]]


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def evaluate(
    task: TaskPack,
    examples: list[Example],
    generate: Generate,
    *,
    batch_size: int = 16,
    progress: Callable[..., None] | None = None,
    max_records: int = MAX_RECORDS,
) -> EvalResult:
    """Run generate over the examples in batches and score the answers with the task."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    n = len(examples)
    correct = 0
    partial_sum = 0.0
    latencies: list[float] = []
    completion = prompt = errors = 0
    gen_time = 0.0
    records: list[EvalRecord] = []
    started = time.perf_counter()
    for start in range(0, n, batch_size):
        batch = examples[start:start + batch_size]
        t0 = time.perf_counter()
        outs = list(generate([prompting.user_content(task, ex.question) for ex in batch]))
        batch_s = time.perf_counter() - t0
        gen_time += batch_s
        if len(outs) != len(batch):
            raise RuntimeError(f"generator returned {len(outs)} outputs for {len(batch)} prompts")
        for ex, out in zip(batch, outs, strict=True):
            error = getattr(out, "error", None)
            errors += error is not None
            predicted = None if error else task.extract(out.text)
            score = task.score(predicted, ex.answer)
            ok = score >= 1.0
            correct += ok
            partial_sum += task.partial_score(predicted, ex.answer)
            completion += int(getattr(out, "completion_tokens", 0) or 0)
            prompt += int(getattr(out, "prompt_tokens", 0) or 0)
            measured = float(getattr(out, "latency_ms", 0.0) or 0.0)
            latencies.append(measured if measured > 0 else 1000 * batch_s / len(batch))
            if len(records) < max_records:
                records.append(EvalRecord(id=ex.id, predicted=predicted, gold=ex.answer,
                                          correct=ok, output=out.text[:OUTPUT_CHARS],
                                          error=error))
        if progress is not None:
            done = start + len(batch)
            progress(done, n, unit="examples", accuracy=correct / done)
    elapsed = time.perf_counter() - started
    low, high = wilson_interval(correct, n)
    result = EvalResult(
        n=n, correct=correct, accuracy=correct / n if n else 0.0, ci_low=low, ci_high=high,
        partial=partial_sum / n if n else 0.0,
        latency_ms_mean=sum(latencies) / n if n else 0.0,
        latency_ms_p95=_percentile(latencies, 0.95),
        tokens_per_s=completion / gen_time if gen_time > 0 else 0.0,
        completion_tokens=completion, prompt_tokens=prompt, errors=errors,
        elapsed_s=elapsed, answers_per_s=n / gen_time if gen_time > 0 else 0.0,
        records=records,
    )
    log.info("eval_finished", task=task.name, n=n, accuracy=result.accuracy, errors=errors)
    return result


# --- generators -------------------------------------------------------------------------


class EndpointGen(msgspec.Struct, frozen=True, kw_only=True):
    """One endpoint answer with its measured latency (error set when the request failed)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    error: str | None = None


def local_generator(
    model_ref: str, seed: int = 0, max_new_tokens: int = 128, temperature: float = 0.0, *,
    loaded: tuple[Any, Any] | None = None,
) -> Generate:
    """A generator over a local model (config:, path, adapter or hub id), loaded once
    (`loaded`: model_ref's (model, tokenizer) already loaded by the caller, shared).

    Each prompt is one user message, rendered and encoded exactly as the endpoint does.
    """
    from plugins.models.hf import load_model

    model, tokenizer = loaded if loaded is not None else load_model(model_ref, seed=seed)

    def generate(prompts: list[str]) -> list[Any]:
        return prompting.generate_chat(
            model, tokenizer, [prompting.user_messages(p) for p in prompts],
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)

    return generate


def normalise_base_url(base_url: str) -> str:
    """`http://h:p`, `http://h:p/` and `http://h:p/v1` all become `http://h:p/v1`."""
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def endpoint_generator(
    base_url: str,
    model: str,
    max_new_tokens: int = 128,
    concurrency: int = 8,
    *,
    timeout_s: float = 120.0,
    retries: int = 3,
    api_key: str | None = None,
) -> Generate:
    """A generator that sends each prompt as one chat request, `concurrency` at a time."""
    import httpx

    base = normalise_base_url(base_url)
    url = base + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(timeout=timeout_s, headers=headers,
                          limits=httpx.Limits(max_connections=max(concurrency, 1)))
    if not model:
        model = _first_served_model(client, base)

    def one(prompt: str) -> EndpointGen:
        body = {"model": model, "messages": prompting.user_messages(prompt),
                "max_tokens": max_new_tokens, "temperature": 0.0}
        error = "no attempt"
        for attempt in range(retries + 1):
            t0 = time.perf_counter()
            try:
                resp = client.post(url, json=body)
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                ms = 1000 * (time.perf_counter() - t0)
                if resp.status_code == 200:
                    data = resp.json()
                    usage = data.get("usage") or {}
                    text = data["choices"][0]["message"].get("content") or ""
                    return EndpointGen(text=text, latency_ms=ms,
                                       prompt_tokens=int(usage.get("prompt_tokens", 0)),
                                       completion_tokens=int(usage.get("completion_tokens", 0)))
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in (408, 429) and resp.status_code < 500:
                    break
                if attempt < retries:
                    time.sleep(_retry_after(resp.headers.get("retry-after"), attempt))
                    continue
            if attempt < retries:
                time.sleep(0.2 * 2.0**attempt)
        return EndpointGen(text="", error=error)

    pool = ThreadPoolExecutor(max_workers=max(concurrency, 1), thread_name_prefix="eval")

    def generate(prompts: list[str]) -> list[Any]:
        return list(pool.map(one, prompts))

    return generate


def _first_served_model(client: Any, base: str) -> str:
    import httpx

    try:
        resp = client.get(base + "/models")
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"could not list the models served at {base}: {exc}",
                          hint="pass the served model name explicitly") from exc


def _retry_after(value: str | None, attempt: int) -> float:
    try:
        return min(float(value), 10.0) if value else 0.2 * 2.0**attempt
    except ValueError:
        return 0.2 * 2.0**attempt


def run_eval(
    task_name: str,
    params: dict[str, Any] | None = None,
    *,
    model: str | None = None,
    endpoint: str | None = None,
    served_model: str | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    seed: int = 0,
    progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Evaluate a local model or an endpoint on a task split; the result as a plain dict."""
    from stratosd.plugins import get_plugins

    if (model is None) == (endpoint is None):
        raise ConfigError("give exactly one of a model or an endpoint to evaluate",
                          hint="--model config:tiny or --endpoint http://host:port/v1")
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}", hint="use test or train", field="split")
    task = get_plugins().task(task_name, params or {})
    examples = task.examples(split)  # type: ignore[arg-type]
    if limit is not None:
        examples = examples[:limit]
    if endpoint is not None:
        generate = endpoint_generator(endpoint, served_model or "",
                                      max_new_tokens, concurrency=batch_size)
    else:
        assert model is not None
        generate = local_generator(model, seed=seed, max_new_tokens=max_new_tokens)
    result = evaluate(task, examples, generate, batch_size=batch_size, progress=progress)
    out: dict[str, Any] = msgspec.to_builtins(result)
    out.update(task=task_name, split=split, model=model, endpoint=endpoint)
    return out
