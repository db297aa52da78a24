"""Pipeline step `deploy`: serve the model on an OpenAI-compatible endpoint until stopped.

Args: `{deployer: "builtin", model: str, served_name: str, host: "127.0.0.1", port: 0,
task: TaskSpec dict, load_requests: 8, load_max_tokens: 32, load_timeout_s: 60,
params: {...}}`; optional input `model` (a trained model or adapter dir). Once the endpoint
is healthy, a short probe (`deploy_probe`: load_requests streamed chat requests on the task's
own test prompts, a generic prompt without `task`) measures TTFT, time per output token and
whole-request latency, then `ready` is sent with those metrics. When every probe request
fails the endpoint is not usable: the step fails (JobFailed, naming the URL and the first
error), the deployer stops the server, and nothing is announced. Otherwise the step returns
only after the agent asks it to stop; the endpoint lives as long as it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import structlog

from agents.stepctx import StepContext
from agents.steps.deploy_probe import GENERIC_PROMPT, probe_endpoint
from schemas.specs import TaskSpec
from stratosd.api import DeployContext
from stratosd.errors import ConfigError, JobFailed, MissingDependency
from stratosd.plugins import lookup

log = structlog.stdlib.get_logger(__name__)

ARGS = ("deployer", "model", "served_name", "host", "port", "task", "load_requests",
        "load_max_tokens", "load_timeout_s", "params")


def _arg(args: dict[str, Any], name: str, default: float, lo: float,
         integer: bool = True) -> float:
    value = args.get(name, default)
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or value < lo:
        raise ConfigError(f"deploy step `{name}` must be {'an integer' if integer else 'a number'}"
                          f" >= {lo:g}, got {value!r}", hint=f"fix train.deploy.{name}",
                          field=f"args.{name}")
    return float(value)


def probe_prompts(ctx: StepContext, count: int) -> list[str]:
    """The task pack's prompts for its first `count` test examples (generic without a task)."""
    raw = ctx.args.get("task")
    if raw is None:
        log.warning("probe_generic_prompt", hint="pass `task` so latency is measured on the "
                    "task's own prompts")
        return [GENERIC_PROMPT]
    try:
        spec = msgspec.convert(raw, TaskSpec)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"bad task spec: {exc}", field="args.task",
                          hint="pass a TaskSpec dict {name, params}") from exc
    task = ctx.plugins.task(spec.name, spec.params)
    examples = task.examples("test")[:max(count, 1)]
    if not examples:
        raise ConfigError(f"task {spec.name!r} has no test examples to probe the endpoint with",
                          field="args.task", hint="give the task a test split")
    return [task.prompt(ex.question) for ex in examples]


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
    load_requests = int(_arg(args, "load_requests", 8, 0))
    load_max_tokens = int(_arg(args, "load_max_tokens", 32, 1))
    load_timeout_s = _arg(args, "load_timeout_s", 60.0, 1, integer=False)
    prompts = probe_prompts(ctx, load_requests) if load_requests > 0 else []
    model, adapter = _model_and_adapter(ctx)
    served_name = str(args.get("served_name") or "student")
    state: dict[str, Any] = {}

    def on_ready(*, url: str, model: str = served_name, **extra: Any) -> None:
        metrics: dict[str, float] = {}
        if prompts:
            probe = probe_endpoint(url, model, prompts, requests=load_requests,
                                   max_tokens=load_max_tokens, timeout_s=load_timeout_s,
                                   should_stop=ctx.should_stop)
            metrics = probe.metrics()
            if ctx.should_stop():
                return  # cancelled while probing: the deployer's loop ends at once
            if probe.errors and not probe.samples:
                # raised inside serve(): the deployer's finally stops the server
                raise JobFailed(
                    f"endpoint {url} is not usable: all {probe.requests} probe requests "
                    f"failed, the first with {probe.errors[0]}",
                    hint="see the job log for the server's output; check the model loads and "
                    "answers a chat request")
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
