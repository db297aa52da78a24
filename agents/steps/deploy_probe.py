"""The deploy step's latency probe: streamed chat requests, measured as a user sees them.

Requests go one after another (no concurrency: this is one user's view, not a load test) to
`{url}/chat/completions` with `stream: true`, and each is timed on the client:

- total: request sent → `data: [DONE]` read (the whole request, as before streaming);
- TTFT: request sent → the first chunk carrying output (non-empty `delta.content`, or a
  `finish_reason` when the model only emitted invisible tokens such as EOS);
- TPOT: (t_last - t_first) / (tokens - 1), t_last being the last chunk carrying output and
  tokens the server's `usage.completion_tokens` (content chunks when it sends no usage);
  undefined (no sample) for a one-token answer.

A request that fails (transport error, non-200 status, an `error` payload, a stream cut
before `[DONE]`, no output at all) counts in `errors` and gives no sample: percentiles are
over successful requests only and are absent, never 0, when there are none.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import httpx

log = structlog.stdlib.get_logger(__name__)

GENERIC_PROMPT = "Count from one to ten, then say done."


class ProbeRequestError(Exception):
    """One probe request failed; the message says how (status, body, transport error)."""


@dataclass(frozen=True)
class Sample:
    """One successful streamed request, client-side times in ms."""

    ttft_ms: float
    total_ms: float
    tokens: int
    tpot_ms: float | None


@dataclass
class ProbeResult:
    """Samples of the successful requests and the failures' messages."""

    url: str
    requests: int = 0
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """The EndpointInfo metrics: counts always, latency keys only when there are samples."""
        out = {"requests": float(self.requests), "errors": float(len(self.errors))}
        if not self.samples:
            return out
        ttft = [s.ttft_ms for s in self.samples]
        total = [s.total_ms for s in self.samples]
        tpot = [s.tpot_ms for s in self.samples if s.tpot_ms is not None]
        out.update(ttft_ms_p50=percentile(ttft, 0.5), ttft_ms_p95=percentile(ttft, 0.95),
                   latency_ms_p50=percentile(total, 0.5), latency_ms_p95=percentile(total, 0.95))
        if tpot:
            out.update(tpot_ms_p50=percentile(tpot, 0.5), tpot_ms_p95=percentile(tpot, 0.95))
        busy_s = sum(total) / 1000
        if busy_s > 0:
            out["tokens_per_s"] = sum(s.tokens for s in self.samples) / busy_s
        return out


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile of a non-empty sample (linear interpolation between ranks)."""
    if not values:
        raise ValueError("percentile of an empty sample")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _error_text(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip()[:200] or "empty body"
    return f"HTTP {status}: {message}"


def _stream_one(client: httpx.Client, url: str, body: dict[str, Any]) -> Sample:
    """Send one streamed chat request and time it; ProbeRequestError when it fails."""
    import httpx

    t_first: float | None = None
    t_last = 0.0
    pieces = 0
    usage_tokens: int | None = None
    done = False
    t0 = time.perf_counter()
    try:
        with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                raise ProbeRequestError(_error_text(resp.status_code, resp.read()))
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments and keep-alives
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    raise ProbeRequestError(f"bad stream chunk: {data[:200]!r}") from None
                if chunk.get("error"):
                    raise ProbeRequestError(f"error in stream: {chunk['error']}")
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        pieces += 1
                    if content or choice.get("finish_reason"):
                        t_first = now if t_first is None else t_first
                        t_last = now
                usage = chunk.get("usage")
                if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
    except httpx.HTTPError as exc:
        raise ProbeRequestError(f"{type(exc).__name__}: {exc}") from None
    t_end = time.perf_counter()
    if not done:
        raise ProbeRequestError("the stream ended before `data: [DONE]`")
    tokens = usage_tokens if usage_tokens is not None else pieces
    if t_first is None or tokens < 1:
        raise ProbeRequestError("the endpoint answered with no output tokens")
    tpot = 1000 * (t_last - t_first) / (tokens - 1) if tokens > 1 else None
    return Sample(ttft_ms=1000 * (t_first - t0), total_ms=1000 * (t_end - t0), tokens=tokens,
                  tpot_ms=tpot)


def probe_endpoint(
    url: str,
    model: str,
    prompts: Sequence[str],
    *,
    requests: int,
    max_tokens: int = 32,
    timeout_s: float = 60.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> ProbeResult:
    """Send `requests` streamed chat requests one at a time, cycling over `prompts`."""
    import httpx

    from plugins.models.prompting import user_messages

    if not prompts:
        raise ValueError("the probe needs at least one prompt")
    endpoint = url.rstrip("/") + "/chat/completions"
    result = ProbeResult(url=url)
    with httpx.Client(timeout=timeout_s) as client:
        for i in range(requests):
            if should_stop():
                break
            # Each prompt is one user message, as the student was trained (see prompting).
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0,
                    "messages": user_messages(prompts[i % len(prompts)]),
                    "stream": True, "stream_options": {"include_usage": True}}
            result.requests += 1
            try:
                result.samples.append(_stream_one(client, endpoint, body))
            except ProbeRequestError as exc:
                result.errors.append(str(exc))
                log.warning("probe_request_failed", url=url, request=i, error=str(exc))
    return result
