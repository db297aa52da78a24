"""`config:` models: tiny random-init students built locally, deterministically, and cached.

Names (each takes `?key=value&...` config overrides):

- `config:tiny`, `config:small`, `config:base`: a Llama with the fixed char-level tokenizer
  and a template that renders message contents verbatim (the pipeline's original model);
- `config:qwen2-SIZE`: a Qwen2 with a byte-level BPE tokenizer and the ChatML template;
- `config:llama3-SIZE`: a Llama with a Llama-3-style BPE tokenizer and chat template;
- a `-tied` suffix (`config:qwen2-tiny-tied`) ties the input and output embeddings.

BPE models take `?vocab_size=N` (the tokenizer is trained to that size, see `bpe`). A build
is an ordinary save_pretrained directory (config.json, generation_config.json with the chat
eos ids, tokenizer.json, tokenizer_config.json with the chat template) written atomically
into the cache, so the rest of the code only loads local paths with the real loaders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import structlog

from plugins.models import bpe
from stratosd.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = structlog.stdlib.get_logger(__name__)

# Seeding and init use torch's global RNG: threads of one process build one at a time.
_BUILD_LOCK = threading.Lock()

CONFIG_PREFIX = "config:"
# Bump when the char-level tokenizer or model construction changes: old cache entries stay
# valid for the old format and new ones get a new directory (BPE models: bpe.BPE_FORMAT).
FORMAT_VERSION = 1

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
# Fixed vocabulary: specials, newline, then printable ASCII (space .. ~) in code order.
CHARS: tuple[str, ...] = ("\n", *(chr(c) for c in range(32, 127)))
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARS))}

# Message contents verbatim: a chat request to a char-level model equals the raw prompt.
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
# Per architecture: the published models' norm epsilon and rope base.
ARCHS: dict[str, dict[str, Any]] = {
    "qwen2": {"rms_norm_eps": 1e-6,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}},
    "llama3": {"rms_norm_eps": 1e-5,
               "rope_parameters": {"rope_type": "default", "rope_theta": 500_000.0}},
}
TIED_SUFFIX = "-tied"


@dataclass(frozen=True)
class ModelSpec:
    """What a `config:` name stands for: architecture, size and tokenizer family."""

    name: str
    size: str
    arch: str  # "llama" (char-level), "qwen2" or "llama3"
    tied: bool = False

    @property
    def bpe(self) -> bool:
        """True for the BPE (chat) families, False for the char-level model."""
        return self.arch in ARCHS


def config_names() -> list[str]:
    """Every `config:` name (without overrides)."""
    names = list(TINY_CONFIGS)
    for arch in ARCHS:
        for size in TINY_CONFIGS:
            names += [f"{arch}-{size}", f"{arch}-{size}{TIED_SUFFIX}"]
    return names


def model_spec(name: str) -> ModelSpec:
    """The spec of a `config:` name; ConfigError listing the known names otherwise."""
    if name in TINY_CONFIGS:
        return ModelSpec(name=name, size=name, arch="llama")
    tied = name.endswith(TIED_SUFFIX)
    arch, _, size = name.removesuffix(TIED_SUFFIX).partition("-")
    if arch in ARCHS and size in TINY_CONFIGS:
        return ModelSpec(name=name, size=size, arch=arch, tied=tied)
    raise ConfigError(
        f"unknown tiny model config {name!r}",
        hint=f"use one of: {', '.join('config:' + n for n in config_names())}",
        field="model",
    )


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
    try:
        model_spec(name)
    except ConfigError as exc:
        raise ConfigError(f"{exc.message} in {ref!r}", hint=exc.hint, field="model") from None
    overrides = {k: _coerce(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    return name, overrides


def model_config_dict(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The transformers config kwargs (Llama/Qwen2 field names) for a name plus overrides."""
    spec = model_spec(name)
    over = dict(overrides or {})
    if not spec.bpe:
        cfg = {**_COMMON, **TINY_CONFIGS[name], **over}
        cfg.update(vocab_size=len(VOCAB), pad_token_id=VOCAB[PAD], bos_token_id=VOCAB[BOS],
                   eos_token_id=VOCAB[EOS])
        return cfg
    fam = bpe.family(spec.arch)
    vocab = bpe.check_vocab_size(over.pop("vocab_size", bpe.DEFAULT_VOCAB_SIZE))
    ids = bpe.special_ids(fam, vocab)
    cfg = {**_COMMON, **ARCHS[spec.arch], **TINY_CONFIGS[spec.size],
           "tie_word_embeddings": spec.tied, **over}
    eos = [ids[t] for t in fam.config_eos]
    cfg.update(vocab_size=vocab, bos_token_id=ids[fam.config_bos],
               eos_token_id=eos[0] if len(eos) == 1 else eos,
               pad_token_id=ids[fam.pad] if fam.pad else None)
    return cfg


