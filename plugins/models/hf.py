"""Model loading and generation for every step: `config:` models, local dirs, adapters, hubs.

`config:NAME[?key=value&...]` refs are built and cached by `tiny` (char-level Llama, or
Qwen2/Llama-3-style models with trained BPE tokenizers and chat templates), so the rest of the
code only ever loads local paths with the real loaders. How prompts are rendered and
encoded lives in `prompting`. Heavy imports (torch, transformers, peft) happen inside
functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

# The config: scheme lives in `tiny`; these names stay importable from here.
from plugins.models.tiny import BOS as BOS
from plugins.models.tiny import CHARS as CHARS
from plugins.models.tiny import CHAT_TEMPLATE as CHAT_TEMPLATE
from plugins.models.tiny import CONFIG_PREFIX as CONFIG_PREFIX
from plugins.models.tiny import EOS as EOS
from plugins.models.tiny import FORMAT_VERSION as FORMAT_VERSION
from plugins.models.tiny import PAD as PAD
from plugins.models.tiny import SPECIAL_TOKENS as SPECIAL_TOKENS
from plugins.models.tiny import TINY_CONFIGS as TINY_CONFIGS
from plugins.models.tiny import UNK as UNK
from plugins.models.tiny import VOCAB as VOCAB
from plugins.models.tiny import build_char_tokenizer as build_char_tokenizer
from plugins.models.tiny import config_model_dir as config_model_dir
from plugins.models.tiny import default_cache_dir as default_cache_dir
from plugins.models.tiny import model_config_dict as model_config_dict
from plugins.models.tiny import parse_config_ref as parse_config_ref
from plugins.models.tiny import quiet_transformers as _quiet_transformers
from plugins.models.tiny import resolve_config_model
from stratosd.errors import ConfigError, MissingDependency

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = structlog.stdlib.get_logger(__name__)


class GenOut(msgspec.Struct, frozen=True, kw_only=True):
    """One generated continuation (text after the prompt) with its token counts."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "length" when max_new_tokens ran out before eos
    prompt_token_ids: list[int] = []  # what the model was fed (padding left out)
    token_ids: list[int] = []  # what it generated, the stop token included


def resolve_model(ref: str, *, seed: int = 0, cache_dir: Path | None = None) -> str:
    """A loadable reference: `config:` refs become a cached local dir; paths and hub ids pass."""
    if not ref:
        raise ConfigError("empty model reference", hint="pass a path, hub id or config:NAME",
                          field="model")
    if ref.startswith(CONFIG_PREFIX):
        return resolve_config_model(ref, seed=seed, cache_dir=cache_dir)
    path = Path(ref).expanduser()
    if path.exists():
        return str(path)
    if ref.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"model path {ref!r} does not exist", field="model",
                          hint="check the path, or use a hub id or config:NAME")
    return ref


def is_adapter_dir(path: str | Path) -> bool:
    """True for a PEFT adapter directory (has adapter_config.json)."""
    return (Path(path) / "adapter_config.json").is_file()


def _adapter_base_seed(adapter: Path, default: int) -> int:
    # Trainers record the seed their config: base was built with (stratos_train.json).
    card = adapter / "stratos_train.json"
    try:
        return int(json.loads(card.read_text()).get("base_seed", default))
    except (OSError, ValueError, TypeError):
        return default


