"""The GPU-only training paths, run as far as a CPU takes them: each test forces the precision
decision a GPU would get and checks the argument plumbing (TrainingArguments, accelerate,
bitsandbytes, peft, trl) and what gets saved. Whether the GPU kernels compute well is
tests/gpu's business; these only catch what would crash or be mis-wired on first contact."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

from plugins.trainers import precision
from plugins.trainers.precision import Precision, decide
from stratosd.plugins import get_plugins
from tests.plugins.test_precision import _saved_dtypes
from tests.plugins.test_trainers import AddTask, ctx_for, write_rows

MODEL = "config:qwen2-tiny"
TIED = "config:qwen2-tiny-tied"


def _as_on_a_bf16_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every precision decision is the one an Ampere+ GPU gets; the device stays the CPU."""
    real = precision.for_params

    def gpu_decision(params: dict[str, Any], *, cuda: bool,
                     mixed: bool | None = None) -> Precision:
        return real(params, cuda=True, mixed=mixed)

    monkeypatch.setattr(precision, "device_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "for_params", gpu_decision)


def _spy(monkeypatch: pytest.MonkeyPatch, hook_on: str) -> dict[str, Any]:
    """Keep the HF trainer each training builds and, for each call of the first module named
    `hook_on` while it trains, (output dtype, CPU autocast dtype or None when off)."""
    import torch

    from plugins.trainers import common

    seen: dict[str, Any] = {"calls": set()}
    real = common.run_hf_trainer

    def record(_module: Any, _inputs: Any, out: Any) -> None:
        on = torch.is_autocast_enabled("cpu")
        seen["calls"].add((out.dtype, torch.get_autocast_dtype("cpu") if on else None))

    def spy(trainer: Any, *a: Any, **kw: Any) -> dict[str, Any]:
        seen["trainer"] = trainer
        module = next(m for n, m in trainer.model.named_modules() if n.endswith(hook_on))
        handle = module.register_forward_hook(record)
        try:
            return real(trainer, *a, **kw)
        finally:
            handle.remove()

    monkeypatch.setattr(common, "run_hf_trainer", spy)
    return seen


@pytest.mark.slow
def test_bf16_plumbing_runs_full_sft_under_cpu_autocast_with_fp32_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bf16 decision's TrainingArguments reach accelerate's autocast (CPU bf16 here),
    the optimizer keeps fp32 weights, and the saved model is fp32."""
    import torch

    _as_on_a_bf16_gpu(monkeypatch)
    seen = _spy(monkeypatch, "layers.0.self_attn.q_proj")
    task = AddTask()
    data = write_rows(tmp_path / "d.jsonl", task, task.examples("train")[:32])
    metrics = get_plugins().trainers.get("full-sft")().train(ctx_for(tmp_path, data, task, {
        "bf16": True, "max_steps": 4, "per_device_train_batch_size": 8, "save_steps": 1000},
        model=MODEL))
    hf = seen["trainer"]
    assert hf.args.bf16 and not hf.args.fp16 and hf.args.use_cpu
    assert hf.accelerator.mixed_precision == "bf16" and hf.accelerator.native_amp
    assert seen["calls"] == {(torch.bfloat16, torch.bfloat16)}  # autocast ran the matmuls
    assert {p.dtype for p in hf.model.parameters()} == {torch.float32}  # master weights
    assert metrics["precision"] | {"device": "-"} == {
        "device": "-", "weights": "float32", "compute": "bfloat16", "bf16": True,
        "fp16": False, "save": "float32", "mixed": True}
    assert _saved_dtypes(tmp_path / "out" / "model.safetensors") == {"F32"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_fp16_decision_builds_valid_training_arguments(tmp_path: Path) -> None:
    """A GPU without bf16 gets fp16 autocast: SFTConfig accepts the keywords and asks
    accelerate for fp16 (its loss scaling engages only on a GPU)."""
    from trl import SFTConfig

    from plugins.trainers.hparams import allowed_params, resolve_params, training_kwargs

    prec = decide(cuda=True, bf16_supported=False, mixed=True)
    params = resolve_params("full-sft", 10_000, {"gradient_checkpointing": True},
                            allowed_params())
    kw = training_kwargs(params, ctx_for(tmp_path, tmp_path / "d.jsonl", None, {}), cuda=False,
                         precision=prec)
    config = SFTConfig(**kw, max_length=64)
    assert config.fp16 and not config.bf16 and config.mixed_precision == "fp16"


def _bnb_cpu_missing() -> str | None:
    try:
        import bitsandbytes
    except ImportError:
        return "bitsandbytes is not installed (stratos[qlora])"
    if "cpu" not in getattr(bitsandbytes, "supported_torch_devices", ()):
        return f"bitsandbytes {bitsandbytes.__version__} has no CPU backend"
    return None


@pytest.mark.slow
def test_qlora_plumbing_runs_on_the_bitsandbytes_cpu_backend(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QLoRA end to end with bitsandbytes' CPU kernels: BitsAndBytesConfig through
    from_pretrained, prepare_model_for_kbit_training, trl's k-bit handling, checkpointing by
    the Trainer, the saved adapter and its merged export. The trainer refuses QLoRA without
    CUDA, so the CUDA check and the device are overridden here."""
    reason = _bnb_cpu_missing()
    if reason:
        pytest.skip(reason)
    import bitsandbytes as bnb
    import torch

    from plugins.models.export import export_model, layout_problems
    from plugins.trainers import lora_sft

    _as_on_a_bf16_gpu(monkeypatch)
    monkeypatch.setattr(lora_sft, "check_qlora", lambda *, cuda: None)
    monkeypatch.setattr(lora_sft, "load_4bit", functools.partial(lora_sft.load_4bit,
                                                                 device="cpu"))
    seen = _spy(monkeypatch, "layers.0.mlp.down_proj")  # peft's LoRA layer on a Linear4bit
    task = AddTask()
    data = write_rows(tmp_path / "d.jsonl", task, task.examples("train")[:32])
    metrics = get_plugins().trainers.get("lora-sft")().train(ctx_for(tmp_path, data, task, {
        "quantization": "4bit", "gradient_checkpointing": True, "max_steps": 4,
        "learning_rate": 1e-2, "per_device_train_batch_size": 8, "save_steps": 1000},
        model=MODEL))
    hf = seen["trainer"]
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in hf.model.modules())
    assert hf.args.bf16 and hf.model.get_base_model().is_activation_checkpointing
    assert {autocast for _, autocast in seen["calls"]} == {torch.bfloat16}
    # trl casts a k-bit model's adapters to bf16; the metrics say what really trained
    assert {p.dtype for p in hf.model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert (metrics["precision"]["weights"], metrics["precision"]["compute"]) == (
        "bfloat16", "bfloat16")
    assert metrics["final_loss"] < metrics["first_loss"]
    manifest = export_model(tmp_path / "out", tmp_path / "export")
    model_dir = tmp_path / "export" / "model"
    assert manifest.merged and layout_problems(model_dir) == []
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())


