"""Byte-level BPE tokenizers trained locally for the `config:` Qwen2- and Llama-3-style models.

Each family has real special tokens, a real chat template (ChatML for qwen2, Llama-3 headers
for llama3), its own pre-tokenizer pattern and post-processor (llama3 prepends
`<|begin_of_text|>`), as in the published tokenizers. The merges are learnt with the
`tokenizers` library on the English corpus shipped in `data/` plus text of the built-in task
packs (their prompts and reference targets), so no download is ever needed. Trained
tokenizers are cached as ordinary Hugging Face tokenizer directories under
`$STRATOS_MODEL_CACHE/tokenizers` (else `~/.cache/stratos/tokenizers`), keyed by the
family, the vocabulary size and a digest of the training text. Heavy imports are lazy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from stratosd.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = structlog.stdlib.get_logger(__name__)

# Bump when training or the saved layout changes: new cache entries, old ones stay valid.
BPE_FORMAT = 1
DATA_DIR = Path(__file__).resolve().parent / "data"
ENGLISH_CORPUS = DATA_DIR / "english.txt"
DEFAULT_VOCAB_SIZE = 2048
MIN_VOCAB_SIZE = 512
MAX_VOCAB_SIZE = 65536
# The task packs whose text joins the English corpus: (name, params).
CORPUS_TASKS: tuple[tuple[str, dict[str, Any]], ...] = (
    *(("mahjong-winning-tiles", {"difficulty": d, "n_train": 120, "n_test": 1})
      for d in (1, 2, 3, 4)),
    *(("gsm8k", {"synthetic": True, "difficulty": d, "n_train": 120, "n_test": 1})
      for d in (1, 2, 3)),
)
_LOCK = threading.Lock()
DEFAULT_SYSTEM = "You are a helpful assistant."

# The pre-tokenizer patterns of the published Qwen2 and Llama-3 tokenizers: Qwen2 splits
# numbers into single digits, Llama-3 into groups of up to three.
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                   r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2-Instruct's template, verbatim: ChatML with a default system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Meta-Llama-3-Instruct's template, verbatim: BOS, role headers, trimmed contents, <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


@dataclass(frozen=True)
class ChatFamily:
    """What makes a tokenizer Qwen2- or Llama-3-like: tokens, template, splitting, ids."""

    name: str
    specials: tuple[str, ...]  # appended after the learnt vocabulary, in this order
    eos: str  # the tokenizer's eos_token: the end-of-turn token chat generation stops at
    bos: str | None
    pad: str | None
    config_bos: str  # config.json bos_token_id
    config_eos: tuple[str, ...]  # config.json eos_token_id
    generation_eos: tuple[str, ...]  # generation_config.json eos_token_id
    pattern: str
    chat_template: str
    add_bos: bool  # the post-processor prepends bos (Llama-3 does, Qwen2 does not)
    nfc: bool


FAMILIES: dict[str, ChatFamily] = {
    "qwen2": ChatFamily(
        name="qwen2",
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|im_end|>", bos=None, pad="<|endoftext|>",
        config_bos="<|endoftext|>", config_eos=("<|im_end|>",),
        generation_eos=("<|im_end|>", "<|endoftext|>"),
        pattern=_QWEN2_PATTERN, chat_template=CHATML_TEMPLATE, add_bos=False, nfc=True,
    ),
    "llama3": ChatFamily(
        name="llama3",
        specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"),
        eos="<|eot_id|>", bos="<|begin_of_text|>", pad=None,
        config_bos="<|begin_of_text|>", config_eos=("<|end_of_text|>", "<|eot_id|>"),
        generation_eos=("<|end_of_text|>", "<|eot_id|>"),
        pattern=_LLAMA3_PATTERN, chat_template=LLAMA3_TEMPLATE, add_bos=True, nfc=False,
    ),
}


def tokenizer_cache_dir() -> Path:
    """`$STRATOS_MODEL_CACHE/tokenizers`, else `~/.cache/stratos/tokenizers`."""
    shared = os.environ.get("STRATOS_MODEL_CACHE")
    root = Path(shared) if shared else Path.home() / ".cache" / "stratos"
    return root / "tokenizers"


def family(name: str) -> ChatFamily:
    """The family called `name`; ConfigError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown tokenizer family {name!r}", field="model",
                          hint=f"use one of: {', '.join(FAMILIES)}") from None


