"""Pipeline step `deploy`: serve the model on an OpenAI-compatible endpoint until stopped.

Args: `{deployer: "builtin", model: str, served_name: str, host: "127.0.0.1", port: 0,
load_requests: 8, load_max_tokens: 32, params: {...}}`; optional input `model` (a trained
model or adapter dir). Once the endpoint is healthy, a short load (load_requests chat
requests) measures p50/p95 latency and tokens/s, then `ready` is sent with those metrics.
The step returns only after the agent asks it to stop; the endpoint lives as long as it runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import structlog

from agents.stepctx import StepContext
from stratosd.api import DeployContext
from stratosd.errors import ConfigError, MissingDependency
from stratosd.plugins import lookup

log = structlog.stdlib.get_logger(__name__)

ARGS = ("deployer", "model", "served_name", "host", "port", "load_requests", "load_max_tokens",
        "params")
LOAD_PROMPT = "Count from one to ten, then say done."


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def measure_endpoint(url: str, model: str, requests: int, max_tokens: int = 32,
                     prompt: str = LOAD_PROMPT) -> dict[str, float]:
    """Send `requests` chat requests one after another: latency percentiles and tokens/s."""
    import httpx

    latencies: list[float] = []
    tokens = 0
    errors = 0
    started = time.perf_counter()
    with httpx.Client(timeout=120) as client:
        for _ in range(requests):
            t0 = time.perf_counter()
            try:
                resp = client.post(url.rstrip("/") + "/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens, "temperature": 0.0})
                resp.raise_for_status()
            except httpx.HTTPError:
                errors += 1
                continue
            latencies.append(1000 * (time.perf_counter() - t0))
            tokens += int((resp.json().get("usage") or {}).get("completion_tokens", 0))
    elapsed = time.perf_counter() - started
    return {"latency_ms_p50": _percentile(latencies, 0.5),
            "latency_ms_p95": _percentile(latencies, 0.95),
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "load_requests": float(requests), "load_errors": float(errors)}


def _model_and_adapter(ctx: StepContext) -> tuple[str, Path | None]:
    given = ctx.inputs.get("model")
    model = ctx.args.get("model")
    if given is None:
        if not model or not isinstance(model, str):
            raise ConfigError("deploy step needs `model` (or a `model` input artifact)",
                              hint="pass a hub id, path or config:NAME", field="args.model")
        path = Path(model)
        given = path if (path / "adapter_config.json").is_file() else None
        if given is None:
            return model, None
    if (Path(given) / "adapter_config.json").is_file():
        cfg = json.loads((Path(given) / "adapter_config.json").read_text())
        return str(cfg.get("base_model_name_or_path") or model), Path(given)
    return str(given), None


def run(ctx: StepContext) -> dict[str, Any]:
    """Deploy, measure, report ready, then serve until should_stop()."""
    args = ctx.args
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise ConfigError(f"unknown deploy step argument {unknown[0]!r}",
                          hint=f"allowed: {', '.join(ARGS)}", field=f"args.{unknown[0]}")
    name = str(args.get("deployer") or "builtin")
    deployer = lookup(ctx.plugins.deployers, name, "deployer")()
    reason = deployer.unavailable_reason()
    if reason is not None:
        raise MissingDependency(f"deployer {name!r} cannot run on this host: {reason}",
                                hint="pick another deployer (e.g. builtin) or another server")
    model, adapter = _model_and_adapter(ctx)
    served_name = str(args.get("served_name") or "student")
    load_requests = int(args.get("load_requests", 8))
    load_max_tokens = int(args.get("load_max_tokens", 32))
    state: dict[str, Any] = {}

    def on_ready(*, url: str, model: str = served_name, **extra: Any) -> None:
        metrics = measure_endpoint(url, model, load_requests, load_max_tokens) \
            if load_requests > 0 else {}
        state.update(url=url, model=model, metrics=metrics)
        log.info("endpoint_ready", url=url, model=model, **metrics)
        ctx.ready(url=url, model=model, deployer=name, metrics=metrics, **extra)

    deployer.serve(DeployContext(
        model=model, adapter=adapter, host=str(args.get("host") or "127.0.0.1"),
        port=int(args.get("port") or 0), served_name=served_name,
        params=dict(args.get("params") or {}), ready=on_ready, should_stop=ctx.should_stop,
    ))
    return {"url": state.get("url", ""), "model": state.get("model", served_name),
            "deployer": name, "metrics": state.get("metrics", {}), "stopped": True}
