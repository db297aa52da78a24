"""GRPO (trl GRPOTrainer): the task's answer check is the reward, its verifier adds a bonus.

reward = task.score(task.extract(completion), gold) + verify_bonus when that answer is right
and task.verify(question, completion, gold) accepts the reasoning. Prompts come from the
dataset's questions (task.prompt); the targets are not used. Small students train all
weights; from 50M parameters on, LoRA (lora_r > 0) keeps the optimizer state small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import structlog

from plugins.trainers import callbacks, common, corpus, hparams
from stratosd import hookimpl
from stratosd.api import TaskPack, TrainContext, Trainer
from stratosd.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)


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


class GRPOTrainerPlugin(Trainer):
    """Group Relative Policy Optimisation against the task's verifier."""

    name: ClassVar[str] = "grpo"
    description: ClassVar[str] = "GRPO with the task's answer check and verifier as reward (trl)"

    def __init__(self, model_seed: int = 0) -> None:
        self.model_seed = model_seed

    @classmethod
    def allowed(cls) -> dict[str, str]:
        """Every param GRPO accepts."""
        return hparams.allowed_params(hparams.GRPO_PARAMS)

    def train(self, ctx: TrainContext) -> dict[str, Any]:
        """Roll out, reward with the task, update; checkpoints and output as the SFT trainers."""
        hparams.check_param_names(self.name, ctx.params, self.allowed())
        if ctx.task is None:
            raise ConfigError("grpo needs a task: its answer check is the reward",
                              hint="pass `task` to the train step", field="args.task")
        from trl import GRPOConfig, GRPOTrainer

        from plugins.models.hf import load_model
        from plugins.trainers.lora_sft import lora_config

        rows = corpus.read_rows(ctx.train_file)
        common.quiet_libraries()
        common.seed_everything(ctx.seed)
        model, tokenizer = load_model(ctx.model, seed=self.model_seed, for_training=True)
        tokenizer.padding_side = "left"  # GRPO generates from the prompts
        cuda = common.cuda_available()
        n_params = common.param_count_of(model)
        params = hparams.resolve_params(self.name, n_params, ctx.params, self.allowed(), cuda=cuda)
        records = [{"prompt": corpus.prompt_for(ctx.task, r.question), "answer": r.answer,
                    "question": r.question} for r in rows]
        config = GRPOConfig(
            **hparams.training_kwargs(params, ctx, cuda=cuda),
            num_generations=params["num_generations"],
            max_completion_length=params["max_completion_length"],
            temperature=params["temperature"],
            beta=params["beta"],
            remove_unused_columns=False,
            log_completions=False,
        )
        callback = callbacks.make_callback(ctx, interval_s=float(params["progress_interval_s"]))
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=make_reward(ctx.task, float(params["verify_bonus"])),
            args=config,
            train_dataset=corpus.hf_dataset(records),
            processing_class=tokenizer,
            peft_config=lora_config(params) if params["lora_r"] else None,
            callbacks=[callback],
        )
        callbacks.drop_printer(trainer)
        log.info("training_started", trainer=self.name, model=ctx.model, rows=len(rows),
                 params_m=round(n_params / 1e6, 3))
        metrics = common.run_hf_trainer(trainer, ctx, callback, self.name,
                                        threads=int(params["cpu_threads"]))
        metrics.update(params_m=round(n_params / 1e6, 3), rows=len(rows), hyperparams=params,
                       first_reward=callback.first_reward, final_reward=callback.last_reward)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        kind = "adapter" if params["lora_r"] else "full"
        if kind == "adapter":
            peft_model: Any = trainer.model
            peft_model.save_pretrained(str(ctx.out_dir))
            common.set_adapter_base(ctx.out_dir, ctx.model)
        else:
            trainer.save_model(str(ctx.out_dir))
        tokenizer.save_pretrained(str(ctx.out_dir))
        common.write_train_card(ctx.out_dir, ctx, kind, metrics, self.model_seed)
        return metrics


@hookimpl
def stratos_trainers() -> list[type[Trainer]]:
    """Register GRPO."""
    return [GRPOTrainerPlugin]
