"""Trainer hyper-parameters: the names each trainer accepts, defaults by model size, checks.

Defaults follow the parameter count (tiny test models, mid-size, large); a job's overrides win;
an unknown name or a wrong type is a ConfigError naming the field and listing what is allowed.
`training_kwargs` maps them onto the TrainingArguments keywords SFTConfig and GRPOConfig share.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stratosd.api import TrainContext
from stratosd.errors import ConfigError

if TYPE_CHECKING:
    from plugins.trainers.precision import Precision

# Params every trainer understands, with what they mean (shown in errors).
COMMON_PARAMS: dict[str, str] = {
    "max_steps": "optimizer steps (-1: use num_train_epochs)",
    "num_train_epochs": "passes over the dataset when max_steps is -1",
    "learning_rate": "peak learning rate",
    "per_device_train_batch_size": "examples per device per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "max_length": "truncate prompt+completion to this many tokens",
    "save_steps": "checkpoint every N optimizer steps",
    "save_total_limit": "checkpoints kept on disk",
    "logging_steps": "log loss every N steps",
    "warmup_steps": "warm-up steps (a float below 1 is a fraction of all steps)",
    "weight_decay": "AdamW weight decay",
    "lr_scheduler_type": "transformers scheduler name (linear, cosine, constant, ...)",
    "max_grad_norm": "gradient clipping norm",
    "gradient_checkpointing": "recompute each layer's activations in backward: keeps only the "
                              "layer inputs (memory ~1/L of the activations, ~30% slower)",
    "bf16": "mixed precision on a GPU: bf16 autocast (fp16 + loss scaling where bf16 is "
            "unsupported); weights and optimizer stay fp32 for full SFT; ignored on CPU (fp32)",
    "progress_interval_s": "seconds between progress reports",
    "cpu_threads": "torch CPU threads while training (0: torch's default)",
    "ranks": "data-parallel ranks, one per device (0: every device the agent holds; 1 on CPU)",
    "strategy": "auto (one replica per rank), ddp, or fsdp (shard the training state)",
}
LORA_PARAMS: dict[str, str] = {
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling alpha",
    "lora_dropout": "LoRA dropout",
    "lora_target_modules": "modules that get adapters ('all-linear' or a list of names)",
    "quantization": "'none', or '4bit' for QLoRA: an NF4 base (bitsandbytes, CUDA only; "
                    "pip install stratos[qlora])",
}
# Params of both SFT trainers (full and LoRA).
SFT_PARAMS: dict[str, str] = {
    "packing": "pack several examples into each max_length row (best-fit, no padding; the "
               "loss stays on the completions and examples never attend to each other)",
}
# Params of full-weight SFT only.
FULL_SFT_PARAMS: dict[str, str] = {
    "save_dtype": "dtype of the saved weights: float32 (the trained master weights), "
                  "bfloat16 or float16",
}
QUANTIZATION_VALUES = ("none", "4bit")
GRPO_PARAMS: dict[str, str] = {
    "num_generations": "completions sampled per prompt",
    "max_completion_length": "tokens generated per completion",
    "temperature": "sampling temperature for the rollouts",
    "beta": "KL coefficient against the reference model (0: no reference model)",
    "verify_bonus": "extra reward when the task's verifier accepts the reasoning",
    "lora_r": LORA_PARAMS["lora_r"] + " (0: train full weights)",
    "lora_alpha": LORA_PARAMS["lora_alpha"],
    "lora_dropout": LORA_PARAMS["lora_dropout"],
    "lora_target_modules": LORA_PARAMS["lora_target_modules"],
}

TINY_MAX_PARAMS = 50_000_000  # below: test-size models trained on CPU in seconds
LARGE_MIN_PARAMS = 2_000_000_000  # from here: smaller batches, gradient checkpointing


def agent_job_threads() -> int:
    """The agent's CPU thread cap for jobs ($STRATOS_JOB_THREADS from agents.runner); 0: none."""
    try:
        return max(int(os.environ.get("STRATOS_JOB_THREADS", "") or 0), 0)
    except ValueError:
        return 0


