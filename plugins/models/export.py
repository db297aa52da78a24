"""Export a trained student as files other tools load: the adapter, and one standard HF model.

`export_model(src, dest)` takes the train step's output directory (a PEFT LoRA adapter, or a
full model from full SFT) and writes:

- `dest/adapter/`: the adapter exactly as trained (LoRA runs only);
- `dest/model/`: a standard Hugging Face directory (config.json with `architectures`,
  safetensors weights, tokenizer with its chat template, generation_config.json) that
  `AutoModelForCausalLM`/`AutoTokenizer` and vLLM load: base + adapter merged with peft's
  `merge_and_unload`, or the full-SFT model as it was trained;
- `dest/export.json`: what was written, from which run, base and dtype.

The merge happens in float32 (exact sums), then the weights are cast to the requested dtype
(`auto`: the base model's own). torch, transformers and peft are imported inside functions.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import msgspec
import structlog

from stratosd.errors import ConfigError, MissingDependency

log = structlog.stdlib.get_logger(__name__)

Kind = Literal["adapter", "full"]
DTYPES = ("auto", "float32", "bfloat16", "float16")
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
MANIFEST = "export.json"
# written by the trainers beside the weights: kept with the adapter, not in the merged model
TRAIN_CARD = "stratos_train.json"


class ExportManifest(msgspec.Struct, frozen=True, kw_only=True):
    """export.json: what an export holds (paths are relative to the export directory)."""

    run_id: str = ""
    kind: Kind
    trainer: str = ""
    base_model: str = ""  # the adapter's portable base ref (config:NAME, hub id, path)
    adapter: str | None = None  # "adapter" for LoRA runs
    model: str | None = None  # "model": merged (LoRA) or as trained (full); None: adapter only
    merged: bool = False
    dtype: str = ""
    architectures: list[str] = []


def model_kind(src: Path) -> Kind:
    """"adapter" for a PEFT adapter dir, "full" for a model dir; ConfigError otherwise."""
    if (src / "adapter_config.json").is_file():
        return "adapter"
    if (src / "config.json").is_file():
        return "full"
    found = sorted(p.name for p in src.iterdir())[:8] if src.is_dir() else []
    raise ConfigError(
        f"{src} is neither a LoRA adapter (adapter_config.json) nor a model (config.json); "
        f"it holds {found or 'nothing'}",
        hint="export the artifact of a finished train stage (stratosctl status RUN)",
        field="model")


def layout_problems(model_dir: Path) -> list[str]:
    """What keeps model_dir from being a standard HF causal-LM directory ([]: nothing)."""
    problems = []
    cfg_path = model_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return [f"no readable config.json in {model_dir}"]
    if not cfg.get("architectures"):
        problems.append("config.json names no `architectures` (vLLM picks the model class "
                        "from it)")
    if not cfg.get("model_type"):
        problems.append("config.json has no `model_type`")
    if not any(model_dir.glob("*.safetensors")):
        problems.append("no *.safetensors weights")
    if not (model_dir / "tokenizer_config.json").is_file():
        problems.append("no tokenizer (tokenizer_config.json)")
    return problems


def _target_dtype(name: str, base: str) -> Any:
    """torch dtype for the merged weights; "auto": the base model's own (float32 if unset)."""
    import torch

    if name == "auto":
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(base)
        found = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        name = str(found).removeprefix("torch.") if found else "float32"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}", hint=f"use one of {', '.join(DTYPES)}",
                          field="dtype")
    return dtype


def _save_model(model: Any, dest: Path) -> None:
    # transformers 5 always writes safetensors; 4.x needs asking
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(dest), **kwargs)


