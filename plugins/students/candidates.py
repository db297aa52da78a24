"""Students that fit the server, and the capacity pre-screen that drops weak ones early.

Memory model (bytes; P = all parameters, T = trainable ones, a = the compute dtype's bytes (4 on
CPU, 2 under bf16/fp16 autocast on a GPU), b = batch, s = sequence length, L = layers,
h = hidden, i = MLP width, q = query width, kv = key/value width, V = vocabulary;
P_lin = L * (2hq + 2h*kv + 3hi) the blocks' linear weights):

    weights      = P * 4                     full SFT: fp32 master weights (trainers.precision)
                 = P * a                     LoRA: the frozen base as loaded; GRPO: as loaded
                 = P_lin * 0.516 + (P - P_lin) * 4
                                             QLoRA: NF4 linear weights (4 bits + double-quantized
                                             block scales), the rest fp32 (prepare_model_for_kbit)
    grads        = P * 4 (full SFT) | P * a (GRPO full) | T * 4 (LoRA) | T * 2 (QLoRA: bf16)
    optimizer    = 2 Adam moments in the grads' dtype
    weight casts = (P_lin + V * h) * a       full SFT under autocast (a < 4): the low-precision
                                             copies of the matmul weights, saved for backward
    activations  = b * s * L * (18h + 3i + 2kv) * a      kept for backward, per token and layer
                 + b * s * L * (7h + i + 2kv) * a        LoRA only: adapter outputs and sums
                 + b * s * V * 4 * 3                     fp32 logits, log-softmax and their grad
                   (SDPA attention keeps no s^2 matrix; gradient checkpointing keeps each
                   layer's input (b * s * h in the residual stream's dtype: fp32 for full SFT)
                   plus 3 layers' worth: the recomputed layer, its gradients and backward's
                   temporaries, calibrated on CPU peak RSS, tests/plugins/test_precision.py)
    packed mask  = (b * s)^2                 packing: a padding-free batch is one row of b * s
                                             tokens; sdpa/eager attention gets a block-diagonal
                                             bool mask over it (flash attention needs none).
                                             Packed rows are full, so s is exactly max_length.
    train_mib    = (weights + grads + optimizer + casts + activations + mask) * 1.05 + runtime
    serve_mib    = weights (as served: P * a) + KV cache (2 * L * kv * s * b * a)
                   + one layer of activations + logits + runtime

runtime is the CUDA context and kernels (600 MiB) on a GPU and 0 for the CPU estimate. The
coefficients were calibrated against peak RSS on CPU (tests/plugins/test_students.py).
Heavy imports (torch, transformers) happen inside functions.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from schemas.specs import ServerOffer, StudentCandidate, StudentSpec, TaskSpec
from stratosd import hookimpl
from stratosd.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)

MIB = 1024 * 1024
GPU_RUNTIME_MIB = 600.0
ALLOCATOR_SLACK = 1.05
NF4_BYTES = 0.5 + 8 / 64 / 8 + 32 / (64 * 256) / 8  # 4 bits + fp8 absmax per 64 + fp32 per 256
CKPT_LAYERS = 3  # checkpointed backward: one layer's activations ~3 times (see the docstring)


@dataclass(frozen=True)
class ModelDims:
    """The shape numbers the memory model needs (from a config, or guessed from a count)."""

    n_params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        """Width of one of K or V per token and layer."""
        return self.kv_heads * self.head_dim

    @property
    def linear_params(self) -> int:
        """Weights of the blocks' linear layers (q, k, v, o, gate, up, down)."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_width
        return self.layers * (2 * h * q + 2 * h * kv + 3 * h * i)

    def lora_params(self, r: int) -> int:
        """Adapter parameters with rank r on every linear layer of every block."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_width
        per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
        return r * per_layer * self.layers


def dims_from_count(n_params: int, vocab: int = 32_000) -> ModelDims:
    """A Llama-shaped guess when only the parameter count is known (i ≈ 2.7h, L ≈ h/128)."""
    # P ≈ 12.1 h^2 L + 2 V h with L = h / 128  →  solve for h numerically.
    h = 256.0
    for _ in range(60):
        p = 12.1 * h**2 * max(h / 128, 2) + 2 * vocab * h
        h *= (n_params / p) ** 0.3
    hidden = max(64, int(round(h / 64)) * 64)
    layers = max(2, round(hidden / 128))
    heads = max(1, hidden // 128)
    return ModelDims(n_params=n_params, hidden=hidden, layers=layers,
                     intermediate=int(hidden * 2.7), vocab=vocab, heads=heads,
                     kv_heads=heads, head_dim=hidden // heads)


def _config_for(ref: str) -> Any:
    """A transformers config for a ref without loading weights."""
    from transformers import AutoConfig, LlamaConfig

    if ref.startswith("config:"):
        from plugins.models.hf import model_config_dict, parse_config_ref

        name, overrides = parse_config_ref(ref)
        return LlamaConfig(**model_config_dict(name, overrides))
    path = Path(ref).expanduser()
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return _config_for(str(base))
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else ref)
    except OSError as exc:
        raise ConfigError(f"cannot read the config of student {ref!r}: {exc}", field="students",
                          hint="use a local model dir, a reachable hub id or config:NAME") from exc


def model_dims(ref: str) -> ModelDims:
    """Shape numbers for a ref; the parameter count comes from a meta-device model (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _config_for(ref)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)  # type: ignore[no-untyped-call]
    n_params = int(sum(p.numel() for p in model.parameters()))
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", max(1, hidden // 128)))
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    return ModelDims(
        n_params=n_params, hidden=hidden, layers=int(text.num_hidden_layers),
        intermediate=int(getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden),
        vocab=int(text.vocab_size), heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
    )


