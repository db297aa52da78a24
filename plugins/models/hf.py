"""Model loading for every step: tiny `config:` models, local dirs, LoRA adapters, hub ids.

`config:NAME[?key=value&...]` builds a char-level tokenizer and a random-init Llama model
deterministically from a seed and caches it (atomically) as an ordinary save_pretrained
directory, so the rest of the code only ever loads local paths with the real loaders.
Heavy imports (torch, transformers, peft) happen inside functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import msgspec
import structlog

from stratosd.errors import ConfigError, MissingDependency

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = structlog.stdlib.get_logger(__name__)

# Seeding and init use torch's global RNG: threads of one process build one at a time.
_BUILD_LOCK = threading.Lock()

CONFIG_PREFIX = "config:"
# Bump when the tokenizer or model construction changes: old cache entries stay valid for
# the old format and new ones get a new directory.
FORMAT_VERSION = 1

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
# Fixed vocabulary: specials, newline, then printable ASCII (space .. ~) in code order.
CHARS: tuple[str, ...] = ("\n", *(chr(c) for c in range(32, 127)))
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARS))}

# Message contents verbatim: a chat request to a tiny model equals the raw training prompt.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "base": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6,
             "num_attention_heads": 8, "num_key_value_heads": 4},
}
_COMMON: dict[str, Any] = {
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}


class GenOut(msgspec.Struct, frozen=True, kw_only=True):
    """One generated continuation (text after the prompt) with its token counts."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "length" when max_new_tokens ran out before eos


def default_cache_dir() -> Path:
    """`$STRATOS_HOME/models`, else `~/.cache/stratos/models`."""
    home = os.environ.get("STRATOS_HOME")
    if home:
        return Path(home) / "models"
    return Path.home() / ".cache" / "stratos" / "models"


def _coerce(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def parse_config_ref(ref: str) -> tuple[str, dict[str, Any]]:
    """Split `config:NAME?k=v&...` into NAME and its overrides; unknown NAME → ConfigError."""
    body = ref[len(CONFIG_PREFIX):]
    name, _, query = body.partition("?")
    if name not in TINY_CONFIGS:
        raise ConfigError(
            f"unknown tiny model config {name!r} in {ref!r}",
            hint=f"use one of: {', '.join('config:' + n for n in TINY_CONFIGS)}",
            field="model",
        )
    overrides = {k: _coerce(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    return name, overrides


def model_config_dict(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The LlamaConfig kwargs for a tiny config name plus overrides."""
    cfg = {**_COMMON, **TINY_CONFIGS[name], **(overrides or {})}
    cfg.update(vocab_size=len(VOCAB), pad_token_id=VOCAB[PAD], bos_token_id=VOCAB[BOS],
               eos_token_id=VOCAB[EOS])
    return cfg


def build_char_tokenizer() -> PreTrainedTokenizerBase:
    """The fixed char-level tokenizer (no training, no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _quiet_transformers() -> None:
    # Progress bars on stderr would become job log lines in the agent.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _build_config_model(name: str, overrides: dict[str, Any], seed: int, dest: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    try:
        config = LlamaConfig(**model_config_dict(name, overrides))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad override for config:{name}: {exc}", field="model",
                          hint="use LlamaConfig field names, e.g. ?hidden_size=96") from exc
    # fork_rng: building a model must not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=VOCAB[BOS], eos_token_id=VOCAB[EOS], pad_token_id=VOCAB[PAD],
    )
    model.save_pretrained(dest)
    build_char_tokenizer().save_pretrained(dest)
    (dest / "stratos_model.json").write_text(
        json.dumps({"name": name, "overrides": overrides, "seed": seed,
                    "format": FORMAT_VERSION}, sort_keys=True)
    )


def config_model_dir(ref: str, *, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Where the cache keeps `ref` built with `seed` (whether or not it exists yet)."""
    name, overrides = parse_config_ref(ref)
    key = json.dumps({"n": name, "o": overrides, "s": seed, "v": FORMAT_VERSION},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return (cache_dir or default_cache_dir()) / f"{name}-s{seed}-{digest}"


def resolve_model(ref: str, *, seed: int = 0, cache_dir: Path | None = None) -> str:
    """A loadable reference: `config:` refs become a cached local dir; paths and hub ids pass."""
    if not ref:
        raise ConfigError("empty model reference", hint="pass a path, hub id or config:NAME",
                          field="model")
    if ref.startswith(CONFIG_PREFIX):
        dest = config_model_dir(ref, seed=seed, cache_dir=cache_dir)
        if (dest / "stratos_model.json").exists():
            return str(dest)
        name, overrides = parse_config_ref(ref)
        with _BUILD_LOCK:
            if (dest / "stratos_model.json").exists():
                return str(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            try:
                _build_config_model(name, overrides, seed, tmp)
                try:
                    os.rename(tmp, dest)  # atomic; a racing process may have won
                except OSError:
                    if not (dest / "stratos_model.json").exists():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("tiny_model_built", model=ref, seed=seed, path=str(dest))
        return str(dest)
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
    """Every token that ends a generation (chat models often have several)."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
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
) -> list[GenOut]:
    """Generate continuations for a batch (left padded; greedy at temperature 0)."""
    import torch

    if not prompts:
        return []
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
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
    results = []
    for row, n_prompt in zip(new, prompt_lens, strict=True):
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
                              completion_tokens=len(kept), finish_reason=finish))
    return results
