"""One prompt format: what the student trains on is exactly what the endpoint feeds it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from plugins.deployers.http_builtin import OpenAIServer
from plugins.models import hf, prompting
from stratosd.api import DataRow, Example, Split, TaskPack, TrainContext
from stratosd.errors import ConfigError


class SumTask(TaskPack):
    """Two-digit sums with a prompt that ends in a newline (Llama-3's template trims it)."""

    name: ClassVar[str] = "test-sum"

    def examples(self, split: Split) -> list[Example]:
        return [Example(id=f"{a}-{b}", question=f"{a}+{b}", answer=str(a + b))
                for a, b in ((12, 30), (7, 5), (40, 2))]

    def prompt(self, question: str) -> str:
        return f"What is {question}?\n"

    def format_target(self, reasoning: str, answer: str) -> str:
        return f"Answer: {answer}"

    def extract(self, output: str) -> str | None:
        return output.rpartition("Answer:")[2].strip() or None

    def score(self, predicted: str | None, gold: str) -> float:
        return float(predicted == gold)


def _rows(task: TaskPack) -> list[DataRow]:
    return [DataRow(example_id=ex.id, question=ex.question, answer=ex.answer, reasoning="",
                    target=task.format_target("", ex.answer), teacher="reference",
                    mode="injection", verified=True) for ex in task.examples("train")]


def _trained_on(ref: str, tmp_path: Path) -> tuple[list[list[int]], list[list[int]]]:
    """input_ids and labels of the SFT trainer's prepared dataset (trl, not re-derived)."""
    from plugins.trainers import hparams
    from plugins.trainers.sft import FullSFTTrainer

    task = SumTask()
    trainer_cls = FullSFTTrainer()
    ctx = TrainContext(model=ref, train_file=tmp_path / "rows.jsonl", out_dir=tmp_path / "out",
                       checkpoint_dir=tmp_path / "ckpt", params={"max_steps": 1}, task=task)
    model, tokenizer = hf.load_model(ref, for_training=True)
    params = hparams.resolve_params(trainer_cls.name, 10_000, ctx.params, trainer_cls.allowed(),
                                    cuda=False)
    dataset = trainer_cls.dataset(_rows(task), ctx, tokenizer)
    trainer, _ = trainer_cls.build(model, tokenizer, dataset, params, ctx, cuda=False)
    prepared = trainer.train_dataset
    return [list(r["input_ids"]) for r in prepared], [list(r["labels"]) for r in prepared]


def _prompt_part(ids: list[int], labels: list[int]) -> list[int]:
    n = next(i for i, label in enumerate(labels) if label != -100)
    assert all(label == -100 for label in labels[:n])
    assert labels[n:] == ids[n:]  # every completion token is in the loss
    return ids[:n]


def _served_prompt_ids(url: str, messages: list[dict[str, str]], *, stream: bool) -> list[int]:
    body: dict[str, Any] = {"model": "student", "messages": messages, "max_tokens": 2,
                            "return_token_ids": True, "stream": stream}
    if not stream:
        resp = httpx.post(url + "/chat/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        data = resp.json()
        assert data["usage"]["prompt_tokens"] == len(data["prompt_token_ids"])
        assert data["choices"][0]["token_ids"]
        return list(data["prompt_token_ids"])
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=60) as resp:
        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: {")]
    return list(json.loads(lines[0].removeprefix("data: "))["prompt_token_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("ref", ["config:qwen2-tiny", "config:llama3-tiny", "config:tiny"])
def test_served_request_ids_equal_the_ids_trained_on(ref: str, tmp_path: Path) -> None:
    from plugins.models.evaluate import local_generator

    task = SumTask()
    ids, labels = _trained_on(ref, tmp_path)
    trained_prompts = [_prompt_part(i, lab) for i, lab in zip(ids, labels, strict=True)]
    questions = [ex.question for ex in task.examples("train")]
    path = hf.resolve_model(ref)
    with OpenAIServer(path, served_name="student") as srv:
        for q, trained in zip(questions, trained_prompts, strict=True):
            # The messages every client sends: endpoint eval, the deploy probe, the demo.
            messages = prompting.user_messages(prompting.user_content(task, q))
            assert messages == prompting.task_messages(task, q)
            assert _served_prompt_ids(srv.url, messages, stream=False) == trained
            assert _served_prompt_ids(srv.url, messages, stream=True) == trained
    local = local_generator(path, max_new_tokens=2)([task.prompt(q) for q in questions])
    assert [g.prompt_token_ids for g in local] == trained_prompts
    _, tok = hf.load_model(path)
    completion = tok.decode(ids[0][len(trained_prompts[0]):])
    end = {"config:tiny": "</s>", "config:qwen2-tiny": "<|im_end|>"}.get(ref, "<|eot_id|>")
    assert completion == "Answer: 42" + end  # the answer turn and its end, nothing more


@pytest.mark.slow
def test_student_without_chat_template_uses_the_plain_format(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(hf.resolve_model("config:llama3-tiny"), plain)
    cfg_path = plain / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    _, tok = hf.load_model(str(plain))
    assert not prompting.has_chat_template(tok)
    task = SumTask()
    ids, labels = _trained_on(str(plain), tmp_path)
    trained = _prompt_part(ids[0], labels[0])
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert trained[0] == bos and trained.count(bos) == 1  # the tokenizer's own BOS, once
    assert tok.decode(trained, skip_special_tokens=True) == task.prompt("12+30")
    assert tok.decode(ids[0][len(trained):]) == "Answer: 42" + tok.eos_token
    with OpenAIServer(str(plain), served_name="student") as srv:
        messages = prompting.task_messages(task, "12+30")
        assert _served_prompt_ids(srv.url, messages, stream=False) == trained


def test_chatml_example_renders_the_assistant_turn_only_as_completion() -> None:
    from plugins.models import bpe

    tok = bpe.load_tokenizer("qwen2")
    msgs = prompting.task_messages(SumTask(), "7+5", system="Be brief.")
    rendered = prompting.render_example(tok, msgs, "Answer: 12")
    assert rendered.prompt.text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                    "What is 7+5?\n<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.completion == "Answer: 12<|im_end|>"
    ex = prompting.encode_example(tok, msgs, "Answer: 12")
    n = ex["completion_mask"].count(0)
    assert ex["completion_mask"] == [0] * n + [1] * (len(ex["input_ids"]) - n)
    assert tok.decode(ex["input_ids"][n:]) == "Answer: 12<|im_end|>"


def test_llama3_prompt_ids_equal_transformers_own_chat_tokenization() -> None:
    from plugins.models import bpe

    tok = bpe.load_tokenizer("llama3")
    msgs = prompting.task_messages(SumTask(), "7+5")
    ours = prompting.encode_prompt(tok, prompting.render_prompt(tok, msgs))
    theirs = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)
    assert ours.count(tok.convert_tokens_to_ids("<|begin_of_text|>")) == 1  # not two


def test_end_of_turn_token_stops_generation_even_when_eos_differs() -> None:
    from plugins.models import bpe

    tok = bpe.load_tokenizer("qwen2")
    tok.eos_token = "<|endoftext|>"  # as in Qwen2 base models: eos is not the turn end
    assert prompting.end_of_turn_tokens(tok) == ["<|endoftext|>", "<|im_end|>"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in prompting.end_of_turn_ids(tok)


def test_char_level_model_keeps_prompt_plus_target_plus_eos() -> None:
    tok = hf.build_char_tokenizer()
    rendered = prompting.render_example(tok, prompting.user_messages("1+2="), "3")
    assert (rendered.prompt.text, rendered.completion) == ("1+2=", "3</s>")


def test_a_template_that_refuses_the_messages_is_a_config_error() -> None:
    tok = hf.build_char_tokenizer()
    tok.chat_template = "{{ raise_exception('no system messages') }}"
    with pytest.raises(ConfigError, match="no system messages"):
        prompting.render_prompt(tok, prompting.user_messages("x", system="s"))
