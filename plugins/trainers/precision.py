"""Training precision: which dtypes the weights, the compute and the saved model use.

Full SFT keeps fp32 master weights everywhere. On a CUDA device that supports bfloat16 the
forward and backward run under bf16 autocast (TrainingArguments `bf16=True`); on one that does
not (pre-Ampere), fp16 autocast with dynamic loss scaling (`fp16=True`); on CPU, plain fp32.
The optimizer always updates the fp32 weights, and the saved model is fp32 unless the job asks
for `save_dtype`. `decide` is pure (device capability in, dtypes out) so it is tested on CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from stratosd.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)

SAVE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Precision:
    """The dtypes of one training run."""

    device: str  # "cuda" | "cpu"
    weights: str  # dtype the trained weights (and so the optimizer's master copy) live in
    compute: str  # autocast dtype of matmuls and activations ("float32": no autocast)
    bf16: bool  # TrainingArguments.bf16 (bf16 autocast)
    fp16: bool  # TrainingArguments.fp16 (fp16 autocast + dynamic loss scaling)
    save: str  # dtype of the saved full weights

    @property
    def mixed(self) -> bool:
        """True when the run computes under bf16 or fp16 autocast."""
        return self.bf16 or self.fp16

    def as_dict(self) -> dict[str, Any]:
        """For metrics and the train card."""
        return {**asdict(self), "mixed": self.mixed}


def decide(*, cuda: bool, bf16_supported: bool, mixed: bool,
           save_dtype: str = "float32") -> Precision:
    """Dtypes for a device: fp32 weights always; bf16 autocast where the GPU supports it, fp16
    with loss scaling where it does not, fp32 compute on CPU or when `mixed` is off."""
    check_save_dtype(save_dtype)
    if not cuda:
        return Precision(device="cpu", weights="float32", compute="float32", bf16=False,
                         fp16=False, save=save_dtype)
    if not mixed:
        return Precision(device="cuda", weights="float32", compute="float32", bf16=False,
                         fp16=False, save=save_dtype)
    if bf16_supported:
        return Precision(device="cuda", weights="float32", compute="bfloat16", bf16=True,
                         fp16=False, save=save_dtype)
    return Precision(device="cuda", weights="float32", compute="float16", bf16=False,
                     fp16=True, save=save_dtype)


def check_save_dtype(value: Any) -> str:
    """save_dtype as given, or a ConfigError naming the field and the allowed values."""
    if value not in SAVE_DTYPES:
        raise ConfigError(
            f"training param 'save_dtype' must be one of {', '.join(SAVE_DTYPES)}, got {value!r}",
            hint="float32 keeps the trained master weights exactly; bfloat16/float16 halve the "
            "saved size", field="train.save_dtype")
    return str(value)


def device_bf16_supported() -> bool:
    """Whether the current CUDA device computes in bfloat16 natively (Ampere and later)."""
    import torch

    if not torch.cuda.is_available():
        return False
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def qlora_unavailable(*, cuda: bool) -> str | None:
    """Why this host cannot train on a 4-bit (NF4) base, in a few words; None when it can
    (Stratos trains QLoRA on CUDA only, though bitsandbytes 0.50 ships CPU kernels too;
    `stratos[qlora]` installs bitsandbytes)."""
    if not cuda:
        return "no CUDA here"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed here (stratos[qlora])"
    return None


def for_params(params: dict[str, Any], *, cuda: bool, mixed: bool | None = None) -> Precision:
    """The run's precision from its params (`bf16` asks for mixed precision on a GPU)."""
    want = bool(params.get("bf16", False)) if mixed is None else mixed
    return decide(cuda=cuda, bf16_supported=device_bf16_supported() if cuda else False,
                  mixed=want, save_dtype=str(params.get("save_dtype", "float32")))


def observed(precision: Precision, model: Any) -> Precision:
    """precision with `weights` as the model's trainable params really are: trl's SFTTrainer
    casts a k-bit (QLoRA) model's adapters to bf16, whatever was decided before."""
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
    if len(dtypes) != 1 or precision.weights in dtypes:
        return precision
    found = dtypes.pop()
    log.info("trained_weights_dtype", decided=precision.weights, found=found)
    return replace(precision, weights=found)


def to_master_weights(model: Any, precision: Precision) -> Any:
    """The model with every floating-point weight in the master dtype (fp32): a bf16 checkpoint
    is upcast once here, so AdamW never updates bf16 weights."""
    import torch

    want = getattr(torch, precision.weights)
    if any(p.is_floating_point() and p.dtype != want for p in model.parameters()):
        log.info("weights_upcast", to=precision.weights)
        model = model.to(want)
    return model


def cast_saved_weights(out_dir: Path, dtype: str) -> list[str]:
    """Rewrite out_dir's safetensors files with floating tensors in `dtype` and record it in
    config.json (so `dtype="auto"` loads it so); returns the files rewritten."""
    if dtype == "float32":
        return []
    import json

    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, dtype)
    done = []
    for path in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(str(path))
        cast = {k: (v.to(target) if v.is_floating_point() else v) for k, v in tensors.items()}
        save_file(cast, str(path), metadata={"format": "pt"})
        done.append(path.name)
    cfg_path = out_dir / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = dtype
        cfg.pop("torch_dtype", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return done
