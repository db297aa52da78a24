"""LoRA-SFT (trl SFTTrainer + peft): trains low-rank adapters and saves only the adapter."""

from __future__ import annotations

from typing import Any, ClassVar

from plugins.trainers import common, hparams
from plugins.trainers.sft import SFTRecipe
from stratosd import hookimpl
from stratosd.api import TrainContext, Trainer


class LoraSFTTrainer(SFTRecipe):
    """LoRA on every linear layer (by default); the output dir is a loadable adapter."""

    name: ClassVar[str] = "lora-sft"
    description: ClassVar[str] = "LoRA supervised fine-tuning (trl SFTTrainer + peft)"
    output_kind: ClassVar[str] = "adapter"
    extra_params: ClassVar[dict[str, str]] = hparams.LORA_PARAMS
    supports_fsdp: ClassVar[bool] = False  # adapters replicate (ddp); sharded bases: not yet

    def peft_config(self, params: dict[str, Any]) -> Any:
        """The LoraConfig from params."""
        return lora_config(params)

    def save(self, trainer: Any, tokenizer: Any, ctx: TrainContext,
             metrics: dict[str, Any]) -> None:
        """Adapter + tokenizer; adapter_config names the portable base ref."""
        if not trainer.is_world_process_zero():  # ranks hold the same adapter: rank 0 saves
            return
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(str(ctx.out_dir))
        tokenizer.save_pretrained(str(ctx.out_dir))
        common.set_adapter_base(ctx.out_dir, ctx.model)
        common.write_train_card(ctx.out_dir, ctx, self.output_kind, metrics, self.model_seed)


def lora_config(params: dict[str, Any]) -> Any:
    """peft LoraConfig for a causal LM from lora_* params."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(params["lora_r"]),
        lora_alpha=int(params["lora_alpha"]),
        lora_dropout=float(params["lora_dropout"]),
        target_modules=params["lora_target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )


@hookimpl
def stratos_trainers() -> list[type[Trainer]]:
    """Register LoRA-SFT."""
    return [LoraSFTTrainer]
