"""Pipeline step `train`: fine-tune the student on the synthesised dataset with a trainer plugin.

Args: `{model, trainer: "lora-sft", params: {...}, task: TaskSpec dict, seed: 0}`.
Inputs: `dataset` (required, the synthesis JSONL) and `resume` (optional checkpoint dir).
Output artifact `model`: a LoRA adapter (adapter_config.json names the portable base ref) or a
full model directory. Checkpoints land in `state_dir/checkpoints` (survives retries) and are
uploaded through `ctx.checkpoint` after each save.

Devices: the agent holds its whole device set for a training step (agents.runner
TRAINING_STEPS); the step uses all of it: one rank per device (params `ranks`, 0 = all,
`strategy` auto/ddp/fsdp), launched by torchrun (`plugins.trainers.distributed`). One rank
trains in this process, as before. A resumed checkpoint keeps its data order on any world size.

More than one server: the daemon (`stratosd.groups`) sends each member agent this step with
`group = {node_rank, nnodes, min_nodes, rdzv_id, host, endpoint | is_host, local_addr}`. The
rendezvous host picks a free port, reports it as a progress line (`rdzv_port`, which the daemon
passes to the other members) and serves the c10d store; every member launches its ranks under
torchrun's elastic rendezvous. The node that gets global rank 0 uploads the checkpoints and the
model; the others complete with `model_writer = false` and no model artifact.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import structlog

from agents.stepctx import StepContext
from plugins.trainers import distributed, hparams
from schemas.specs import TaskSpec
from stratosd.api import TrainContext, Trainer
from stratosd.errors import ConfigError
from stratosd.plugins import lookup

log = structlog.stdlib.get_logger(__name__)

ARGS = ("model", "trainer", "params", "task", "seed", "group")
METRIC_KEYS = ("final_loss", "first_loss", "steps", "train_time_s", "tokens_per_s",
               "train_tokens", "peak_rss_mib", "trainer", "ranks", "strategy")
RDZV_METRIC = "rdzv_port"  # the progress metric the rendezvous host reports its port in


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
    plan = launch_plan(trainer_cls, params, resume, model)
    rdzv = distributed.Rendezvous.from_args(args["group"]) if args.get("group") else None
    if rdzv is not None:
        if not getattr(trainer_cls, "supports_ranks", False):
            raise ConfigError(f"trainer {trainer_name!r} runs on one device: it cannot train "
                              "on a group of servers", hint="drop train.nodes, or use lora-sft "
                              "or full-sft", field="train.nodes")
        plan = group_plan(plan, params, rdzv)

    def checkpoint(path: Path) -> None:
        distributed.write_world(path, plan)  # how it was written: a resume may change it
        ctx.checkpoint(path)

    tctx = TrainContext(
        model=model,
        train_file=dataset,
        out_dir=ctx.output("model"),
        checkpoint_dir=ckpt_dir,
        params=distributed.rank_params(params, plan) if plan.launched else params,
        task=task,
        resume_from=resume,
        seed=int(args.get("seed", 0)),
        progress=ctx.progress,
        checkpoint=checkpoint if not plan.launched else ctx.checkpoint,
        should_stop=ctx.should_stop,
    )
    ctx.log(f"training {model} with {trainer_name}"
            + (f" on {plan.ranks} ranks ({plan.strategy}: {plan.reason})" if plan.launched
               else "") + (f", resuming from {resume.name}" if resume else ""))
    if plan.launched:
        threads = rank_threads(params, plan.ranks)
        if "cpu_threads" not in params and hparams.agent_job_threads():
            tctx.params["cpu_threads"] = threads  # the agent's cap, shared by the ranks
        if rdzv is not None and not rdzv.endpoint:
            rdzv = announce_rendezvous(ctx, rdzv)
        metrics = distributed.launch(trainer_name, tctx, plan, task=args.get("task") or None,
                                     threads=threads, rdzv=rdzv)
        if metrics.get("model_writer") is False:  # rank 0 ran on another node: no model here
            shutil.rmtree(tctx.out_dir, ignore_errors=True)
    else:
        distributed.prepare_resume(resume, 1)
        metrics = trainer_cls().train(tctx)
        metrics.update(ranks=1, strategy="single")
    result = {k: metrics.get(k) for k in METRIC_KEYS}
    result["trainer"] = result["trainer"] or trainer_name
    result.update({k: v for k, v in metrics.items() if k not in result and k != "loss_curve"})
    result["loss_history"] = metrics.get("loss_curve", [])[-200:]  # for the report's plot
    result["model"] = model
    return dict(_jsonable(result))


def launch_plan(trainer_cls: type[Trainer], params: dict[str, Any], resume: Path | None,
                model: str) -> distributed.LaunchPlan:
    """Ranks and strategy for this job on the devices the agent holds (see distributed)."""
    devices = distributed.device_count()
    fits = None
    if devices and str(params.get("strategy") or "auto") == "auto":
        from plugins.students.strategy import replica_fits_device

        fits = replica_fits_device(model, trainer_cls.name, params)
    return distributed.plan_launch(
        params, devices=devices,
        supports_ranks=bool(getattr(trainer_cls, "supports_ranks", False)),
        supports_fsdp=bool(getattr(trainer_cls, "supports_fsdp", False)),
        world=distributed.read_world(resume) if resume else None, fits_one_device=fits)


def group_plan(plan: distributed.LaunchPlan, params: dict[str, Any],
               rdzv: distributed.Rendezvous) -> distributed.LaunchPlan:
    """This node's launch in a group: always under torchrun, `plan.ranks` ranks on each node;
    the job's global batch must split over every world size the group may train with."""
    pd, ga = params.get("per_device_train_batch_size"), params.get("gradient_accumulation_steps")
    batch = (pd if isinstance(pd, int) else 0) * (ga if isinstance(ga, int) else 1)
    for nodes in range(rdzv.min_nodes, rdzv.nnodes + 1):
        if batch and distributed.split_batch(batch, 1, plan.ranks * nodes) is None:
            raise ConfigError(
                f"the global batch {batch} does not divide among {plan.ranks * nodes} ranks "
                f"({nodes} node(s) x {plan.ranks})",
                hint="make the batch a multiple of every rank count the group may train with "
                "(min_nodes..nodes)", field="train.nodes")
    return replace(plan, strategy="ddp" if plan.strategy == "single" else plan.strategy,
                   nodes=rdzv.nnodes,
                   reason=f"{plan.reason}; node {rdzv.node_rank} of {rdzv.nnodes} "
                   f"(elastic {rdzv.min_nodes}:{rdzv.nnodes})")


