"""Export on a GPU host: an adapter trained on CUDA merges into a model that computes what base +
adapter compute, and vLLM loads the merged directory and answers a chat request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.gpu.conftest import Record

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

VLLM_CHAT = """\
import json, sys, time
from vllm import LLM, SamplingParams
t0 = time.monotonic()
llm = LLM(model=sys.argv[1], enforce_eager=True, gpu_memory_utilization=0.25, max_model_len=512)
loaded = time.monotonic() - t0
greedy = SamplingParams(temperature=0, max_tokens=16)
out = llm.chat([[{"role": "user", "content": "3+4="}]], greedy)
print(json.dumps({"text": out[0].outputs[0].text, "tokens": len(out[0].outputs[0].token_ids),
                  "load_s": loaded}))
"""


def logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def test_merged_export_equals_base_plus_adapter_on_cuda(lora_adapter: Path, exported: Path,
                                                        record: Record) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plugins.models.export import layout_problems
    from plugins.models.hf import resolve_model
    from tests.gpu.conftest import MODEL

    train = json.loads((lora_adapter.parent / "train_metrics.json").read_text())
    assert train["final_loss"] < train["first_loss"]
    record("LoRA-SFT training (fp32, lora-sft plugin)", float(train["tokens_per_s"]), "tokens/s")
    model_dir = exported / "model"
    assert layout_problems(model_dir) == []
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "3+4="}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.cuda()
    merged: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base: Any = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32)
    merged, base = merged.cuda(), base.cuda()
    ref = logits(PeftModel.from_pretrained(base, str(exported / "adapter")).eval(), ids)
    got = logits(merged.eval(), ids)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-3), (got - ref).abs().max()


def test_vllm_loads_the_merged_export(exported: Path, record: Record) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed: install stratos[vllm]")
    proc = subprocess.run([sys.executable, "-c", VLLM_CHAT, str(exported / "model")],
                          capture_output=True, text=True, cwd=ROOT, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] > 0
    record("vLLM load of the merged export (eager)", float(result["load_s"]), "s")
