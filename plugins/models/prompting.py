"""The one prompt format: how a question becomes messages, text and token ids, everywhere.

Training, local evaluation, the built-in endpoint, the endpoint evaluator and the deploy
probe all go through this module, so a served request is exactly what the student was
trained on:

- the conversation is `[system?] + user` where the user content is `task.prompt(question)`
  (`user_content`); clients send it as chat messages (`user_messages`);
- with a chat template, the prompt is the template's rendering with the generation prompt,
  tokenized without adding special tokens (the template already wrote them: adding them
  again would give Llama-3 two `<|begin_of_text|>`); the trained completion is what the
  template appends for the assistant turn, up to and including its end-of-turn token;
- without one (plain format), the prompt is the message contents joined by newlines,
  tokenized with the tokenizer's own special tokens, and the completion is the target
  plus eos, as the pipeline always did.

Loss is on the completion tokens only (`encode_example` marks them). Heavy imports are lazy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stratosd.errors import ConfigError

if TYPE_CHECKING:
    from plugins.models.hf import GenOut
    from stratosd.api import TaskPack

Message = dict[str, str]
PLAIN_SEPARATOR = "\n"
_SENTINEL = "\x00stratos-target\x00"


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt and whether the tokenizer may add its special tokens to it."""

    text: str
    templated: bool  # rendered by the chat template: encode with add_special_tokens=False

    @property
    def add_special_tokens(self) -> bool:
        """What to pass to the tokenizer for this prompt."""
        return not self.templated


@dataclass(frozen=True)
class Rendered:
    """One training example as text: the prompt and the completion trained on."""

    prompt: Prompt
    completion: str


def user_content(task: TaskPack | None, question: str) -> str:
    """The user message of a question: the task's forward prompt (the question without one)."""
    return task.prompt(question) if task is not None else question


def user_messages(content: str, system: str | None = None) -> list[Message]:
    """The chat messages for one user turn (with an optional system message first)."""
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": content}]


def task_messages(task: TaskPack | None, question: str,
                  system: str | None = None) -> list[Message]:
    """The chat messages a student sees for a question, in training and when served."""
    return user_messages(user_content(task, question), system)


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer has a chat template (a string, or named templates)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _apply(tokenizer: Any, messages: Sequence[Message], *, generation: bool) -> str:
    import jinja2

    try:
        return str(tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                 add_generation_prompt=generation))
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"the chat template failed on {len(messages)} message(s): {exc}",
                          hint="check the tokenizer's chat_template (roles it accepts)",
                          field="messages") from exc


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> Prompt:
    """The prompt for messages: the chat template with the generation prompt, else plain."""
    if has_chat_template(tokenizer):
        return Prompt(_apply(tokenizer, messages, generation=True), templated=True)
    return Prompt(PLAIN_SEPARATOR.join(m["content"] for m in messages), templated=False)


def end_of_turn_tokens(tokenizer: Any) -> list[str]:
    """Special tokens that end an assistant turn: eos and the template's end-of-turn token."""
    tokens = [tokenizer.eos_token] if tokenizer.eos_token else []
    if not has_chat_template(tokenizer):
        return tokens
    try:
        full = _apply(tokenizer, [{"role": "user", "content": "x"},
                                  {"role": "assistant", "content": _SENTINEL}],
                      generation=False)
    except ConfigError:
        return tokens
    tail = full.rpartition(_SENTINEL)[2].strip()
    specials = set(getattr(tokenizer, "all_special_tokens", [])) | {
        str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
        if getattr(t, "special", False)}
    first = next((s for s in sorted(specials, key=len, reverse=True) if tail.startswith(s)),
                 None)
    if first and first not in tokens:
        tokens.append(first)
    return tokens


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Ids of `end_of_turn_tokens` (generation stops at any of them)."""
    ids = []
    for token in end_of_turn_tokens(tokenizer):
        i = tokenizer.convert_tokens_to_ids(token)
        if isinstance(i, int) and i >= 0 and i not in ids:
            ids.append(i)
    return ids


def render_example(tokenizer: Any, messages: Sequence[Message], target: str) -> Rendered:
    """Prompt and completion text of a training example (completion ends the turn)."""
    prompt = render_prompt(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    if not prompt.templated:
        return Rendered(prompt, target if target.endswith(eos) else target + eos)
    full = _apply(tokenizer, [*messages, {"role": "assistant", "content": target}],
                  generation=False)
    if not full.startswith(prompt.text):
        raise ConfigError(
            "the chat template renders a conversation's prompt differently from the prompt "
            "alone, so a served prompt could not equal the trained one",
            hint="use a chat template whose generation prompt is a prefix of the rendered "
                 "assistant turn", field="model")
    completion = full[len(prompt.text):]
    ends = end_of_turn_tokens(tokenizer)
    kept = completion.rstrip()  # what follows the end-of-turn token is never generated
    if any(kept.endswith(t) for t in ends):
        return Rendered(prompt, kept)
    # A template without an end-of-turn token (the char-level one): end with eos.
    return Rendered(prompt, completion if completion.endswith(eos) else completion + eos)


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The prompt's token ids, as the endpoint and local generation feed them to the model."""
    ids = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
    return [int(i) for i in ids]


def encode_example(tokenizer: Any, messages: Sequence[Message],
                   target: str) -> dict[str, list[int]]:
    """Token ids of an example and its completion mask (1 = in the loss: the answer turn)."""
    rendered = render_example(tokenizer, messages, target)
    prompt_ids = encode_prompt(tokenizer, rendered.prompt)
    completion_ids = [int(i) for i in
                      tokenizer(rendered.completion, add_special_tokens=False)["input_ids"]]
    return {"input_ids": prompt_ids + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def generate_chat(model: Any, tokenizer: Any, conversations: Sequence[Sequence[Message]],
                  **kwargs: Any) -> list[GenOut]:
    """Generate one answer per conversation, rendered and encoded as above."""
    from plugins.models.hf import generate_batch

    prompts = [render_prompt(tokenizer, msgs) for msgs in conversations]
    if not prompts:
        return []
    return generate_batch(model, tokenizer, [p.text for p in prompts],
                          add_special_tokens=prompts[0].add_special_tokens, **kwargs)