def announce_rendezvous(ctx: StepContext, rdzv: distributed.Rendezvous
                        ) -> distributed.Rendezvous:
    """The rendezvous host picks its store's port and tells the daemon (a progress line the
    daemon relays to the other members) before torchrun binds it."""
    rdzv = rdzv.with_port(distributed.free_port(rdzv.local_addr or rdzv.host))
    port = int(rdzv.endpoint.rsplit(":", 1)[1])
    ctx.progress(0, unit="", message=f"rendezvous at {rdzv.endpoint} ({rdzv.rdzv_id})",
                 force=True, **{RDZV_METRIC: port})
    ctx.log(f"group of {rdzv.nnodes} node(s): rendezvous host at {rdzv.endpoint}")
    return rdzv


def rank_threads(params: dict[str, Any], ranks: int) -> int:
    """CPU threads per rank: the job's cpu_threads, else the agent's cap shared by the ranks."""
    asked = params.get("cpu_threads")
    if isinstance(asked, int) and asked > 0:
        return asked
    cap = hparams.agent_job_threads() or (os.cpu_count() or 1)
    return max(1, cap // max(ranks, 1))


def _jsonable(value: Any) -> Any:
    """Metrics as plain JSON values (tuples → lists, structs → dicts)."""
    return msgspec.json.decode(msgspec.json.encode(value, enc_hook=str))
