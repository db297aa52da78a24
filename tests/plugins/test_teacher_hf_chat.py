"""The hf teacher renders chat prompts through `plugins.models.prompting`: one BOS, not two."""

from __future__ import annotations

from typing import Any

import pytest

from plugins.teachers.hf_local import HFTeacher, generate_prompts
from schemas.specs import TeacherSpec
from stratosd.api import TeacherRequest

MODEL = "config:llama3-tiny"  # Llama-3 template writes <|begin_of_text|>; the tokenizer adds it
PROMPTS = ["What is 2+3?", "Name a tile."]


@pytest.fixture(scope="module")
def llama3() -> tuple[Any, Any]:
    from plugins.models.hf import load_model

    return load_model(MODEL)


def test_chat_prompt_ids_have_exactly_one_bos(llama3: tuple[Any, Any]) -> None:
    from plugins.models import prompting

    model, tok = llama3
    bos = tok.bos_token_id
    assert bos is not None
    outs = generate_prompts(model, tok, PROMPTS, chat=True, max_new_tokens=2)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = out.prompt_token_ids
        assert ids[0] == bos and ids.count(bos) == 1, ids[:4]
        # Exactly what a student with this tokenizer is trained on and served.
        rendered = prompting.render_prompt(tok, prompting.user_messages(prompt))
        assert ids == prompting.encode_prompt(tok, rendered)
        assert out.prompt_tokens == len(ids)


def test_rendering_then_default_encoding_would_double_the_bos(llama3: tuple[Any, Any]) -> None:
    # The bug this guards against: template text encoded with add_special_tokens=True.
    _, tok = llama3
    text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok(text)["input_ids"].count(tok.bos_token_id) == 2


def test_raw_prompts_keep_the_tokenizers_own_bos(llama3: tuple[Any, Any]) -> None:
    model, tok = llama3
    [out] = generate_prompts(model, tok, PROMPTS[:1], chat=False, max_new_tokens=2)
    assert out.prompt_token_ids[0] == tok.bos_token_id
    assert out.prompt_token_ids.count(tok.bos_token_id) == 1
    assert out.prompt_token_ids == tok(PROMPTS[0])["input_ids"]


@pytest.mark.slow
@pytest.mark.timeout(180)  # a child process imports torch: slow on a loaded host
async def test_worker_process_counts_one_bos(llama3: tuple[Any, Any]) -> None:
    from plugins.models import prompting

    _, tok = llama3
    teacher = HFTeacher(TeacherSpec(backend="hf", model=MODEL, params={"chat": True}))
    try:
        gens = await teacher.generate([TeacherRequest(prompt=p) for p in PROMPTS],
                                      max_new_tokens=2)
    finally:
        await teacher.aclose()
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        assert gen.error is None
        rendered = prompting.render_prompt(tok, prompting.user_messages(prompt))
        assert gen.prompt_tokens == len(prompting.encode_prompt(tok, rendered))
