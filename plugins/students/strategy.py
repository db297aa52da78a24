"""Which students fit which server, and how: one device, data parallel, or fully sharded.

`candidates.estimate_memory` is one process's training memory. Spread over the N devices of a
server (the trainer launches one rank per device, `plugins.trainers.distributed`), with the
job's global batch b split into b/N per rank:

    single   one device, batch b                  = estimate_memory(b)
    ddp      every device holds a replica         = estimate_memory(b/N) + gradient buckets
             (DDP copies the trainable gradients into its all-reduce buckets: T * grad bytes,
             fp32 for full SFT's master weights)
    fsdp     weights, gradients and optimizer state sharded over N; activations (and a packed
             batch's mask) per rank; plus the full weights of the units being gathered (FSDP2
             prefetches one: two blocks) and of the largest unit (embeddings and head), in the
             compute dtype (FSDP's mixed-precision policy gathers them so: no autocast copies):
             = (weights + train state) / N + activations(b/N) + (2 * block + V * h) * a

Everything else (headroom, runtime) is as in `candidates.fit`. CPU hosts have one "device"
(RAM shared by all ranks), so only `single` is offered there. Heavy imports happen inside
functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from plugins.students.candidates import (
    GPU_RUNTIME_MIB,
    MIB,
    ModelDims,
    capacity_mib,
    estimate_memory,
    model_dims,
    student_memory_kwargs,
)
from schemas.specs import ServerOffer, StudentCandidate, StudentSpec
from stratosd.errors import ConfigError

STRATEGY_ORDER = ("single", "ddp", "fsdp")  # preferred first, among those that fit


@dataclass(frozen=True)
class StrategyFit:
    """One way to train a student on a server: per-device memory against the capacity."""

    strategy: str  # "single" | "ddp" | "fsdp"
    ranks: int
    per_device_mib: float
    capacity_mib: float
    fits: bool

    def describe(self) -> str:
        """'fsdp over 4 devices: 20,000 MiB per device of 81,920'."""
        how = "one device" if self.strategy == "single" else \
            f"{self.strategy} over {self.ranks} devices"
        return f"{how}: {self.per_device_mib:,.0f} MiB per device of {self.capacity_mib:,.0f}"


def strategy_memory(dims: ModelDims, strategy: str, ranks: int, *, trainer: str = "lora-sft",
                    seq_len: int = 512, batch: int = 8, lora_r: int = 16,
                    dtype_bytes: int = 4, gradient_checkpointing: bool = False,
                    runtime_mib: float = 0.0, quantization: str = "none",
                    packing: bool = False) -> float:
    """Training memory per device, MiB, of one strategy over `ranks` devices; `batch` is the
    job's micro-batch (its one-rank figure), which the ranks split."""
    n = 1 if strategy == "single" else max(ranks, 1)
    per_rank_batch = max(batch // n, 1)
    est = estimate_memory(dims, trainer=trainer, seq_len=seq_len, batch_size=per_rank_batch,
                          lora_r=lora_r, dtype_bytes=dtype_bytes,
                          gradient_checkpointing=gradient_checkpointing, runtime_mib=runtime_mib,
                          quantization=quantization, packing=packing)
    a = dtype_bytes
    parts = ("weights_mib", "optimizer_grad_mib", "weight_casts_mib", "activations_mib",
             "packed_mask_mib")
    slack = est["train_mib"] - runtime_mib - sum(est[k] for k in parts)
    if strategy == "single":
        return est["train_mib"]
    if strategy == "ddp":
        return est["train_mib"] + est["grads_mib"]
    if strategy != "fsdp":
        raise ConfigError(f"unknown strategy {strategy!r}", hint="single, ddp or fsdp",
                          field="train.strategy")
    block = (dims.n_params - 2 * dims.vocab * dims.hidden) / max(dims.layers, 1)
    gathered = (2 * max(block, 0) + dims.vocab * dims.hidden) * a / MIB
    sharded = (est["weights_mib"] + est["optimizer_grad_mib"]) / n
    per_rank = est["activations_mib"] + est["packed_mask_mib"]
    return sharded + per_rank + gathered + max(slack, 0.0) / n + runtime_mib


def strategy_fits(dims: ModelDims, offer: ServerOffer, *, headroom: float = 0.9,
                  **kw: Any) -> list[StrategyFit]:
    """Every strategy on an offer (single, and with several GPUs ddp and fsdp over all)."""
    cap, _what = capacity_mib(offer)
    gpu = offer.gpu_count > 0
    kw.setdefault("dtype_bytes", 2 if gpu else 4)
    kw.setdefault("runtime_mib", GPU_RUNTIME_MIB if gpu else 0.0)
    ranks = offer.gpu_count if offer.gpu_count > 1 else 1
    out = []
    for strategy in STRATEGY_ORDER if ranks > 1 else ("single",):
        mib = strategy_memory(dims, strategy, ranks, **kw)
        out.append(StrategyFit(strategy=strategy, ranks=1 if strategy == "single" else ranks,
                               per_device_mib=round(mib, 1), capacity_mib=cap,
                               fits=mib <= cap * headroom))
    return out


def best_fit(fits: Iterable[StrategyFit]) -> StrategyFit | None:
    """What the trainer should use: every device (ddp) when a replica fits one, else sharded
    (fsdp), else one device; None when nothing fits."""
    ok = {f.strategy: f for f in fits if f.fits}
    return ok.get("ddp") or ok.get("fsdp") or ok.get("single")


def fit_students(students: Iterable[StudentSpec | str], offer: ServerOffer, *,
                 trainer: str = "lora-sft", seq_len: int = 512, batch_size: int = 8,
                 lora_r: int = 16, gradient_checkpointing: bool = False,
                 headroom: float = 0.9) -> list[StudentCandidate]:
    """`candidates.fit` with strategies: a student that fits no single device may still fit
    the server sharded; the reason says how it trains."""
    out = []
    for student in students:
        ref = student.model if isinstance(student, StudentSpec) else student
        sp: Mapping[str, Any] = student.params if isinstance(student, StudentSpec) else {}
        try:
            dims = model_dims(ref)
        except (ConfigError, ValueError, KeyError) as exc:
            out.append(StudentCandidate(model=ref, fits=False, kept=False,
                                        reason=f"cannot size {ref}: {exc}"))
            continue
        kw = student_memory_kwargs(sp, gpu=offer.gpu_count > 0, seq_len=seq_len,
                                   batch_size=batch_size, lora_r=lora_r,
                                   gradient_checkpointing=gradient_checkpointing)
        kw["batch"] = kw.pop("batch_size")
        fits = strategy_fits(dims, offer, headroom=headroom, trainer=trainer, **kw)
        best = best_fit(fits)
        if trainer == "lora-sft" and best is not None and best.strategy == "fsdp":
            best = None  # lora-sft replicates (plugins.trainers.lora_sft.supports_fsdp)
        chosen = best or min(fits, key=lambda f: f.per_device_mib)
        reason = (f"fits with {best.describe()}" if best else
                  "does not fit: " + "; ".join(f.describe() for f in fits))
        out.append(StudentCandidate(model=ref, params_m=round(dims.n_params / 1e6, 3),
                                    est_train_mem_mib=chosen.per_device_mib,
                                    fits=best is not None, kept=best is not None,
                                    reason=reason))
    return out


def replica_fits_device(model: str, trainer: str, params: Mapping[str, Any],
                        headroom: float = 0.9) -> bool | None:
    """Whether one replica of the job's training state fits the first visible GPU (the train
    step shards when it does not); None when it cannot tell."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        dims = model_dims(model)
    except (ConfigError, ValueError, KeyError, OSError):
        return None
    cap = torch.cuda.get_device_properties(0).total_memory / MIB
    ranks = int(torch.cuda.device_count())
    requested = params.get("ranks")
    if isinstance(requested, int) and requested > 0:
        ranks = min(ranks, requested)
    bf16 = bool(params.get("bf16", dims.n_params >= 50_000_000))
    mib = strategy_memory(
        dims, "ddp" if ranks > 1 else "single", ranks, trainer=trainer,
        seq_len=int(params.get("max_length", 512)),
        batch=int(params.get("per_device_train_batch_size", 8)),
        lora_r=int(params.get("lora_r", 16)), dtype_bytes=2 if bf16 else 4,
        gradient_checkpointing=bool(params.get("gradient_checkpointing", False)),
        runtime_mib=GPU_RUNTIME_MIB, quantization=str(params.get("quantization", "none")),
        packing=bool(params.get("packing", False)))
    return mib <= cap * headroom
