"""LoRA-SFT (trl SFTTrainer + peft): trains low-rank adapters and saves only the adapter.

The base is loaded as stored (bf16 checkpoints stay bf16: it is frozen) and the adapters train
in fp32 under the run's autocast. `quantization = "4bit"` is QLoRA: the base's linear layers
are NF4 (bitsandbytes, double quantization, bf16 compute where the GPU supports it), prepared
with peft's `prepare_model_for_kbit_training` (the other weights in fp32), always under
autocast; trl's SFTTrainer then casts the adapters to bf16. It needs CUDA and
`stratos[qlora]`, checked before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import structlog

from plugins.trainers import common, hparams, precision
from plugins.trainers.precision import Precision
from plugins.trainers.sft import SFTRecipe
from stratosd import hookimpl
from stratosd.api import TrainContext, Trainer
from stratosd.errors import ConfigError, MissingDependency

log = structlog.stdlib.get_logger(__name__)

QLORA_HINT = ("QLoRA needs a CUDA GPU and bitsandbytes: pip install stratos[qlora] on a CUDA "
              "host, or set quantization = \"none\"")


class LoraSFTTrainer(SFTRecipe):
    """LoRA on every linear layer (by default); the output dir is a loadable adapter."""

    name: ClassVar[str] = "lora-sft"
    description: ClassVar[str] = "LoRA supervised fine-tuning (trl SFTTrainer + peft)"
    output_kind: ClassVar[str] = "adapter"
    extra_params: ClassVar[dict[str, str]] = {**hparams.SFT_PARAMS, **hparams.LORA_PARAMS}
    supports_fsdp: ClassVar[bool] = False  # adapters replicate (ddp); sharded bases: not yet

    def preflight(self, overrides: Mapping[str, Any], *, cuda: bool) -> None:
        """QLoRA's requirements (CUDA, bitsandbytes), before the model is loaded."""
        super().preflight(overrides, cuda=cuda)
        if quantization_of(overrides) == "4bit":
            check_qlora(cuda=cuda)

    def load(self, ctx: TrainContext, *, cuda: bool) -> tuple[Any, Any]:
        """The base as stored, or 4-bit (NF4) for QLoRA."""
        if quantization_of(ctx.params) == "4bit":
            return load_4bit(ctx.model, seed=self.model_seed)
        return super().load(ctx, cuda=cuda)

    def precision(self, params: dict[str, Any], *, cuda: bool) -> Precision:
        """QLoRA always computes in the 4-bit layers' compute dtype (bf16, else fp16)."""
        mixed = True if params.get("quantization") == "4bit" else None
        return precision.for_params(params, cuda=cuda, mixed=mixed)

    def prepare(self, model: Any, params: dict[str, Any], prec: Precision) -> Any:
        """The frozen base stays as loaded; peft adds fp32 adapters."""
        return model

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


def quantization_of(params: Mapping[str, Any]) -> str:
    """The requested quantization ('none' when absent); ConfigError for an unknown value."""
    value = params.get("quantization", "none")
    if value not in hparams.QUANTIZATION_VALUES:
        raise ConfigError(f"training param 'quantization' must be one of "
                          f"{', '.join(hparams.QUANTIZATION_VALUES)}, got {value!r}",
                          hint="'4bit' trains LoRA on an NF4-quantized base (QLoRA, CUDA only)",
                          field="train.quantization")
    return str(value)


def check_qlora(*, cuda: bool) -> None:
    """ConfigError without CUDA, MissingDependency without bitsandbytes (hint: the extra)."""
    if precision.qlora_unavailable(cuda=cuda) is None:
        return
    if not cuda:
        raise ConfigError("quantization = \"4bit\" (QLoRA) needs a CUDA GPU; this host has none "
                          "(Stratos trains on 4-bit bases on CUDA only)", hint=QLORA_HINT,
                          field="train.quantization")
    raise MissingDependency("quantization = \"4bit\" (QLoRA) needs bitsandbytes, which is "
                            "not installed", hint=QLORA_HINT, field="train.quantization")


def load_4bit(ref: str, *, seed: int, device: int | str | None = None) -> tuple[Any, Any]:
    """A base model with NF4 linear layers on `device` (default: this rank's GPU, LOCAL_RANK),
    prepared for k-bit training."""
    import os

    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from plugins.models.hf import is_adapter_dir, resolve_model

    local = resolve_model(ref, seed=seed)
    if is_adapter_dir(local):
        raise ConfigError(f"quantization = \"4bit\" trains a new adapter on a base model, but "
                          f"{ref!r} is an adapter", field="model",
                          hint="pass the adapter's base model, or set quantization = \"none\"")
    compute = torch.bfloat16 if precision.device_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=True,
        # packed bytes; FSDP would need the compute dtype here, and LoRA-SFT never shards
        bnb_4bit_quant_storage=torch.uint8)
    if device is None:
        device = int(os.environ.get("LOCAL_RANK", "0"))
    model = AutoModelForCausalLM.from_pretrained(local, quantization_config=quant, dtype=compute,
                                                 device_map={"": device})
    # Casts the weights that stay unquantized (norms, embeddings, head) to fp32. Checkpointing
    # is left to the Trainer (activation_checkpointing, non-reentrant): it reads the resolved
    # params, size defaults included, which do not exist yet when the model loads.
    model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
        model, use_gradient_checkpointing=False)
    tokenizer = AutoTokenizer.from_pretrained(local)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    log.info("model_loaded_4bit", model=ref, compute=str(compute).removeprefix("torch."))
    return model, tokenizer


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