def _hub_error(ref: str, exc: BaseException) -> ConfigError:
    why = "the hub is offline (HF_HUB_OFFLINE is set)" if _hub_offline() else (
        "the hub is unreachable")
    return ConfigError(
        f"model {ref!r} could not be loaded: not a local path and {why} ({type(exc).__name__})",
        hint="pass a local directory or config:NAME (e.g. config:tiny)",
        field="model",
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _load_tokenizer(path: str, offline: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(
    ref: str, *, seed: int = 0, for_training: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) for a ref; adapter dirs load on top of their resolved base."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    local = resolve_model(ref, seed=seed)
    adapter: str | None = None
    base = local
    if is_adapter_dir(local):
        adapter = local
        cfg = json.loads((Path(local) / "adapter_config.json").read_text())
        base_ref = cfg.get("base_model_name_or_path")
        if not base_ref:
            raise ConfigError(f"adapter {local!r} names no base_model_name_or_path",
                              hint="retrain the adapter or fix adapter_config.json",
                              field="model")
        base = resolve_model(str(base_ref), seed=_adapter_base_seed(Path(local), seed))
    if not Path(base).exists() and _hub_offline() and not _in_hub_cache(base):
        raise _hub_error(base, FileNotFoundError(base))
    try:
        dtype = torch.float32 if not torch.cuda.is_available() else "auto"
        # huggingface_hub reads HF_HUB_OFFLINE at import; honour it when set later too.
        offline = _hub_offline()
        model: Any = AutoModelForCausalLM.from_pretrained(
            base, dtype=dtype, local_files_only=offline)
        tok_src = adapter if adapter and _has_tokenizer(adapter) else base
        tokenizer = _load_tokenizer(tok_src, offline)
    except (OSError, ValueError) as exc:
        if Path(base).exists():
            raise ConfigError(f"model directory {base!r} could not be loaded: {exc}",
                              hint="check it was written by save_pretrained",
                              field="model") from exc
        raise _hub_error(base, exc) from exc
    if adapter is not None:
        try:
            from peft import PeftModel
        except ImportError as exc:
            raise MissingDependency("peft is needed to load adapter " + repr(adapter),
                                    hint="install `stratos[train]`") from exc
        model = PeftModel.from_pretrained(model, adapter, is_trainable=for_training)
    if torch.cuda.is_available() and not for_training:
        model = model.to("cuda")
    tokenizer.padding_side = "right" if for_training else "left"
    model.train(for_training)
    return model, tokenizer


def _has_tokenizer(path: str) -> bool:
    return (Path(path) / "tokenizer_config.json").is_file()


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a generation: the model's and tokenizer's eos, end of turn."""
    from plugins.models.prompting import end_of_turn_ids

    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id, end_of_turn_ids(tokenizer)):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int | None = None,
    add_special_tokens: bool = True,
) -> list[GenOut]:
    """Generate continuations for a batch (left padded; greedy at temperature 0).

    Prompts rendered by a chat template already hold their special tokens: pass
    `add_special_tokens=False` for them (`prompting.generate_chat` does).
    """
    import torch

    if not prompts:
        return []
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True,
                    add_special_tokens=add_special_tokens)
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)
    attention = enc["attention_mask"].to(device)
    sample = temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sample}
    if sample:
        kwargs["temperature"] = temperature
        kwargs["top_k"] = 0
        kwargs["top_p"] = 1.0
    eos_ids = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    with torch.inference_mode():
        if sample and seed is not None:
            torch.manual_seed(seed)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids, pad_token_id=pad, **kwargs,
        )
    new = out[:, input_ids.shape[1]:].tolist()
    prompt_lens = attention.sum(dim=1).tolist()
    fed = [ids[len(ids) - n:] if n else [] for ids, n in
           zip(input_ids.tolist(), prompt_lens, strict=True)]
    results = []
    for row, n_prompt, prompt_ids in zip(new, prompt_lens, fed, strict=True):
        kept: list[int] = []
        for tok_id in row:
            kept.append(tok_id)
            if tok_id in eos_ids:
                break
        # After eos, generate() pads; those tokens were never produced.
        hit_eos = bool(kept) and kept[-1] in eos_ids
        text_ids = kept[:-1] if hit_eos else kept
        text = tokenizer.decode(text_ids, skip_special_tokens=True)
        finish = "stop" if hit_eos else "length"
        results.append(GenOut(text=text, prompt_tokens=int(n_prompt),
                              completion_tokens=len(kept), finish_reason=finish,
                              prompt_token_ids=prompt_ids, token_ids=kept))
    return results