def param_count(ref: str) -> int:
    """Parameters of a model ref, read from its config (no weights are loaded)."""
    return model_dims(ref).n_params


@dataclass(frozen=True)
class TrainBytes:
    """Bytes per element of each part of the training state (see the module docstring)."""

    weights: float  # per parameter of the model as held (QLoRA: see quantized_weights)
    grads: float  # per trainable parameter
    optimizer: float  # both Adam moments, per trainable parameter
    activations: float  # per saved activation element (the compute dtype)
    weight_casts: float  # autocast's copies of the matmul weights (0: none)
    residual: float  # the residual stream (what gradient checkpointing keeps per layer)


def train_bytes(trainer: str, *, dtype_bytes: int, lora: bool,
                quantization: str = "none") -> TrainBytes:
    """How a trainer holds its state when computing in `dtype_bytes` (4: fp32, 2: bf16/fp16)."""
    a = float(dtype_bytes)
    if lora and quantization == "4bit":  # trl casts QLoRA adapters to bf16
        return TrainBytes(weights=4.0, grads=2.0, optimizer=4.0, activations=a,
                          weight_casts=0.0, residual=4.0)
    if lora:
        return TrainBytes(weights=a, grads=4.0, optimizer=8.0, activations=a, weight_casts=0.0,
                          residual=a)
    if trainer == "full-sft":  # fp32 master weights, autocast below fp32 on a GPU
        return TrainBytes(weights=4.0, grads=4.0, optimizer=8.0, activations=a,
                          weight_casts=a if a < 4 else 0.0, residual=4.0)
    return TrainBytes(weights=a, grads=a, optimizer=2 * a, activations=a, weight_casts=0.0,
                      residual=a)  # GRPO on full weights trains them as loaded


def estimate_memory(
    params: int | ModelDims,
    *,
    trainer: str = "lora-sft",
    seq_len: int = 512,
    batch_size: int = 8,
    lora_r: int = 16,
    dtype_bytes: int = 4,
    gradient_checkpointing: bool = False,
    runtime_mib: float = 0.0,
    quantization: str = "none",
    packing: bool = False,
) -> dict[str, float]:
    """Training and serving memory in MiB with its parts (see the module docstring);
    `dtype_bytes` is the compute dtype (2 under bf16/fp16 autocast on a GPU, 4 on CPU)."""
    d = params if isinstance(params, ModelDims) else dims_from_count(int(params))
    a, b, s = dtype_bytes, batch_size, seq_len
    lora = trainer == "lora-sft" or (trainer == "grpo" and lora_r > 0)
    qlora = lora and trainer == "lora-sft" and quantization == "4bit"
    by = train_bytes(trainer, dtype_bytes=a, lora=lora, quantization=quantization if lora
                     else "none")
    if qlora:
        weights = d.linear_params * NF4_BYTES + (d.n_params - d.linear_params) * by.weights
    else:
        weights = d.n_params * by.weights
    trainable = d.lora_params(lora_r) if lora else d.n_params
    grads = trainable * by.grads
    optimizer = trainable * by.optimizer
    casts = (d.linear_params + d.vocab * d.hidden) * by.weight_casts
    per_token_layer = (18 * d.hidden + 3 * d.intermediate + 2 * d.kv_width) * by.activations
    if lora:
        per_token_layer += (7 * d.hidden + d.intermediate + 2 * d.kv_width) * by.activations
    logits = b * s * d.vocab * 4 * 3
    if gradient_checkpointing:
        acts = (b * s * d.layers * d.hidden * by.residual + CKPT_LAYERS * b * s * per_token_layer
                + logits)
    else:
        acts = b * s * d.layers * per_token_layer + logits
    mask = float((b * s) ** 2) if packing else 0.0
    total = weights + grads + optimizer + casts + acts + mask
    train = total * ALLOCATOR_SLACK / MIB + runtime_mib
    served = d.n_params * a  # the saved weights as a server loads them
    kv_cache = 2 * d.layers * d.kv_width * s * b * a
    serve_acts = b * s * (2 * d.hidden + 2 * d.intermediate) * a + b * d.vocab * 4
    serve = (served + kv_cache + serve_acts) * ALLOCATOR_SLACK / MIB + runtime_mib
    return {
        "train_mib": round(train, 1),
        "serve_mib": round(serve, 1),
        "weights_mib": round(weights / MIB, 1),
        "trainable_params": float(trainable),
        "grads_mib": round(grads / MIB, 1),
        "optimizer_mib": round(optimizer / MIB, 1),
        "optimizer_grad_mib": round((grads + optimizer) / MIB, 1),
        "weight_casts_mib": round(casts / MIB, 1),
        "activations_mib": round(acts / MIB, 1),
        "packed_mask_mib": round(mask / MIB, 1),
        "kv_cache_mib": round(kv_cache / MIB, 1),
        "runtime_mib": runtime_mib,
    }