def config_class(name: str) -> Any:
    """The transformers config class of a `config:` name (LlamaConfig or Qwen2Config)."""
    from transformers import LlamaConfig, Qwen2Config

    return Qwen2Config if model_spec(name).arch == "qwen2" else LlamaConfig


def model_class(name: str) -> Any:
    """The causal-LM class of a `config:` name (LlamaForCausalLM or Qwen2ForCausalLM)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    return Qwen2ForCausalLM if model_spec(name).arch == "qwen2" else LlamaForCausalLM


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


def quiet_transformers() -> None:
    """No progress bars: on stderr they would become job log lines in the agent."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _generation_ids(name: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    spec = model_spec(name)
    if not spec.bpe:
        return {"bos_token_id": VOCAB[BOS], "eos_token_id": VOCAB[EOS],
                "pad_token_id": VOCAB[PAD]}
    fam = bpe.family(spec.arch)
    ids = bpe.special_ids(fam, int(cfg["vocab_size"]))
    return {"bos_token_id": ids[fam.config_bos],
            "eos_token_id": [ids[t] for t in fam.generation_eos],
            "pad_token_id": ids[fam.pad] if fam.pad else None}


def build_config_model(name: str, overrides: dict[str, Any], seed: int, dest: Path) -> None:
    """Build the model and tokenizer of `config:NAME?overrides` into dest (seeded init)."""
    import torch
    from transformers import GenerationConfig

    quiet_transformers()
    spec = model_spec(name)
    cfg_kwargs = model_config_dict(name, overrides)
    try:
        config = config_class(name)(**cfg_kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad override for config:{name}: {exc}", field="model",
                          hint="use the config's field names, e.g. ?hidden_size=96") from exc
    if spec.bpe:
        tokenizer = bpe.load_tokenizer(spec.arch, int(cfg_kwargs["vocab_size"]),
                                       max_length=int(cfg_kwargs["max_position_embeddings"]))
    else:
        tokenizer = build_char_tokenizer()
    # fork_rng: building a model must not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = model_class(name)(config).to(torch.float32)
    gen_ids = _generation_ids(name, cfg_kwargs)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        **{k: v for k, v in gen_ids.items() if v is not None})
    model.save_pretrained(dest)
    if spec.bpe:
        bpe.save_tokenizer_dir(tokenizer, dest)
    else:
        tokenizer.save_pretrained(dest)
    card = {"name": name, "overrides": overrides, "seed": seed, "format": FORMAT_VERSION}
    if spec.bpe:
        card.update(bpe_format=bpe.BPE_FORMAT, tokenizer=spec.arch)
    (dest / "stratos_model.json").write_text(json.dumps(card, sort_keys=True))


def config_model_dir(ref: str, *, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Where the cache keeps `ref` built with `seed` (whether or not it exists yet)."""
    name, overrides = parse_config_ref(ref)
    key_fields: dict[str, Any] = {"n": name, "o": overrides, "s": seed, "v": FORMAT_VERSION}
    if model_spec(name).bpe:
        key_fields["b"] = bpe.BPE_FORMAT
    key = json.dumps(key_fields, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return (cache_dir or default_cache_dir()) / f"{name}-s{seed}-{digest}"


def resolve_config_model(ref: str, *, seed: int = 0, cache_dir: Path | None = None) -> str:
    """The cached directory of a `config:` ref, built (atomically) on first use."""
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
            build_config_model(name, overrides, seed, tmp)
            try:
                os.rename(tmp, dest)  # atomic; a racing process may have won
            except OSError:
                if not (dest / "stratos_model.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny_model_built", model=ref, seed=seed, path=str(dest))
    return str(dest)
