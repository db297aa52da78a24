"""Full-weight SFT (trl SFTTrainer): the student learns prompt → target, loss on the target only.

`SFTRecipe` holds the flow LoRA-SFT shares: validate params, load the model, tokenize the rows
in the student's prompt format (`plugins.models.prompting`: its chat template, else plain),
configure trl, train with the Stratos callback, save the result.
"""

from __future__ import annotations

from typing import Any, ClassVar

import structlog

from plugins.trainers import callbacks, common, corpus, hparams
from stratosd import hookimpl
from stratosd.api import DataRow, TrainContext, Trainer

log = structlog.stdlib.get_logger(__name__)


class SFTRecipe(Trainer):
    """Supervised fine-tuning with trl; subclasses choose LoRA or full weights."""

    name: ClassVar[str] = "sft-recipe"
    output_kind: ClassVar[str] = "full"
    extra_params: ClassVar[dict[str, str]] = {}
    supports_ranks: ClassVar[bool] = True  # rank-safe under torchrun (see distributed)
    supports_fsdp: ClassVar[bool] = True

    def __init__(self, model_seed: int = 0) -> None:
        self.model_seed = model_seed

    @classmethod
    def allowed(cls) -> dict[str, str]:
        """Every param this trainer accepts, with its meaning."""
        return hparams.allowed_params(cls.extra_params)

    def peft_config(self, params: dict[str, Any]) -> Any:
        """A peft config, or None to train every weight."""
        return None

    def train(self, ctx: TrainContext) -> dict[str, Any]:
        """Train on ctx.train_file; checkpoints go to ctx.checkpoint_dir, the model to out_dir."""
        from plugins.models.hf import load_model

        hparams.check_param_names(self.name, ctx.params, self.allowed())
        rows = corpus.read_rows(ctx.train_file)
        common.quiet_libraries()
        common.seed_everything(ctx.seed)
        model, tokenizer = load_model(ctx.model, seed=self.model_seed, for_training=True)
        cuda = common.cuda_available()
        n_params = common.param_count_of(model)
        params = hparams.resolve_params(self.name, n_params, ctx.params, self.allowed(), cuda=cuda)
        dataset = self.dataset(rows, ctx, tokenizer)
        trainer, callback = self.build(model, tokenizer, dataset, params, ctx, cuda=cuda)
        log.info("training_started", trainer=self.name, model=ctx.model, rows=len(rows),
                 params_m=round(n_params / 1e6, 3), resume=str(ctx.resume_from or ""))
        metrics = common.run_hf_trainer(trainer, ctx, callback, self.name,
                                        threads=int(params["cpu_threads"]))
        metrics.update(params_m=round(n_params / 1e6, 3), rows=len(rows),
                       hyperparams=params, prompt_format=prompt_format(tokenizer))
        self.save(trainer, tokenizer, ctx, metrics)
        return metrics

    def dataset(self, rows: list[DataRow], ctx: TrainContext, tokenizer: Any) -> Any:
        """The tokenized rows in the student's own prompt format, as it is served (prompting)."""
        return corpus.hf_dataset(corpus.sft_examples(rows, ctx.task, tokenizer))

    def build(self, model: Any, tokenizer: Any, dataset: Any, params: dict[str, Any],
              ctx: TrainContext, *, cuda: bool) -> tuple[Any, Any]:
        """The trl SFTTrainer and its Stratos callback."""
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(
            **hparams.training_kwargs(params, ctx, cuda=cuda),
            max_length=params["max_length"],
            completion_only_loss=True,
            packing=False,
            dataset_num_proc=None,
            include_num_input_tokens_seen="non_padding",
        )
        callback = callbacks.make_callback(ctx, interval_s=float(params["progress_interval_s"]))
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=self.peft_config(params),
            callbacks=[callback],
        )
        callbacks.drop_printer(trainer)
        return trainer, callback

    def save(self, trainer: Any, tokenizer: Any, ctx: TrainContext,
             metrics: dict[str, Any]) -> None:
        """Write the full model and tokenizer to ctx.out_dir."""
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        trainer.save_model(str(ctx.out_dir))  # every rank: FSDP gathers the full weights
        if not trainer.is_world_process_zero():
            return
        tokenizer.save_pretrained(str(ctx.out_dir))
        common.write_train_card(ctx.out_dir, ctx, self.output_kind, metrics, self.model_seed)


def prompt_format(tokenizer: Any) -> str:
    """The examples' prompt format: "chat" (the tokenizer's chat template) or "plain"."""
    from plugins.models.prompting import has_chat_template

    return "chat" if has_chat_template(tokenizer) else "plain"


class FullSFTTrainer(SFTRecipe):
    """Full-weight SFT: every parameter trains; saves the whole model."""

    name: ClassVar[str] = "full-sft"
    description: ClassVar[str] = "supervised fine-tuning of all weights (trl SFTTrainer)"


@hookimpl
def stratos_trainers() -> list[type[Trainer]]:
    """Register full-weight SFT."""
    return [FullSFTTrainer]