def size_defaults(n_params: int, trainer: str, *, cuda: bool = False) -> dict[str, Any]:
    """Default hyper-parameters for a model of n_params parameters and a trainer name."""
    full = trainer != "lora-sft"
    if n_params < TINY_MAX_PARAMS:
        d: dict[str, Any] = {
            "learning_rate": 1e-3 if full else 3e-3, "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1, "lora_r": 8, "lora_alpha": 16,
            "logging_steps": 1, "save_steps": 50, "warmup_steps": 0, "max_length": 512,
            "gradient_checkpointing": False,
        }
    elif n_params < LARGE_MIN_PARAMS:
        d = {
            "learning_rate": 2e-5 if full else 2e-4, "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2, "lora_r": 16, "lora_alpha": 32,
            "logging_steps": 5, "save_steps": 100, "warmup_steps": 0.03, "max_length": 1024,
            "gradient_checkpointing": False,
        }
    else:
        d = {
            "learning_rate": 1e-5 if full else 1e-4, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 4, "lora_r": 16, "lora_alpha": 32,
            "logging_steps": 10, "save_steps": 100, "warmup_steps": 0.03, "max_length": 1024,
            "gradient_checkpointing": True,
        }
    d.update(
        max_steps=-1, num_train_epochs=3, save_total_limit=2, weight_decay=0.0,
        lr_scheduler_type="linear", max_grad_norm=1.0, lora_dropout=0.0,
        lora_target_modules="all-linear", bf16=cuda and n_params >= TINY_MAX_PARAMS,
        progress_interval_s=2.0, ranks=0, strategy="auto", packing=False, quantization="none",
        save_dtype="float32",
        # Tiny matrices gain nothing from intra-op threads, and lose a lot when cores are shared;
        # an agent's --threads cap (STRATOS_JOB_THREADS) is what it calibrated with: use it.
        cpu_threads=agent_job_threads() or (1 if n_params < TINY_MAX_PARAMS and not cuda else 0),
    )
    if trainer == "grpo":
        d.update(
            learning_rate=1e-5 if n_params >= TINY_MAX_PARAMS else 1e-3,
            num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=1,
            max_completion_length=32 if n_params < TINY_MAX_PARAMS else 256,
            temperature=1.0, beta=0.0, verify_bonus=0.5,
            lora_r=0 if n_params < TINY_MAX_PARAMS else 16,
        )
    return d


def check_param_names(trainer: str, overrides: Mapping[str, Any],
                      allowed: Mapping[str, str]) -> None:
    """Raise ConfigError naming the first unknown param and listing the allowed ones."""
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        listing = ", ".join(sorted(allowed))
        raise ConfigError(
            f"unknown training param {unknown[0]!r} for trainer {trainer!r}",
            hint=f"allowed params: {listing}",
            field=f"train.{unknown[0]}",
        )


