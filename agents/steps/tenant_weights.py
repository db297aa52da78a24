"""A tenant's tuned weights for serving: exported on its own agent, staged on the serving one.

Only weights move, never data. `export_delta` (on the tenant's agent, `tenant_apply
kind=export`) takes the difference between the track's merged model and the student it started
from — only the modules training touched differ — and factors each ΔW exactly by SVD into
LoRA factors of its numerical rank: `<module>.lora_A` (k×in), `.lora_B` (out×k), `.scaling`,
the format `tenant_common.read_lora` reads. `stage_adapter` (on the serving agent,
`tenant_apply kind=import`) writes those factors as a peft LoRA adapter directory of the
student (one rank for all modules, zero-padded), which both the built-in multi-adapter server
and vLLM's multi-LoRA serving load by name. A tenant already on the serving agent is staged
from its own track directly: nothing crosses the bus for it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.steps.tenant_common import PEFT_PREFIX, current_model
from stratosd.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

RANK_RTOL = 1e-6  # singular values below this fraction of the largest are zero


def delta_factors(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, np.ndarray]:
    """LoRA factors of every changed weight (name → array, read_lora's format)."""
    import numpy as np

    out: dict[str, np.ndarray] = {}
    for name, w in tuned.items():
        b = base.get(name)
        if b is None or b.shape != w.shape:
            raise ConfigError(f"tuned parameter {name} does not match the student",
                              hint="serve each tenant on the student it was trained on",
                              field="model")
        d = (w - b).astype(np.float64)
        if not np.any(d):
            continue
        if d.ndim != 2 or not name.endswith(".weight"):
            raise ConfigError(f"parameter {name} changed but is not a LoRA target weight",
                              hint="only LoRA-trained tenants can be served by adapter",
                              field="trainer")
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        k = max(1, int(np.sum(s > s[0] * RANK_RTOL)))
        module = name.removesuffix(".weight")
        out[f"{module}.lora_A"] = vt[:k].astype(np.float32)
        out[f"{module}.lora_B"] = (u[:, :k] * s[:k]).astype(np.float32)
        out[f"{module}.scaling"] = np.asarray(1.0, dtype=np.float32)
    return out


def _weights(ref: str) -> dict[str, Any]:
    from plugins.models.hf import load_model

    model, _tok = load_model(ref)
    return {n: p.detach().cpu().numpy() for n, p in model.named_parameters()}


def export_delta(track: Path, student: str, out: Path) -> tuple[Path, int]:
    """The track's ΔW against the student as an npz of LoRA factors; (path, modules)."""
    import numpy as np

    merged = current_model(track, student)
    factors: dict[str, Any] = ({} if merged == student
                               else delta_factors(_weights(student), _weights(merged)))
    with out.open("wb") as fh:
        np.savez(fh, **factors)
    return out, sum(1 for k in factors if k.endswith(".lora_A"))


def stage_adapter(factors: dict[str, Any], student: str, dest: Path) -> str:
    """Write factors as a peft LoRA adapter of student at dest; the ref to serve (the
    student itself when the tenant's weights never changed)."""
    import numpy as np
    from safetensors.numpy import save_file

    modules = sorted(k.removesuffix(".lora_A") for k in factors if k.endswith(".lora_A"))
    if not modules:
        return student
    rank = max(int(factors[f"{m}.lora_A"].shape[0]) for m in modules)
    tensors: dict[str, np.ndarray] = {}
    for m in modules:
        a = np.asarray(factors[f"{m}.lora_A"], dtype=np.float32)
        b = np.asarray(factors[f"{m}.lora_B"], dtype=np.float32)
        b = b * float(np.asarray(factors.get(f"{m}.scaling", 1.0)))
        pad = rank - a.shape[0]
        tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(
            np.pad(a, ((0, pad), (0, 0))))
        tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(
            np.pad(b, ((0, 0), (0, pad))))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": student,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": modules, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None}, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return str(dest)