def student_memory_kwargs(sp: Mapping[str, Any], *, gpu: bool, seq_len: int, batch_size: int,
                          lora_r: int, gradient_checkpointing: bool) -> dict[str, Any]:
    """estimate_memory keywords from a student's training params (they win over the defaults):
    the compute dtype follows the device (autocast on a GPU), plus QLoRA and packing."""
    return {
        "seq_len": int(sp.get("max_length", seq_len)),
        "batch_size": int(sp.get("per_device_train_batch_size", batch_size)),
        "lora_r": int(sp.get("lora_r", lora_r)),
        "dtype_bytes": 2 if gpu and bool(sp.get("bf16", True)) else 4,
        "gradient_checkpointing": bool(sp.get("gradient_checkpointing", gradient_checkpointing)),
        "quantization": str(sp.get("quantization", "none")),
        "packing": bool(sp.get("packing", False)),
    }


def _mib(x: float) -> str:
    return f"{x:,.0f} MiB"


def capacity_mib(offer: ServerOffer) -> tuple[float, str]:
    """Memory one training process can use on an offer: one GPU's memory, or RAM without GPUs."""
    if offer.gpu_count > 0:
        return float(offer.gpu_mem_mib), "GPU memory"
    return float(offer.ram_mib), "RAM (no GPU)"


def fit(
    students: Iterable[StudentSpec | str],
    offer: ServerOffer,
    *,
    trainer: str = "lora-sft",
    seq_len: int = 512,
    batch_size: int = 8,
    lora_r: int = 16,
    gradient_checkpointing: bool = False,
    quantization: str = "none",
    headroom: float = 0.9,
) -> list[StudentCandidate]:
    """Each student with its memory estimate, and whether it trains and serves on the offer
    (the job's settings; a student's own params win over them)."""
    cap, what = capacity_mib(offer)
    gpu = offer.gpu_count > 0
    out = []
    for student in students:
        ref = student.model if isinstance(student, StudentSpec) else student
        sp = student.params if isinstance(student, StudentSpec) else {}
        try:
            dims = model_dims(ref)
        except (ConfigError, ValueError, KeyError) as exc:
            out.append(StudentCandidate(model=ref, fits=False, kept=False,
                                        reason=f"cannot size {ref}: {exc}"))
            continue
        kw = student_memory_kwargs({"quantization": quantization, **sp}, gpu=gpu,
                                   seq_len=seq_len, batch_size=batch_size, lora_r=lora_r,
                                   gradient_checkpointing=gradient_checkpointing)
        est = estimate_memory(dims, trainer=trainer,
                              runtime_mib=GPU_RUNTIME_MIB if gpu else 0.0, **kw)
        base = " (4-bit base)" if trainer == "lora-sft" and kw["quantization"] == "4bit" else ""
        usable = cap * headroom
        if est["train_mib"] > usable:
            fits, reason = False, (
                f"needs {_mib(est['train_mib'])} to train{base}, server has {_mib(cap)} {what}"
                + (f" ({_mib(usable)} usable at {headroom:.0%})" if headroom < 1 else ""))
        elif est["serve_mib"] > usable:
            fits, reason = False, (f"needs {_mib(est['serve_mib'])} to serve, server has "
                                   f"{_mib(cap)} {what}")
        else:
            fits, reason = True, (f"fits: {_mib(est['train_mib'])} to train{base} of "
                                  f"{_mib(cap)} {what}")
        out.append(StudentCandidate(
            model=ref, params_m=round(dims.n_params / 1e6, 3),
            est_train_mem_mib=est["train_mib"], est_serve_mem_mib=est["serve_mib"],
            fits=fits, kept=fits, reason=reason))
    return out


