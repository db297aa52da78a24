"""Full-weight SFT (trl SFTTrainer): the student learns prompt → target, loss on the target only.

`SFTRecipe` holds the flow LoRA-SFT shares: validate params, load the model, tokenize the rows
in the student's prompt format (`plugins.models.prompting`: its chat template, else plain),
configure trl, train with the Stratos callback, save the result.

Full SFT trains fp32 master weights (a bf16 checkpoint is upcast), under bf16 autocast on a GPU
that supports it (`precision`), and saves fp32 unless `save_dtype` says otherwise. `packing`
uses trl's best-fit packing with padding-free batches; it is refused when the installed trl or
transformers would lose the completion-only loss or let packed examples attend to each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import structlog

from plugins.trainers import callbacks, common, corpus, hparams, precision
from plugins.trainers.precision import Precision
from stratosd import hookimpl
from stratosd.api import DataRow, TrainContext, Trainer
from stratosd.errors import ConfigError

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

    def preflight(self, overrides: Mapping[str, Any], *, cuda: bool) -> None:
        """Checks that need no model, run before loading it (a bad value fails fast)."""
        if "save_dtype" in overrides:
            precision.check_save_dtype(overrides["save_dtype"])

    def load(self, ctx: TrainContext, *, cuda: bool) -> tuple[Any, Any]:
        """(model, tokenizer) to train, on the CPU; the Trainer moves the model."""
        from plugins.models.hf import load_model

        return load_model(ctx.model, seed=self.model_seed, for_training=True)

    def precision(self, params: dict[str, Any], *, cuda: bool) -> Precision:
        """The run's dtypes (see `precision.decide`)."""
        return precision.for_params(params, cuda=cuda)

    def prepare(self, model: Any, params: dict[str, Any], prec: Precision) -> Any:
        """The model as it trains: full SFT keeps every weight in fp32 (the master copy)."""
        return precision.to_master_weights(model, prec)

    def train(self, ctx: TrainContext) -> dict[str, Any]:
        """Train on ctx.train_file; checkpoints go to ctx.checkpoint_dir, the model to out_dir."""
        hparams.check_param_names(self.name, ctx.params, self.allowed())
        cuda = common.cuda_available()
        self.preflight(ctx.params, cuda=cuda)
        rows = corpus.read_rows(ctx.train_file)
        common.quiet_libraries()
        common.seed_everything(ctx.seed)
        model, tokenizer = self.load(ctx, cuda=cuda)
        n_params = common.param_count_of(model)
        params = hparams.resolve_params(self.name, n_params, ctx.params, self.allowed(), cuda=cuda)
        prec = self.precision(params, cuda=cuda)
        model = self.prepare(model, params, prec)
        dataset = self.dataset(rows, ctx, tokenizer)
        trainer, callback = self.build(model, tokenizer, dataset, params, ctx, cuda=cuda,
                                       precision=prec)
        prec = precision.observed(prec, trainer.model)
        log.info("training_started", trainer=self.name, model=ctx.model, rows=len(rows),
                 params_m=round(n_params / 1e6, 3), resume=str(ctx.resume_from or ""),
                 weights=prec.weights, compute=prec.compute,
                 packing=bool(params.get("packing", False)),
                 gradient_checkpointing=bool(params["gradient_checkpointing"]))
        metrics = common.run_hf_trainer(trainer, ctx, callback, self.name,
                                        threads=int(params["cpu_threads"]))
        metrics.update(params_m=round(n_params / 1e6, 3), rows=len(rows),
                       hyperparams=params, prompt_format=prompt_format(tokenizer),
                       precision=prec.as_dict(), packed_rows=packed_rows(trainer, params))
        self.save(trainer, tokenizer, ctx, metrics)
        return metrics

    def dataset(self, rows: list[DataRow], ctx: TrainContext, tokenizer: Any) -> Any:
        """The tokenized rows in the student's own prompt format, as it is served (prompting)."""
        return corpus.hf_dataset(corpus.sft_examples(rows, ctx.task, tokenizer))

    def build(self, model: Any, tokenizer: Any, dataset: Any, params: dict[str, Any],
              ctx: TrainContext, *, cuda: bool,
              precision: Precision | None = None) -> tuple[Any, Any]:
        """The trl SFTTrainer and its Stratos callback."""
        from trl import SFTConfig, SFTTrainer

        packing = bool(params.get("packing", False))
        if packing:
            check_packing_support()
        config = SFTConfig(
            **hparams.training_kwargs(params, ctx, cuda=cuda, precision=precision),
            max_length=params["max_length"],
            completion_only_loss=True,
            packing=packing,
            # best-fit decreasing: whole examples per row, never split; with it trl batches
            # padding-free (position ids restart per example: no cross-example attention)
            packing_strategy="bfd",
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
        if packing:
            check_packed_trainer(trainer)
        return trainer, callback

    def save(self, trainer: Any, tokenizer: Any, ctx: TrainContext,
             metrics: dict[str, Any]) -> None:
        """Write the full model and tokenizer to ctx.out_dir."""
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        trainer.save_model(str(ctx.out_dir))  # every rank: FSDP gathers the full weights
        if not trainer.is_world_process_zero():
            return
        tokenizer.save_pretrained(str(ctx.out_dir))
        save_dtype = str(metrics.get("precision", {}).get("save", "float32"))
        if save_dtype != "float32":
            precision.cast_saved_weights(ctx.out_dir, save_dtype)
        common.write_train_card(ctx.out_dir, ctx, self.output_kind, metrics, self.model_seed)


PACKING_HINT = "set packing = false (or upgrade trl and transformers to what stratos[train] pins)"


def check_packing_support() -> None:
    """ConfigError unless transformers isolates packed examples without flash attention (it
    derives a block-diagonal mask from restarting position ids)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        raise ConfigError("packing = true: this transformers cannot keep packed examples from "
                          "attending to each other", hint=PACKING_HINT,
                          field="train.packing") from None


def check_packed_trainer(trainer: Any) -> None:
    """ConfigError unless trl packed with the loss mask intact and padding-free batches:
    otherwise packing would silently train on prompts or across example boundaries."""
    cols = set(getattr(trainer.train_dataset, "column_names", None) or ())
    if not cols & {"labels", "completion_mask"}:
        raise ConfigError("packing = true: the installed trl dropped the completion mask "
                          "while packing, so the loss would include the prompts",
                          hint=PACKING_HINT, field="train.packing")
    if not getattr(trainer, "padding_free", False) or "seq_lengths" not in cols:
        raise ConfigError("packing = true: the installed trl packs without restarting position "
                          "ids, so packed examples would attend to each other",
                          hint=PACKING_HINT, field="train.packing")


def packed_rows(trainer: Any, params: Mapping[str, Any]) -> int | None:
    """Rows of max_length the examples were packed into (None without packing)."""
    if not params.get("packing"):
        return None
    return len(trainer.train_dataset)


def prompt_format(tokenizer: Any) -> str:
    """The examples' prompt format: "chat" (the tokenizer's chat template) or "plain"."""
    from plugins.models.prompting import has_chat_template

    return "chat" if has_chat_template(tokenizer) else "plain"


class FullSFTTrainer(SFTRecipe):
    """Full-weight SFT: every parameter trains (fp32 master weights); saves the whole model."""

    name: ClassVar[str] = "full-sft"
    description: ClassVar[str] = "supervised fine-tuning of all weights (trl SFTTrainer)"
    extra_params: ClassVar[dict[str, str]] = {**hparams.SFT_PARAMS, **hparams.FULL_SFT_PARAMS}


@hookimpl
def stratos_trainers() -> list[type[Trainer]]:
    """Register full-weight SFT."""
    return [FullSFTTrainer]
