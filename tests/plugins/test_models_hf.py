"""plugins.models.hf: tiny config models, local loading, adapters, offline hub errors."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from plugins.models import hf
from stratosd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STRATOS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _weights_digest(path: str) -> str:
    return hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()


def test_char_tokenizer_round_trips_printable_text() -> None:
    tok = hf.build_char_tokenizer()
    text = "Q: 12 + 30 = ?\nAnswer: 42 {x} ~`|"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert len(tok) == len(hf.VOCAB)


def test_chat_template_renders_contents_verbatim() -> None:
    tok = hf.build_char_tokenizer()
    msgs = [{"role": "user", "content": "What is 2+2?\nThink."}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "What is 2+2?\nThink."


def test_config_model_is_deterministic(tmp_path: Path) -> None:
    a = hf.resolve_model("config:tiny", seed=3, cache_dir=tmp_path / "a")
    b = hf.resolve_model("config:tiny", seed=3, cache_dir=tmp_path / "b")
    assert a != b and _weights_digest(a) == _weights_digest(b)


@pytest.mark.slow
def test_config_model_is_deterministic_across_processes(tmp_path: Path) -> None:
    here = hf.resolve_model("config:tiny", seed=3, cache_dir=tmp_path / "a")
    code = (
        "import sys; from pathlib import Path; from plugins.models import hf; "
        "print(hf.resolve_model('config:tiny', seed=3, cache_dir=Path(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "b")], cwd=REPO, check=True,
        capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]
    assert out != here
    assert _weights_digest(out) == _weights_digest(here)
    other_seed = hf.resolve_model("config:tiny", seed=4, cache_dir=tmp_path / "a")
    assert _weights_digest(other_seed) != _weights_digest(here)


@pytest.mark.slow
def test_racing_processes_share_one_cache_entry(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from plugins.models import hf; "
        "print(hf.resolve_model('config:tiny', seed=5, cache_dir=Path(sys.argv[1])))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    paths = {p.communicate(timeout=50)[0].strip().splitlines()[-1] for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    assert [d.name for d in tmp_path.iterdir()] == [Path(paths.pop()).name]  # no temp leftovers


def test_threads_build_identical_weights(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda d: hf.resolve_model("config:tiny", seed=9, cache_dir=tmp_path / d),
                        ["x", "y"])
    assert _weights_digest(a) == _weights_digest(b)


def test_resolve_is_cached_and_overrides_apply(tmp_path: Path) -> None:
    first = hf.resolve_model("config:tiny?hidden_size=32&num_hidden_layers=1", cache_dir=tmp_path)
    again = hf.resolve_model("config:tiny?hidden_size=32&num_hidden_layers=1", cache_dir=tmp_path)
    assert first == again
    model, _ = hf.load_model(first)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert model.config.max_position_embeddings >= 1024


def test_unknown_config_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown tiny model config 'huge'"):
        hf.resolve_model("config:huge")


def test_save_and_load_from_a_local_path(tmp_path: Path) -> None:
    model, tok = hf.load_model("config:tiny", seed=1)
    out = tmp_path / "copy"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert hf.resolve_model(str(out)) == str(out)
    model2, tok2 = hf.load_model(str(out))
    prompts = ["2+2=", "Hello, world"]
    a = hf.generate_batch(model, tok, prompts, max_new_tokens=8)
    b = hf.generate_batch(model2, tok2, prompts, max_new_tokens=8)
    assert a == b
    assert all(g.completion_tokens <= 8 for g in a)
    assert [g.prompt_tokens for g in a] == [4, 12]


def test_batched_generation_matches_single_prompts() -> None:
    model, tok = hf.load_model("config:tiny")
    prompts = ["a", "a much longer prompt here", "mid length"]
    batched = hf.generate_batch(model, tok, prompts, max_new_tokens=6)
    single = [hf.generate_batch(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]


def test_adapter_directory_loads_on_its_base(tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    base_path = hf.resolve_model("config:tiny")
    base, tok = hf.load_model(base_path, for_training=True)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # make the adapter change outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert hf.is_adapter_dir(adapter)
    loaded, tok2 = hf.load_model(str(adapter))
    assert type(loaded).__name__.startswith("Peft")
    plain, _ = hf.load_model(base_path)
    a = hf.generate_batch(loaded, tok2, ["x="], max_new_tokens=5)
    b = hf.generate_batch(plain, tok2, ["x="], max_new_tokens=5)
    assert a[0].text != b[0].text


def test_unknown_hub_id_offline_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not be loaded: not a local path") as info:
        hf.load_model("nobody-here/not-a-model-xyz")
    assert "config:" in info.value.hint


def test_missing_local_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        hf.resolve_model("./no/such/dir")


def test_bpe_config_model_stops_at_the_end_of_turn_token() -> None:
    model, tok = hf.load_model("config:qwen2-tiny")
    eos = hf.eos_token_ids(model, tok)
    assert eos[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.convert_tokens_to_ids("<|endoftext|>") in eos
    out = hf.generate_batch(model, tok, ["Hello", "A longer prompt"], max_new_tokens=4)
    assert [len(g.prompt_token_ids) for g in out] == [g.prompt_tokens for g in out]
    assert out[0].prompt_token_ids == tok("Hello")["input_ids"]  # padding left out
