"""`config:` Qwen2/Llama-3-style models: trained BPE tokenizers, chat templates, HF dirs, cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from plugins.models import bpe, hf, tiny
from stratosd.errors import ConfigError

BPE_REFS = ["config:qwen2-tiny", "config:llama3-tiny", "config:qwen2-tiny-tied"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_names_parse_and_unknown_ones_list_the_bpe_families() -> None:
    assert tiny.model_spec("qwen2-small-tied") == tiny.ModelSpec(
        name="qwen2-small-tied", size="small", arch="qwen2", tied=True)
    assert tiny.model_spec("llama3-base").arch == "llama3"
    assert not tiny.model_spec("tiny").bpe and tiny.model_spec("llama3-tiny").bpe
    with pytest.raises(ConfigError, match="unknown tiny model config 'qwen2-huge'") as info:
        hf.resolve_model("config:qwen2-huge")
    assert "config:qwen2-tiny" in info.value.hint and "config:llama3-tiny-tied" in info.value.hint


def test_config_dict_predicts_the_special_ids() -> None:
    cfg = tiny.model_config_dict("qwen2-tiny", {"vocab_size": 1024})
    ids = bpe.special_ids(bpe.FAMILIES["qwen2"], 1024)
    assert cfg["vocab_size"] == 1024 and cfg["eos_token_id"] == ids["<|im_end|>"]
    assert cfg["pad_token_id"] == ids["<|endoftext|>"] and not cfg["tie_word_embeddings"]
    assert tiny.model_config_dict("llama3-tiny-tied")["tie_word_embeddings"] is True
    with pytest.raises(ConfigError, match="vocab_size"):
        tiny.model_config_dict("qwen2-tiny", {"vocab_size": 10})


def test_corpus_ships_as_small_plain_text() -> None:
    data = bpe.ENGLISH_CORPUS.read_bytes()
    assert 10_000 < len(data) < 400_000
    text = data.decode("utf-8")
    assert all(c.isprintable() or c == "\n" for c in text)


@pytest.mark.parametrize("ref", BPE_REFS)
def test_build_is_an_ordinary_hf_directory(ref: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(hf.resolve_model(ref))
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    spec = tiny.model_spec(ref.removeprefix("config:"))
    fam = bpe.FAMILIES[spec.arch]
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == fam.chat_template
    assert tok_cfg["eos_token"] == fam.eos
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert len(tok) == model.config.vocab_size == bpe.DEFAULT_VOCAB_SIZE
    expected = {"qwen2": "Qwen2ForCausalLM", "llama3": "LlamaForCausalLM"}[spec.arch]
    assert type(model).__name__ == expected
    gen = json.loads((path / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids(fam.eos) in gen["eos_token_id"]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == spec.tied


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_tokenizer_is_byte_level_with_single_special_tokens(family: str) -> None:
    tok = bpe.load_tokenizer(family)
    text = "Héllo, wörld! 12 + 345 = 357 🚀 日本語\n\ttabs  and  spaces "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: nothing is unknown or lost
    assert len(ids) < len(text.encode())  # merges were learnt
    for special in bpe.FAMILIES[family].specials:
        assert tok(special, add_special_tokens=False)["input_ids"] == [
            tok.convert_tokens_to_ids(special)]


def test_chat_templates_are_chatml_and_llama3() -> None:
    msgs = [{"role": "user", "content": "1+2="}]
    qwen = bpe.load_tokenizer("qwen2")
    assert qwen.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n")
    llama = bpe.load_tokenizer("llama3")
    assert llama.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n1+2=<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # Llama-3 prepends <|begin_of_text|> to plain text too; Qwen2 has no BOS.
    bos = llama.convert_tokens_to_ids("<|begin_of_text|>")
    assert llama("hi")["input_ids"][0] == bos and qwen.bos_token is None


def test_tokenizers_are_trained_once_and_keyed_by_spec(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATOS_MODEL_CACHE", str(tmp_path / "cache"))
    with capture_logs() as logs:
        first = bpe.tokenizer_dir("qwen2", 1024)
        again = bpe.tokenizer_dir("qwen2", 1024)
        other = bpe.tokenizer_dir("qwen2", 1536)
    assert first == again != other
    assert [e["vocab_size"] for e in logs if e["event"] == "tokenizer_trained"] == [1024, 1536]
    assert first.parent == tmp_path / "cache" / "tokenizers"
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temp dirs
    # Training is deterministic: a fresh cache trains the same tokenizer.
    monkeypatch.setenv("STRATOS_MODEL_CACHE", str(tmp_path / "cache2"))
    assert _digest(bpe.tokenizer_dir("qwen2", 1024) / "tokenizer.json") == _digest(
        first / "tokenizer.json")


def test_builds_are_deterministic_and_vocab_size_applies(tmp_path: Path) -> None:
    ref = "config:llama3-tiny?vocab_size=1024&num_hidden_layers=1"
    a = Path(hf.resolve_model(ref, seed=2, cache_dir=tmp_path / "a"))
    b = Path(hf.resolve_model(ref, seed=2, cache_dir=tmp_path / "b"))
    assert _digest(a / "model.safetensors") == _digest(b / "model.safetensors")
    assert _digest(a / "tokenizer.json") == _digest(b / "tokenizer.json")
    model, tok = hf.load_model(str(a))
    assert model.config.vocab_size == len(tok) == 1024
    assert model.config.num_hidden_layers == 1
    assert tok.pad_token == tok.eos_token == "<|eot_id|>"  # Llama-3 has no pad token


def test_char_level_tiny_is_unchanged(tmp_path: Path) -> None:
    path = Path(hf.resolve_model("config:tiny", cache_dir=tmp_path))
    assert path.name.startswith("tiny-s0-f1de917748f4")  # the cache key did not move
    _, tok = hf.load_model(str(path))
    assert len(tok) == len(hf.VOCAB) and tok.chat_template == hf.CHAT_TEMPLATE
