"""GRPO (trl GRPOTrainer) on top of an SFT warm start; the task's answer check is the reward.

reward = task.score(task.extract(completion), gold) + verify_bonus when that answer is right
and task.verify(question, completion, gold) accepts the reasoning.

Warm start (`warm_start`): with "auto" (the default) and synthesised rows that have targets,
a short SFT phase on them comes first (`sft_steps`, default one pass) and GRPO starts from
its result: LoRA-SFT whose adapter GRPO goes on training when `lora_r` > 0 (the default
from 50M parameters), full SFT when GRPO trains every weight (`lora_r` = 0, tiny models:
LoRA cannot move a random-init model's output layer). A path starts from a given SFT
adapter or model instead, and so does a `model` that is itself an adapter directory (merged
first when `lora_r` = 0); "none" starts from the base model. The warm-start result lives
under the checkpoint dir, so a retry reuses it.

Prompts are the student's own prompt format (`plugins.models.prompting`, see `grpo_data`):
the same chat rendering SFT trains on and the endpoint serves. The metrics carry the reward
curve (`reward_curve`: [step, mean reward] per logged step) and its first/last quarter means.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import structlog

from plugins.trainers import callbacks, common, corpus, grpo_data, hparams
from stratosd import hookimpl
from stratosd.api import DataRow, TaskPack, TrainContext, Trainer
from stratosd.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)

WARM_START_PARAMS: dict[str, str] = {
    "warm_start": "'auto' (SFT on the synthesised rows first, when they have targets), "
                  "'none', or the path of an SFT adapter (or model) to start from",
    "sft_steps": "optimizer steps of the warm-start SFT phase (-1: one pass over the rows)",
    "sft_learning_rate": "learning rate of the warm-start SFT phase (0: the SFT default)",
}
WARM_DEFAULTS: dict[str, Any] = {"warm_start": "auto", "sft_steps": -1, "sft_learning_rate": 0.0}
WARM_DIR = "sft-warm-start"  # under ctx.checkpoint_dir: survives retries, never rotated
# Params of the GRPO job that the warm-start SFT phase shares when they are set.
SHARED_SFT_PARAMS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                     "max_length", "cpu_threads", "bf16", "gradient_checkpointing",
                     "per_device_train_batch_size", "progress_interval_s")


def make_reward(task: TaskPack, verify_bonus: float) -> Callable[..., list[float | None]]:
    """The trl reward function for a task (completions are plain strings)."""

    def task_reward(prompts: list[str], completions: list[str], answer: list[str],
                    question: list[str], **_: Any) -> list[float | None]:
        rewards: list[float | None] = []
        for text, gold, q in zip(completions, answer, question, strict=True):
            reward = float(task.score(task.extract(text), gold))
            if reward > 0 and verify_bonus and task.verify(q, text, gold):
                reward += verify_bonus
            rewards.append(reward)
        return rewards

    return task_reward


@dataclass
class WarmStart:
    """Where GRPO starts: the model ref to load, the portable base ref, what was done."""

    ref: str
    base_ref: str
    source: str  # "sft" (trained here), "adapter" / "model" (given), "none"
    metrics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What the train card and metrics say about the warm start."""
        out: dict[str, Any] = {"source": self.source, "ref": self.ref}
        for key in ("steps", "first_loss", "final_loss", "train_time_s", "reused", "stopped"):
            if key in self.metrics:
                out[key] = self.metrics[key]
        return out


