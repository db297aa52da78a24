"""One built-in server process answers for every tenant's variant by the request's `model`, and
each answer is the one that variant served alone would give."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agents.steps.tenant_common import merge_into
from plugins.deployers.http_builtin import OpenAIServer
from plugins.deployers.multi_adapter import MultiAdapterServer

BASE = "config:tiny"
PROMPT = "max 3 7"


def _merged(tmp: Path, name: str, scale: float) -> Path:
    """A tenant's merged model: the base with a ΔW on one attention projection."""
    from plugins.models.hf import load_model

    model, _tok = load_model(BASE)
    pname, p = next((n, q) for n, q in model.named_parameters() if n.endswith("q_proj.weight"))
    rng = np.random.default_rng(int(scale * 10))
    delta = (rng.standard_normal(tuple(p.shape)) * scale).astype(np.float32)
    return merge_into(BASE, {pname.removesuffix(".weight"): delta}, tmp / name / "model")


def _adapter(tmp: Path) -> Path:
    """A peft LoRA adapter of the base, with non-zero B (so it changes answers)."""
    from peft import LoraConfig, get_peft_model

    from plugins.models.hf import load_model

    model, _tok = load_model(BASE)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"],
                                            init_lora_weights=False))
    out = tmp / "t3" / "adapter"
    peft.save_pretrained(str(out))
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE
    cfg_path.write_text(json.dumps(cfg))
    return out


def _complete(url: str, model: str) -> Any:
    return httpx.post(f"{url}/completions", json={"model": model, "prompt": PROMPT,
                                                  "max_tokens": 8, "temperature": 0},
                      timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_server_routes_each_tenant_by_model_name(tmp_path: Path) -> None:
    refs = {"t1": str(_merged(tmp_path, "t1", 0.5)), "t2": str(_merged(tmp_path, "t2", 0.8)),
            "t3": str(_adapter(tmp_path))}
    alone: dict[str, str] = {}
    for name, ref in {**refs, "base": BASE}.items():
        with OpenAIServer(ref, served_name=name) as one:
            reply = _complete(one.url, name)
            assert reply.status_code == 200, reply.text
            alone[name] = reply.json()["choices"][0]["text"]
    assert len(set(alone.values())) > 1, "the variants must answer differently to tell apart"
    with MultiAdapterServer(BASE, refs, base_name="base") as multi:
        listed = httpx.get(f"{multi.url}/models", timeout=10).json()["data"]
        assert [m["id"] for m in listed] == ["base", "t1", "t2", "t3"]
        assert multi.deltas["t3"] and all(len(d) >= 1 for d in multi.deltas.values())
        for name in ("t1", "t3", "base", "t2", "t1"):  # swapped back and forth
            reply = _complete(multi.url, name)
            assert reply.status_code == 200, reply.text
            assert reply.json()["model"] == name
            assert reply.json()["choices"][0]["text"] == alone[name], name
        chat = httpx.post(f"{multi.url}/chat/completions", timeout=60, json={
            "model": "t2", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4,
            "stream": True})
        assert chat.status_code == 200 and "data: [DONE]" in chat.text
        missing = _complete(multi.url, "t9")
        assert missing.status_code == 404 and "t1" in missing.json()["error"]["message"]
