"""Training row lengths counted with the student's own tokenizer and prompt format.

A row as the trainer sees it is the chat template's rendering of `[system?] + user +
assistant` (`plugins.models.prompting.encode_example`), so its length is the content's tokens
plus what the template adds: role markers, end-of-turn tokens and, for ChatML students, a
default system message. A characters x tokens-per-character prior misses that wrapper; on the
demo's BPE student it estimated 39 tokens per row where the trainer saw ~80.

`token_profile` encodes sample rows exactly as training does and returns the fixed wrapper
(`overhead`) and the tokens per character of content (`per_char`), so rows whose text is only
known by its length (synthesised data) are sized the same way. Only the tokenizer is loaded,
never the weights: a `config:` student's tokenizer is the locally trained BPE (or the
char-level one), a local directory's is its tokenizer files, and a hub id's comes from the
local Hugging Face cache or not at all (then the caller keeps the prior and says so).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)
_LOCK = threading.Lock()
_TOKENIZERS: dict[str, tuple[Any, str] | None] = {}  # model ref → (tokenizer, source)


@dataclass(frozen=True)
class TokenProfile:
    """Row length in tokens = overhead + content characters x per_char."""

    overhead: float  # tokens the prompt format adds to every row (template, system, eos)
    per_char: float  # tokens per character of user + assistant content
    source: str  # which tokenizer and format, for the plan's notes

    def tokens(self, content_chars: float) -> float:
        """Tokens of a row with this much content."""
        return self.overhead + content_chars * self.per_char


def _tokenizer_for(ref: str) -> tuple[Any, str] | None:
    """(tokenizer, where it came from) without loading weights; None when not available here."""
    if ref.startswith("config:"):
        from plugins.models import bpe
        from plugins.models.hf import model_config_dict, parse_config_ref
        from plugins.models.tiny import build_char_tokenizer, model_spec

        name, overrides = parse_config_ref(ref)
        spec = model_spec(name)
        if not spec.bpe:
            return build_char_tokenizer(), f"{ref} char-level tokenizer"
        cfg = model_config_dict(name, overrides)
        tok = bpe.load_tokenizer(spec.arch, int(cfg["vocab_size"]),
                                 max_length=int(cfg["max_position_embeddings"]))
        return tok, f"{ref} byte-level BPE tokenizer and {spec.arch} chat template"
    path = Path(ref).expanduser()
    if path.is_dir():
        from plugins.models.hf import _load_tokenizer, is_adapter_dir

        if is_adapter_dir(path) and not (path / "tokenizer_config.json").is_file():
            import json

            base = json.loads((path / "adapter_config.json").read_text())
            return _tokenizer_for(str(base.get("base_model_name_or_path", "")))
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                   "tokenizer.model")):
            return None
        return _load_tokenizer(str(path), offline=True), f"{path} tokenizer"
    from plugins.models.hf import _in_hub_cache, _load_tokenizer

    if not _in_hub_cache(ref):
        return None
    try:
        return _load_tokenizer(ref, offline=True), f"{ref} tokenizer (local hub cache)"
    except (OSError, ValueError):
        return None


def _cached_tokenizer(ref: str) -> tuple[Any, str] | None:
    """The tokenizer of ref, loaded once: plans run in threads, and two that miss together
    must not both load (or train) it."""
    with _LOCK:
        if ref not in _TOKENIZERS:
            _TOKENIZERS[ref] = _tokenizer_for(ref)
        return _TOKENIZERS[ref]


@lru_cache(maxsize=64)
def token_profile(ref: str, rows: tuple[tuple[str, str], ...]) -> TokenProfile | None:
    """Profile of (user content, assistant target) rows rendered as the trainer renders them;
    None when the student's tokenizer is not available on this machine."""
    from plugins.models import prompting
    from stratosd.errors import ConfigError

    if not rows:
        return None
    try:
        got = _cached_tokenizer(ref)
    except (ConfigError, OSError, ValueError) as exc:
        log.info("token_profile_unavailable", model=ref, error=str(exc))
        return None
    if got is None:
        return None
    tok, source = got

    def length(user: str, target: str) -> int:
        return len(prompting.encode_example(tok, prompting.user_messages(user), target)
                   ["input_ids"])

    overhead = float(length("", ""))
    chars = sum(len(u) + len(t) for u, t in rows)
    tokens = sum(length(u, t) for u, t in rows)
    per_char = max(tokens - overhead * len(rows), 0.0) / max(chars, 1)
    return TokenProfile(overhead=overhead, per_char=per_char,
                        source=f"{source}, {len(rows)} rows encoded as in training")