@pytest.mark.slow
def test_merged_export_of_a_tied_model_with_a_bf16_adapter(tmp_path: Path) -> None:
    """A tied-embedding base (most small Qwen/Llama students) plus an adapter saved in bf16
    (as QLoRA leaves it) merges into plain HF weight names, keeps the tie, and computes what
    base + adapter compute."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plugins.models.export import _has_chat_template, export_model, layout_problems
    from plugins.models.hf import resolve_model
    from plugins.trainers.common import set_adapter_base

    base = resolve_model(TIED)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model: Any = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
        task_type="CAUSAL_LM"))
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    AutoTokenizer.from_pretrained(base).save_pretrained(str(adapter))
    set_adapter_base(adapter, TIED)
    assert _saved_dtypes(adapter / "adapter_model.safetensors") == {"BF16"}

    manifest = export_model(adapter, tmp_path / "export")
    model_dir = tmp_path / "export" / "model"
    assert manifest.merged and manifest.dtype == "float32" and layout_problems(model_dir) == []
    assert _has_chat_template(model_dir) and (model_dir / "generation_config.json").is_file()
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())  # noqa: SIM118
    # plain HF names (what vLLM maps), no peft prefixes or adapter tensors; the tied head
    # is not stored twice
    assert all(k.startswith("model.") for k in keys), sorted(keys)[:5]
    assert not any("lora_" in k for k in keys) and "lm_head.weight" not in keys

    merged: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    ref_base: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ref = PeftModel.from_pretrained(ref_base, str(adapter)).eval()
    ids = torch.tensor([[1, 5, 9, 14, 2, 7]])
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits, merged.eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-3), (got - want).abs().max()