def warm_options(params: dict[str, Any]) -> dict[str, Any]:
    """The warm-start params with their defaults; ConfigError names a wrong one."""
    opts = {k: params.get(k, v) for k, v in WARM_DEFAULTS.items()}
    if not isinstance(opts["warm_start"], str) or not opts["warm_start"]:
        raise ConfigError(f"warm_start must be 'auto', 'none' or a path, got "
                          f"{opts['warm_start']!r}", hint="e.g. warm_start = \"auto\"",
                          field="train.warm_start")
    if opts["warm_start"] not in ("auto", "none") and \
            not Path(opts["warm_start"]).expanduser().is_dir():
        raise ConfigError(f"warm start {opts['warm_start']!r} is not a directory",
                          field="train.warm_start",
                          hint="pass an SFT adapter or model directory, 'auto' or 'none'")
    if isinstance(opts["sft_steps"], bool) or not isinstance(opts["sft_steps"], int) \
            or opts["sft_steps"] == 0 or opts["sft_steps"] < -1:
        raise ConfigError(f"sft_steps must be a positive integer or -1, got "
                          f"{opts['sft_steps']!r}", field="train.sft_steps",
                          hint="pass -1 for one pass over the rows, or warm_start = \"none\"")
    if isinstance(opts["sft_learning_rate"], bool) or \
            not isinstance(opts["sft_learning_rate"], int | float) or \
            opts["sft_learning_rate"] < 0:
        raise ConfigError(f"sft_learning_rate must be a number >= 0, got "
                          f"{opts['sft_learning_rate']!r}", field="train.sft_learning_rate",
                          hint="0 uses the SFT trainer's default for the model size")
    return opts


def adapter_base_ref(path: Path) -> str:
    """The base ref an adapter directory names (adapter_config.json)."""
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"adapter {str(path)!r} has no readable adapter_config.json: {exc}",
                          hint="pass an adapter written by the lora-sft trainer",
                          field="train.warm_start") from exc
    if not base:
        raise ConfigError(f"adapter {str(path)!r} names no base model",
                          hint="retrain the adapter or fix adapter_config.json",
                          field="train.warm_start")
    return str(base)


def approx_param_count(ref: str) -> int:
    """Parameters of the model at a resolved ref, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {ref!r} has no readable config: {exc}", field="args.model",
                          hint="pass a local model directory, a cached hub id or "
                               "config:NAME") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return common.param_count_of(model)


def is_peft(model: Any) -> bool:
    """True for a peft model (an adapter on a base)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _given(ref: str, field_name: str) -> WarmStart:
    from plugins.models.hf import is_adapter_dir

    path = Path(ref).expanduser()
    if not path.is_dir():
        raise ConfigError(f"warm start {ref!r} is not a directory", field=field_name,
                          hint="pass an SFT adapter or model directory, 'auto' or 'none'")
    if is_adapter_dir(path):
        return WarmStart(ref=str(path), base_ref=adapter_base_ref(path), source="adapter")
    return WarmStart(ref=str(path), base_ref=str(path), source="model")