# --- pre-screen -------------------------------------------------------------------------------

SHOT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Shot:
    """One worked example shown to the student: question, reasoning (teacher's) and answer."""

    question: str
    reasoning: str
    answer: str


def few_shot_prompt(task: Any, shots: Sequence[Shot], question: str) -> str:
    """Worked examples in the training format, then the question's prompt."""
    parts = [task.prompt(s.question) + task.format_target(s.reasoning, s.answer) for s in shots]
    return SHOT_SEPARATOR.join([*parts, task.prompt(question)])


def reference_shots(task: Any, k: int, *, skip: set[str] | None = None) -> list[Shot]:
    """k shots from the train split with the task's reference reasoning (empty without one)."""
    shots = []
    for ex in task.examples("train"):
        if skip and ex.id in skip:
            continue
        reasoning = task.reference_reasoning(ex.question, ex.answer) or ""
        shots.append(Shot(ex.question, reasoning, ex.answer))
        if len(shots) >= k:
            break
    return shots


def prescreen_accuracy(
    ref: str,
    task: Any,
    shots: Sequence[Shot],
    sample: Sequence[Any],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Few-shot accuracy of a student on sample examples (greedy, cut at the shot separator).

    Returns accuracy, n (examples answered), correct (score 1), parsed (an answer could be
    extracted), the Wilson 95% interval and the first outputs. With a `deadline`
    (time.monotonic()), batches after the first stop once it has passed.
    """
    import torch

    from plugins.models.hf import generate_batch, load_model

    model, tokenizer = load_model(ref)
    threads = torch.get_num_threads()
    if sum(p.numel() for p in model.parameters()) < 50_000_000 and not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny matrices: threads only add contention
    try:
        return _screen(model, tokenizer, task, shots, sample, generate_batch,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, deadline=deadline)
    finally:
        torch.set_num_threads(threads)


def _screen(model: Any, tokenizer: Any, task: Any, shots: Sequence[Shot], sample: Sequence[Any],
            generate_batch: Any, *, max_new_tokens: int, batch_size: int,
            deadline: float | None) -> dict[str, Any]:
    from plugins.models.evaluate import wilson_interval

    correct = parsed = 0
    outputs = []
    cut = False
    for start in range(0, len(sample), batch_size):
        if start and deadline is not None and time.monotonic() > deadline:
            cut = True
            break
        chunk = sample[start:start + batch_size]
        prompts = [few_shot_prompt(task, shots, ex.question) for ex in chunk]
        gens = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        for ex, gen in zip(chunk, gens, strict=True):
            text = gen.text.split(SHOT_SEPARATOR)[0]
            predicted = task.extract(text)
            ok = float(task.score(predicted, ex.answer)) >= 1.0
            correct += ok
            parsed += predicted is not None
            outputs.append({"id": ex.id, "correct": ok, "output": text[:200]})
    n = len(outputs)
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct,
            "parsed": parsed, "ci_low": low, "ci_high": high, "stopped_by_time": cut,
            "outputs": outputs}


def choose(candidates: Sequence[StudentCandidate]) -> StudentCandidate | None:
    """Best kept candidate: highest estimate (trial held-out accuracy, else few-shot), then
    trial loss drop, then fewest params."""
    kept = [c for c in candidates if c.kept]
    if not kept:
        return None

    def key(c: StudentCandidate) -> tuple[float, float, float]:
        acc = c.estimate.accuracy if c.estimate is not None else (
            c.prescreen_accuracy if c.prescreen_accuracy is not None else -1.0)
        drop = c.probe_loss_drop if c.probe_loss_drop is not None else -math.inf
        return (-acc, -drop, c.params_m)

    return sorted(kept, key=key)[0]


def dims_dict(ref: str) -> dict[str, Any]:
    """model_dims as a plain dict (for reports)."""
    return asdict(model_dims(ref))


@hookimpl
def stratos_student_candidates(task: TaskSpec, offer: ServerOffer) -> list[StudentCandidate]:
    """Built-in: none (students come from the job); the hook exists for third parties."""
    return []