def check_vocab_size(vocab_size: Any) -> int:
    """The vocabulary size as an int in [MIN_VOCAB_SIZE, MAX_VOCAB_SIZE]; ConfigError else."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
            MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE):
        raise ConfigError(f"vocab_size must be an integer from {MIN_VOCAB_SIZE} to "
                          f"{MAX_VOCAB_SIZE}, got {vocab_size!r}", field="model",
                          hint=f"e.g. config:qwen2-tiny?vocab_size={DEFAULT_VOCAB_SIZE}")
    return vocab_size


def task_texts() -> Iterator[str]:
    """Chats of the built-in task packs: prompts, reference targets (skipped if unavailable)."""
    from stratosd.errors import StratosError
    from stratosd.plugins import get_plugins

    plugins = get_plugins()
    for name, params in CORPUS_TASKS:
        try:
            task = plugins.task(name, params)
            examples = task.examples("train")
        except (StratosError, ImportError) as exc:
            log.warning("tokenizer_task_text_skipped", task=name, error=str(exc))
            continue
        for ex in examples:
            reasoning = task.reference_reasoning(ex.question, ex.answer) or ""
            # As a chat template lays it out (minus the special tokens), so the role names
            # and the default system message become tokens too, as in published tokenizers.
            yield (f"system\n{DEFAULT_SYSTEM}\nuser\n{task.prompt(ex.question)}\nassistant\n"
                   f"{task.format_target(reasoning, ex.answer)}")


def training_text() -> list[str]:
    """The tokenizer's training text: the shipped English corpus, then the task text."""
    english = ENGLISH_CORPUS.read_text(encoding="utf-8")
    return [p for p in english.split("\n\n") if p.strip()] + list(task_texts())


def _digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()


def special_ids(fam: ChatFamily, vocab_size: int) -> dict[str, int]:
    """Ids of the family's special tokens: the last ones of the vocabulary, in order."""
    first = vocab_size - len(fam.specials)
    return {t: first + i for i, t in enumerate(fam.specials)}


def train_tokenizer(fam: ChatFamily, vocab_size: int, texts: list[str]) -> Any:
    """A `tokenizers.Tokenizer` with `vocab_size` tokens: learnt merges, then specials."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    if fam.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(fam.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(fam.specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    learnt = tok.get_vocab_size()
    # Published tokenizers reserve unused special tokens; here they pad a vocabulary the
    # corpus could not fill (so every id the model can emit decodes), and keep the family's
    # specials at the last ids, where `special_ids` expects them.
    reserved = [f"<|reserved_special_token_{i}|>"
                for i in range(vocab_size - len(fam.specials) - learnt)]
    tok.add_special_tokens(reserved)
    tok.add_special_tokens(list(fam.specials))
    expected = special_ids(fam, vocab_size)
    got = {t: tok.token_to_id(t) for t in fam.specials}
    if got != expected or tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"{fam.name} tokenizer: special ids {got} != {expected}")
    byte_level = processors.ByteLevel(trim_offsets=False)
    if fam.add_bos and fam.bos is not None:
        bos_id = tok.token_to_id(fam.bos)
        tok.post_processor = processors.Sequence([
            byte_level,
            processors.TemplateProcessing(
                single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos}:1 $B:1",
                special_tokens=[(fam.bos, bos_id)]),
        ])
    else:
        tok.post_processor = byte_level
    return tok


def save_tokenizer_dir(tokenizer: PreTrainedTokenizerBase, dest: Path) -> None:
    """save_pretrained, with the chat template in tokenizer_config.json (as hub models have).

    The class is recorded as `PreTrainedTokenizerFast` so that transformers 4.x (vLLM's) and
    5.x load tokenizer.json as it is.
    """
    tokenizer.save_pretrained(str(dest), save_jinja_files=False)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        cfg["chat_template"] = template
        (dest / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True))


def wrap(fam: ChatFamily, tok: Any, max_length: int = 2048) -> PreTrainedTokenizerBase:
    """The transformers tokenizer around a trained `tokenizers.Tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad,
        clean_up_tokenization_spaces=False, model_max_length=max_length,
    )
    fast.chat_template = fam.chat_template
    return fast


def tokenizer_dir(family_name: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """A cached tokenizer directory for the family and size, trained on first use."""
    fam = family(family_name)
    vocab_size = check_vocab_size(vocab_size)
    texts = training_text()
    key = json.dumps({"f": fam.name, "v": vocab_size, "t": _digest(texts), "b": BPE_FORMAT},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    dest = tokenizer_cache_dir() / f"{fam.name}-v{vocab_size}-{digest}"
    if (dest / "tokenizer.json").is_file():
        return dest
    with _LOCK:
        if (dest / "tokenizer.json").is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            tok = train_tokenizer(fam, vocab_size, texts)
            save_tokenizer_dir(wrap(fam, tok), tmp)
            try:
                os.rename(tmp, dest)  # atomic; a racing process may have won
            except OSError:
                if not (dest / "tokenizer.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("tokenizer_trained", family=fam.name, vocab_size=vocab_size, path=str(dest),
             texts=len(texts))
    return dest


def load_tokenizer(family_name: str, vocab_size: int = DEFAULT_VOCAB_SIZE,
                   max_length: int = 2048) -> PreTrainedTokenizerBase:
    """The family's trained tokenizer (from the cache), loaded with AutoTokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(family_name, vocab_size)),
                                        local_files_only=True)
    tok.model_max_length = max_length
    return tok


def token_id(tokenizer: Any, token: str) -> int:
    """The id of a special token that must exist in the tokenizer."""
    value = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(value, int) or value < 0:
        raise ConfigError(f"token {token!r} is missing from the tokenizer", field="model",
                          hint="delete the tokenizer cache entry and rebuild")
    return value
