"""Pipeline step `train`: fine-tune the student on the synthesised dataset with a trainer plugin.

Args: `{model, trainer: "lora-sft", params: {...}, task: TaskSpec dict, seed: 0}`.
Inputs: `dataset` (required, the synthesis JSONL) and `resume` (optional checkpoint dir).
Output artifact `model`: a LoRA adapter (adapter_config.json names the portable base ref) or a
full model directory. Checkpoints land in `state_dir/checkpoints` (survives retries) and are
uploaded through `ctx.checkpoint` after each save.
"""

from __future__ import annotations

from typing import Any

import msgspec
import structlog

from agents.stepctx import StepContext
from schemas.specs import TaskSpec
from stratosd.api import TrainContext
from stratosd.errors import ConfigError
from stratosd.plugins import lookup

log = structlog.stdlib.get_logger(__name__)

ARGS = ("model", "trainer", "params", "task", "seed")
METRIC_KEYS = ("final_loss", "first_loss", "steps", "train_time_s", "tokens_per_s",
               "train_tokens", "peak_rss_mib", "trainer")


def run(ctx: StepContext) -> dict[str, Any]:
    """Train, write the model artifact, return the training metrics."""
    args = ctx.args
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise ConfigError(f"unknown train step argument {unknown[0]!r}",
                          hint=f"allowed: {', '.join(ARGS)}", field=f"args.{unknown[0]}")
    model = args.get("model")
    if not model or not isinstance(model, str):
        raise ConfigError("train step needs `model` (a hub id, path or config:NAME)",
                          hint="pass the chosen student's model ref", field="args.model")
    dataset = ctx.inputs.get("dataset")
    if dataset is None:
        raise ConfigError("train step needs the `dataset` input artifact",
                          hint="run the synthesize step first and pass its `dataset` output",
                          field="inputs.dataset")
    trainer_name = str(args.get("trainer") or "lora-sft")
    params = dict(args.get("params") or {})
    task = None
    if args.get("task"):
        try:
            spec = msgspec.convert(args["task"], TaskSpec)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"bad task spec: {exc}", field="args.task",
                              hint="pass a TaskSpec dict {name, params}") from exc
        task = ctx.plugins.task(spec.name, spec.params)
    trainer_cls = lookup(ctx.plugins.trainers, trainer_name, "trainer")

    ckpt_dir = ctx.state_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume = ctx.inputs.get("resume")
    tctx = TrainContext(
        model=model,
        train_file=dataset,
        out_dir=ctx.output("model"),
        checkpoint_dir=ckpt_dir,
        params=params,
        task=task,
        resume_from=resume,
        seed=int(args.get("seed", 0)),
        progress=ctx.progress,
        checkpoint=ctx.checkpoint,
        should_stop=ctx.should_stop,
    )
    ctx.log(f"training {model} with {trainer_name}"
            + (f", resuming from {resume.name}" if resume else ""))
    metrics = trainer_cls().train(tctx)
    result = {k: metrics.get(k) for k in METRIC_KEYS}
    result["trainer"] = result["trainer"] or trainer_name
    result.update({k: v for k, v in metrics.items() if k not in result and k != "loss_curve"})
    result["loss_history"] = metrics.get("loss_curve", [])[-200:]  # for the report's plot
    result["model"] = model
    return dict(_jsonable(result))


def _jsonable(value: Any) -> Any:
    """Metrics as plain JSON values (tuples → lists, structs → dicts)."""
    return msgspec.json.decode(msgspec.json.encode(value, enc_hook=str))