def _reusable(out: Path, ctx_model: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a finished warm-start adapter for the same model and params, else None."""
    try:
        card = json.loads((out / "stratos_train.json").read_text())
    except (OSError, ValueError):
        return None
    metrics = card.get("metrics") or {}
    same = card.get("base_model") == ctx_model and card.get("params") == params
    weights = ("adapter_config.json", "model.safetensors")
    done = not metrics.get("stopped") and any((out / w).is_file() for w in weights)
    return dict(metrics) if same and done else None


class GRPOTrainerPlugin(Trainer):
    """Group Relative Policy Optimisation against the task's verifier, after an SFT warm start."""

    name: ClassVar[str] = "grpo"
    description: ClassVar[str] = ("GRPO with the task's answer check and verifier as reward "
                                  "(trl), from an SFT warm start")

    def __init__(self, model_seed: int = 0) -> None:
        self.model_seed = model_seed

    @classmethod
    def allowed(cls) -> dict[str, str]:
        """Every param GRPO accepts."""
        return hparams.allowed_params(hparams.GRPO_PARAMS, WARM_START_PARAMS)

    def warm_start(self, ctx: TrainContext, rows: list[DataRow],
                   opts: dict[str, Any]) -> WarmStart:
        """Decide where GRPO starts; run the SFT phase when that is the answer."""
        from plugins.models.hf import is_adapter_dir

        choice = str(opts["warm_start"])
        if choice not in ("auto", "none"):
            return _given(choice, "train.warm_start")
        if is_adapter_dir(ctx.model):  # the model is already an SFT result: start from it
            return _given(ctx.model, "args.model")
        with_targets = [r for r in rows if r.target.strip()]
        if choice == "none" or not with_targets:
            return WarmStart(ref=ctx.model, base_ref=ctx.model, source="none")
        return self.sft_phase(ctx, with_targets, len(rows), opts)

    def sft_phase(self, ctx: TrainContext, rows: list[DataRow], n_rows: int,
                  opts: dict[str, Any]) -> WarmStart:
        """SFT on the synthesised rows into checkpoint_dir/WARM_DIR (reused when done).

        LoRA-SFT when GRPO trains an adapter (it goes on training this one), else full SFT.
        """
        from plugins.trainers.lora_sft import LoraSFTTrainer
        from plugins.trainers.sft import FullSFTTrainer, SFTRecipe

        root = ctx.checkpoint_dir / WARM_DIR
        out = root / "model"
        lora = bool(ctx.params["lora_r"] if "lora_r" in ctx.params
                    else self.default_lora_r(ctx))
        trainer: SFTRecipe = (LoraSFTTrainer if lora else FullSFTTrainer)(
            model_seed=self.model_seed)
        params: dict[str, Any] = {k: ctx.params[k] for k in SHARED_SFT_PARAMS
                                  if k in ctx.params and (lora or not k.startswith("lora_"))}
        params.update(max_steps=int(opts["sft_steps"]), num_train_epochs=1,
                      save_steps=10**9, save_total_limit=1)
        if opts["sft_learning_rate"]:
            params["learning_rate"] = float(opts["sft_learning_rate"])
        reused = _reusable(out, ctx.model, params)
        if reused is not None:
            log.info("warm_start_reused", trainer=self.name, path=str(out))
            return WarmStart(ref=str(out), base_ref=ctx.model, source="sft",
                             metrics={**reused, "reused": True})
        shutil.rmtree(out, ignore_errors=True)  # an older result of another kind must not mix
        root.mkdir(parents=True, exist_ok=True)
        data = ctx.train_file
        if len(rows) < n_rows:  # rows without a target have nothing to imitate
            data = root / "rows.jsonl"
            data.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in rows))

        def progress(**kw: Any) -> None:
            ctx.progress(**{**kw, "message": f"sft warm start: {kw.get('message', '')}"})

        sub = TrainContext(model=ctx.model, train_file=data, out_dir=out,
                           checkpoint_dir=root / "checkpoints", params=params, task=ctx.task,
                           seed=ctx.seed, progress=progress, should_stop=ctx.should_stop)
        log.info("warm_start_sft", trainer=self.name, sft_trainer=trainer.name, rows=len(rows),
                 steps=params["max_steps"])
        metrics = trainer.train(sub)
        return WarmStart(ref=str(out), base_ref=ctx.model, source="sft", metrics=metrics)

    def default_lora_r(self, ctx: TrainContext) -> int:
        """GRPO's default LoRA rank for ctx.model's size (0: full weights), from its config."""
        from plugins.models.hf import resolve_model

        n_params = approx_param_count(resolve_model(ctx.model, seed=self.model_seed))
        return int(hparams.size_defaults(n_params, self.name)["lora_r"])

    def train(self, ctx: TrainContext) -> dict[str, Any]:
        """Warm start, then roll out, reward with the task, update; saves as the SFT trainers."""
        hparams.check_param_names(self.name, ctx.params, self.allowed())
        if ctx.task is None:
            raise ConfigError("grpo needs a task: its answer check is the reward",
                              hint="pass `task` to the train step", field="args.task")
        opts = warm_options(ctx.params)
        rows = corpus.read_rows(ctx.train_file)
        common.quiet_libraries()
        common.seed_everything(ctx.seed)
        start = self.warm_start(ctx, rows, opts)
        if start.metrics.get("stopped"):  # asked to stop during the SFT phase
            return {"trainer": self.name, "stopped": True, "steps": 0,
                    "warm_start": start.summary(), "rows": len(rows)}
        common.seed_everything(ctx.seed)
        return self.grpo(ctx, rows, start, opts)

    def grpo(self, ctx: TrainContext, rows: list[DataRow], start: WarmStart,
             opts: dict[str, Any]) -> dict[str, Any]:
        """The GRPO phase from `start`; writes the output dir and returns the metrics."""
        from trl import GRPOConfig

        from plugins.models.hf import eos_token_ids, load_model
        from plugins.trainers.lora_sft import lora_config
        from plugins.trainers.sft import prompt_format

        model: Any
        model, tokenizer = load_model(start.ref, seed=self.model_seed, for_training=True)
        cuda = common.cuda_available()
        n_params = common.param_count_of(model)
        overrides = {k: v for k, v in ctx.params.items() if k not in WARM_START_PARAMS}
        params = hparams.resolve_params(self.name, n_params, overrides, self.allowed(),
                                        cuda=cuda)
        params.update(opts)
        peft_config = None
        if is_peft(model):  # a warm adapter
            if not params["lora_r"]:
                # GRPO trains every weight of SFT's result (peft had frozen the base).
                model = model.merge_and_unload().requires_grad_(True)
        elif params["lora_r"]:
            peft_config = lora_config(params)
        base: Any = model.get_base_model() if is_peft(model) else model
        # Stop rollouts where served generation stops (eos and the template's end of turn).
        base.generation_config.eos_token_id = eos_token_ids(base, tokenizer)
        tokenizer.padding_side = "left"  # GRPO generates from the prompts
        records = grpo_data.grpo_records(rows, ctx.task, tokenizer)
        config = GRPOConfig(
            **hparams.training_kwargs(params, ctx, cuda=cuda),
            num_generations=params["num_generations"],
            max_completion_length=params["max_completion_length"],
            temperature=params["temperature"],
            beta=params["beta"],
            remove_unused_columns=False,
            log_completions=False,
        )
        assert ctx.task is not None  # checked in train()
        callback = callbacks.make_callback(ctx, interval_s=float(params["progress_interval_s"]))
        trainer = grpo_data.trainer_class()(
            model=model,
            reward_funcs=make_reward(ctx.task, float(params["verify_bonus"])),
            args=config,
            train_dataset=corpus.hf_dataset(records),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[callback],
        )
        callbacks.drop_printer(trainer)
        log.info("training_started", trainer=self.name, model=ctx.model, rows=len(rows),
                 params_m=round(n_params / 1e6, 3), warm_start=start.source)
        metrics = common.run_hf_trainer(trainer, ctx, callback, self.name,
                                        threads=int(params["cpu_threads"]))
        curve = grpo_data.reward_curve(trainer.state.log_history)
        first_q, last_q = grpo_data.quarter_means(curve)
        metrics.update(params_m=round(n_params / 1e6, 3), rows=len(rows), hyperparams=params,
                       first_reward=callback.first_reward, final_reward=callback.last_reward,
                       reward_curve=curve, reward_first_quarter=first_q,
                       reward_last_quarter=last_q, warm_start=start.summary(),
                       prompt_format=prompt_format(tokenizer))
        self.save(trainer, tokenizer, ctx, start, metrics)
        return metrics

    def save(self, trainer: Any, tokenizer: Any, ctx: TrainContext, start: WarmStart,
             metrics: dict[str, Any]) -> None:
        """The adapter (on the portable base ref) or the full model, tokenizer, train card."""
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        peft_model: Any = trainer.model
        kind = "adapter" if is_peft(peft_model) else "full"
        if kind == "adapter":
            # Only the trained adapter: a beta > 0 run also holds trl's frozen "ref" copy.
            peft_model.save_pretrained(str(ctx.out_dir), selected_adapters=["default"])
            common.set_adapter_base(ctx.out_dir, start.base_ref)
        else:
            trainer.save_model(str(ctx.out_dir))
        tokenizer.save_pretrained(str(ctx.out_dir))
        common.write_train_card(ctx.out_dir, ctx, kind, metrics, self.model_seed)


@hookimpl
def stratos_trainers() -> list[type[Trainer]]:
    """Register GRPO."""
    return [GRPOTrainerPlugin]