def merge_adapter(adapter: Path, dest: Path, *, dtype: str = "auto",
                  seed: int = 0) -> dict[str, Any]:
    """Base + adapter merged (peft merge_and_unload) into dest with tokenizer and generation
    config; returns {base_model, dtype, architectures}."""
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    except ImportError as exc:
        raise MissingDependency(
            f"merging the adapter needs torch, transformers and peft ({exc.name} is missing)",
            hint="install `stratos[train]` here, or pass --adapter-only") from exc
    from plugins.models.hf import _adapter_base_seed, resolve_model
    from plugins.models.tiny import quiet_transformers

    quiet_transformers()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base_ref = str(cfg.get("base_model_name_or_path") or "")
    if not base_ref:
        raise ConfigError(f"adapter {adapter} names no base_model_name_or_path",
                          hint="fix adapter_config.json, or pass --adapter-only",
                          field="base_model_name_or_path")
    base = resolve_model(base_ref, seed=_adapter_base_seed(adapter, seed))
    try:
        target = _target_dtype(dtype, base)
        # float32 for the merge: W + B·A·scale summed exactly, then one cast
        model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        tok_src = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base
        tokenizer = AutoTokenizer.from_pretrained(tok_src)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base model {base_ref!r} of the adapter could not be loaded: {exc}",
                          hint="make the base available here (a local dir, the hub cache, or "
                          "config:NAME), or pass --adapter-only", field="model") from exc
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    merged: Any = peft_model.merge_and_unload(safe_merge=True)  # safe: refuses NaN weights
    merged = merged.to(target)
    try:  # the chat eos ids come from the base's generation config, not transformers' defaults
        merged.generation_config = GenerationConfig.from_pretrained(base)
    except OSError:
        log.info("base_has_no_generation_config", base_model=base_ref)
    dest.mkdir(parents=True, exist_ok=True)
    _save_model(merged, dest)
    tokenizer.save_pretrained(str(dest))
    if getattr(tokenizer, "chat_template", None) and not _has_chat_template(dest):
        raise ConfigError(f"the chat template was not written to {dest}",
                          hint="upgrade transformers (stratos[train])", field="to")
    dtype_name = str(target).removeprefix("torch.")
    log.info("adapter_merged", adapter=str(adapter), base_model=base_ref, dtype=dtype_name,
             dest=str(dest))
    return {"base_model": base_ref, "dtype": dtype_name,
            "architectures": list(merged.config.architectures or [])}


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or \
            (model_dir / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((model_dir / "tokenizer_config.json").read_text())
                    .get("chat_template"))
    except (OSError, ValueError):
        return False


def _copy_tree(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    shutil.copytree(src, dest, ignore=lambda _d, names: [n for n in names if n in skip])


def export_model(src: Path, dest: Path, *, run_id: str = "", trainer: str = "",
                 merge: bool = True, dtype: str = "auto", seed: int = 0) -> ExportManifest:
    """Write adapter/, model/ and export.json for a train output into dest (created)."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}",
                          field="dtype")
    kind = model_kind(src)
    dest.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    if kind == "adapter":
        _copy_tree(src, dest / ADAPTER_DIR)
        if merge:
            info = merge_adapter(src, dest / MODEL_DIR, dtype=dtype, seed=seed)
        else:
            cfg = json.loads((src / "adapter_config.json").read_text())
            info = {"base_model": str(cfg.get("base_model_name_or_path") or "")}
    else:
        if dtype != "auto":
            raise ConfigError(f"--dtype {dtype} applies to merged adapters; a full model is "
                              "exported as trained", hint="leave --dtype out", field="dtype")
        _copy_tree(src, dest / MODEL_DIR, skip=(TRAIN_CARD,))
        cfg = json.loads((src / "config.json").read_text())
        info = {"base_model": _card(src).get("base_model", ""),
                "dtype": str(cfg.get("dtype") or cfg.get("torch_dtype") or ""),
                "architectures": list(cfg.get("architectures") or [])}
    model_dir = dest / MODEL_DIR
    if model_dir.is_dir():
        for problem in layout_problems(model_dir):
            log.warning("export_layout_problem", problem=problem, dest=str(model_dir))
    manifest = ExportManifest(
        run_id=run_id, kind=kind, trainer=trainer or _card_trainer(src),
        adapter=ADAPTER_DIR if kind == "adapter" else None,
        model=MODEL_DIR if model_dir.is_dir() else None, merged=kind == "adapter" and merge,
        **info)
    (dest / MANIFEST).write_bytes(msgspec.json.format(msgspec.json.encode(manifest)) + b"\n")
    return manifest


def _card_trainer(src: Path) -> str:
    metrics = _card(src).get("metrics")
    return str(metrics.get("trainer") or "") if isinstance(metrics, dict) else ""


def _card(src: Path) -> dict[str, Any]:
    try:
        card = json.loads((src / TRAIN_CARD).read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}
