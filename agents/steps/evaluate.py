"""Pipeline step `evaluate`: accuracy, partial credit and latency of a model on a task split.

Args: `{task: TaskSpec dict, model: str, split: "test", limit: int | None, batch_size: 16,
max_new_tokens: 128, seed: 0}`. Optional input `model`: a trained model or adapter directory
that replaces `args.model`. Returns the EvalResult as a dict (at most 20 records).
"""

from __future__ import annotations

from typing import Any

import msgspec

from agents.stepctx import StepContext
from schemas.specs import TaskSpec
from stratosd.errors import ConfigError

ARGS = ("task", "model", "split", "limit", "batch_size", "max_new_tokens", "seed")
MAX_RECORDS = 20


def _int_arg(args: dict[str, Any], name: str, default: int | None, lo: int) -> int | None:
    value = args.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"evaluate step `{name}` must be an integer >= {lo}, got {value!r}",
                          hint=f"fix args.{name}", field=f"args.{name}")
    return value


def run(ctx: StepContext) -> dict[str, Any]:
    """Evaluate the model on the task split and return the result."""
    from plugins.models.evaluate import evaluate, local_generator

    args = ctx.args
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise ConfigError(f"unknown evaluate step argument {unknown[0]!r}",
                          hint=f"allowed: {', '.join(ARGS)}", field=f"args.{unknown[0]}")
    try:
        spec = msgspec.convert(args.get("task"), TaskSpec)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"bad task spec: {exc}", field="args.task",
                          hint="pass a TaskSpec dict {name, params}") from exc
    model_input = ctx.inputs.get("model")
    model = str(model_input) if model_input is not None else args.get("model")
    if not model or not isinstance(model, str):
        raise ConfigError("evaluate step needs `model` (or a `model` input artifact)",
                          hint="pass a hub id, path or config:NAME", field="args.model")
    split = args.get("split", "test")
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}", hint="use test or train",
                          field="args.split")
    limit = _int_arg(args, "limit", None, 1)
    batch_size = _int_arg(args, "batch_size", 16, 1) or 16
    max_new_tokens = _int_arg(args, "max_new_tokens", 128, 1) or 128
    seed = int(args.get("seed", 0))

    task = ctx.plugins.task(spec.name, spec.params)
    examples = task.examples(split)
    if limit is not None:
        examples = examples[:limit]
    ctx.log(f"evaluating {model} on {spec.name}/{split} ({len(examples)} examples)")
    generate = local_generator(model, seed=seed, max_new_tokens=max_new_tokens)
    result = evaluate(task, examples, generate, batch_size=batch_size, progress=ctx.progress,
                      max_records=MAX_RECORDS)
    out: dict[str, Any] = msgspec.to_builtins(result)
    out.update(model=model, task=spec.name, split=split)
    return out
