"""Training on a GPU: bf16 mixed-precision full SFT (fp32 master weights), and QLoRA (a 4-bit
NF4 base with bitsandbytes, LoRA on top) whose adapter exports like any other."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.conftest import MODEL, Record
from tests.plugins.test_trainers import AddTask, ctx_for, write_rows

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


def test_bf16_full_sft_learns_and_keeps_fp32_weights(tmp_path: Path, record: Record) -> None:
    from safetensors import safe_open

    from plugins.models.export import export_model, layout_problems
    from plugins.trainers.precision import device_bf16_supported
    from stratosd.plugins import get_plugins

    task = AddTask()
    data = write_rows(tmp_path / "data.jsonl", task, task.examples("train"))
    trainer = get_plugins().trainers.get("full-sft")()
    metrics = trainer.train(ctx_for(tmp_path, data, task, {
        "bf16": True, "max_steps": 60, "learning_rate": 1e-3, "per_device_train_batch_size": 16,
        "save_steps": 1000}, model=MODEL))
    assert metrics["final_loss"] < metrics["first_loss"] * 0.7
    assert metrics.get("peak_gpu_mib"), "training did not run on the GPU"
    # autocast really ran (fp16 + loss scaling on a GPU without bf16), over fp32 weights
    want = "bfloat16" if device_bf16_supported() else "float16"
    assert (metrics["precision"]["compute"], metrics["precision"]["weights"]) == (want,
                                                                                "float32")
    record("full SFT training (bf16 mixed precision)", float(metrics["tokens_per_s"]),
           "tokens/s")
    out = tmp_path / "out"
    # bf16 autocast computes; the optimizer updates fp32 master weights, and those are saved
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
    assert dtypes == {"F32"}, dtypes
    manifest = export_model(out, tmp_path / "export")
    assert manifest.kind == "full" and layout_problems(tmp_path / "export" / "model") == []


def _chat_batch(tokenizer: Any, n: int) -> tuple[Any, Any]:
    """Input ids and labels (prompt and padding masked) of n chat-formatted examples."""
    task = AddTask()
    prompts, full = [], []
    for ex in task.examples("train")[:n]:
        user = [{"role": "user", "content": task.prompt(ex.question)}]
        prompts.append(tokenizer.apply_chat_template(user, tokenize=False,
                                                     add_generation_prompt=True))
        full.append(tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": ex.answer}], tokenize=False))
    tokenizer.padding_side = "right"  # the prompt is each row's first tokens
    enc = tokenizer(full, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc.input_ids.clone()
    labels[enc.attention_mask == 0] = -100
    for i, p in enumerate(prompts):
        labels[i, :len(tokenizer(p, add_special_tokens=False).input_ids)] = -100
    return enc.to("cuda"), labels.to("cuda")


def test_qlora_trains_on_a_4bit_base_and_exports(tmp_path: Path, record: Record) -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="install stratos[qlora] (bitsandbytes)")
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from plugins.models.export import export_model, layout_problems
    from plugins.models.hf import resolve_model
    from plugins.trainers.common import set_adapter_base

    base = resolve_model(MODEL)
    quant = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True)
    model: Any = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant,
                                                      device_map={"": 0})
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model.train()  # from_pretrained leaves eval mode; this model has no dropout to switch on
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc, labels = _chat_batch(tokenizer, 32)
    # the 4-bit base computes what the full-precision base does, up to NF4's rounding
    full: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    full = full.cuda()
    with torch.no_grad():
        ref_loss = float(full(**enc, labels=labels).loss)
        nf4_loss = float(model(**enc, labels=labels).loss)
    del full
    assert abs(nf4_loss - ref_loss) < 0.2, (nf4_loss, ref_loss)
    model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
        model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    steps = 40
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    # LoRA on this random-init base plateaus near 5.8 from 7.6 (the same on the fp32 base, on
    # CPU): a drop of 1 is learning, not noise
    assert losses[-1] < losses[0] - 1.0, losses
    record("QLoRA training (4-bit NF4 base, bf16 compute)",
           steps * int(enc.attention_mask.sum()) / seconds, "tokens/s")
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))
    tokenizer.save_pretrained(str(adapter))
    set_adapter_base(adapter, MODEL)  # portable, as the trainers write it
    manifest = export_model(adapter, tmp_path / "export")
    assert manifest.merged and layout_problems(tmp_path / "export" / "model") == []
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export" / "model"))
    assert json.loads((tmp_path / "export" / "model" / "config.json").read_text()).get(
        "quantization_config") is None  # merged onto the full-precision base
    assert all(torch.isfinite(p).all() for p in merged.parameters())


def test_lora_sft_qlora_option_when_the_trainer_has_one(tmp_path: Path, record: Record) -> None:
    from plugins.models.export import export_model
    from stratosd.plugins import get_plugins

    cls = get_plugins().trainers.get("lora-sft")
    allowed: dict[str, str] = getattr(cls, "allowed")()  # noqa: B009 - SFTRecipe's classmethod
    option = next((k for k in allowed if any(s in k for s in ("4bit", "qlora", "quant"))),
                  None)
    if option is None:
        pytest.skip("the lora-sft trainer has no 4-bit (QLoRA) option yet (issue 14 item 4)")
    pytest.importorskip("bitsandbytes", reason="install stratos[qlora] (bitsandbytes)")
    value: Any = True if ("4bit" in option or "qlora" in option) else "4bit"
    task = AddTask()
    data = write_rows(tmp_path / "data.jsonl", task, task.examples("train"))
    metrics = cls().train(ctx_for(tmp_path, data, task, {
        option: value, "max_steps": 40, "learning_rate": 1e-2,
        "per_device_train_batch_size": 16, "save_steps": 1000}, model=MODEL))
    assert metrics["final_loss"] < metrics["first_loss"]
    record(f"QLoRA training (lora-sft {option}={value})", float(metrics["tokens_per_s"]),
           "tokens/s")
    assert export_model(tmp_path / "out", tmp_path / "export").merged