def resolve_params(
    trainer: str,
    n_params: int,
    overrides: Mapping[str, Any],
    allowed: Mapping[str, str],
    *,
    cuda: bool = False,
) -> dict[str, Any]:
    """Size defaults for the allowed names, then overrides; an unknown name is a ConfigError."""
    check_param_names(trainer, overrides, allowed)
    defaults = size_defaults(n_params, trainer, cuda=cuda)
    params = {k: v for k, v in defaults.items() if k in allowed}
    params.update(overrides)
    cap = agent_job_threads()
    threads = params.get("cpu_threads")
    if cap and isinstance(threads, int) and not 0 < threads <= cap:
        params["cpu_threads"] = cap  # the agent's cap holds even against an override
    for key in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                "save_steps", "logging_steps", "max_length", "ranks"):
        if key in params and not isinstance(params[key], int):
            raise ConfigError(f"training param {key!r} must be an integer, got {params[key]!r}",
                              hint="pass a whole number", field=f"train.{key}")
    for key in ("packing", "gradient_checkpointing", "bf16"):
        if key in params and not isinstance(params[key], bool):
            raise ConfigError(f"training param {key!r} must be true or false, got "
                              f"{params[key]!r}", hint="pass a boolean", field=f"train.{key}")
    if "quantization" in params and params["quantization"] not in QUANTIZATION_VALUES:
        raise ConfigError(f"training param 'quantization' must be one of "
                          f"{', '.join(QUANTIZATION_VALUES)}, got {params['quantization']!r}",
                          hint="'4bit' trains LoRA on an NF4-quantized base (QLoRA, CUDA only)",
                          field="train.quantization")
    if "per_device_train_batch_size" in params and "gradient_accumulation_steps" in params:
        # The batch is the job's global one (one rank's figures); under torchrun each rank
        # takes its share, so any world size sees the same examples per optimizer step.
        from plugins.trainers.distributed import rank_batch

        params["per_device_train_batch_size"], params["gradient_accumulation_steps"] = \
            rank_batch(params["per_device_train_batch_size"],
                       params["gradient_accumulation_steps"])
    return params


def allowed_params(*extra: Mapping[str, str]) -> dict[str, str]:
    """COMMON_PARAMS merged with trainer-specific ones."""
    out = dict(COMMON_PARAMS)
    for more in extra:
        out.update(more)
    return out


def training_kwargs(params: Mapping[str, Any], ctx: TrainContext, *, cuda: bool,
                    precision: Precision | None = None) -> dict[str, Any]:
    """TrainingArguments keywords shared by SFTConfig and GRPOConfig (transformers >= 5.23:
    `activation_checkpointing`); `precision` defaults to the one `bf16` and the device ask for."""
    if precision is None:
        from plugins.trainers.precision import for_params

        precision = for_params(dict(params), cuda=cuda)
    checkpointing = bool(params["gradient_checkpointing"])
    return {
        "output_dir": str(ctx.checkpoint_dir),
        "max_steps": params["max_steps"],
        "num_train_epochs": params["num_train_epochs"],
        "learning_rate": params["learning_rate"],
        "per_device_train_batch_size": params["per_device_train_batch_size"],
        "gradient_accumulation_steps": params["gradient_accumulation_steps"],
        "save_strategy": "steps",
        "save_steps": params["save_steps"],
        "save_total_limit": params["save_total_limit"],
        "logging_steps": params["logging_steps"],
        "warmup_steps": params["warmup_steps"],
        "weight_decay": params["weight_decay"],
        "lr_scheduler_type": params["lr_scheduler_type"],
        "max_grad_norm": params["max_grad_norm"],
        "activation_checkpointing": checkpointing,
        # Non-reentrant: works with frozen inputs (LoRA) and needs no input grads.
        "activation_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None,
        "bf16": precision.bf16,
        "fp16": precision.fp16,
        "use_cpu": not cuda,
        "seed": ctx.seed,
        "data_seed": ctx.seed,
        "report_to": "none",
        "disable_tqdm": True,
        "save_only_model": False,  # optimizer, scheduler and RNG state make resume exact
        "dataloader_num_workers": 0,
        # Ranks (under torchrun) average the loss over all ranks' tokens, as one process would.
        "average_tokens_across_devices": True,
        "ddp_find_unused_parameters": False,
        **fsdp_kwargs(params),
    }


def fsdp_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """FSDP2 full sharding (one block per unit, full state dicts: a checkpoint loads into one
    process) when the launcher chose strategy "fsdp"; nothing otherwise."""
    if params.get("strategy") != "fsdp":
        return {}
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"version": 2, "state_dict_type": "FULL_STATE_DICT",
                        "activation_checkpointing": bool(params["gradient_checkpointing"])},
        "activation_checkpointing": False,  # FSDP does it per wrapped block (fsdp_config)
        "activation_checkpointing_kwargs": None,
    }
