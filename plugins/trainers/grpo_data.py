"""GRPO data: prompts in the student's one prompt format, fed to trl as the exact token ids.

Each row's prompt is rendered by `plugins.models.prompting` (`task_messages` →
`render_prompt`), the rendering SFT trains on and the endpoint serves. trl's GRPOTrainer
encodes plain-text prompts with the tokenizer's special tokens, which would put a second
`<|begin_of_text|>` before a Llama-3 template's own; `trainer_class()` makes it encode them
with `prompting.encode_prompt` instead. The reward curve is read from the trainer's log
history (one point per logged step), so the report can plot it. trl is imported lazily.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from plugins.models import prompting
from stratosd.api import DataRow, TaskPack
from stratosd.errors import MissingDependency

MAX_CURVE_POINTS = 500  # reward points kept in the metrics (they travel on the bus)


def grpo_records(rows: Sequence[DataRow], task: TaskPack | None, tokenizer: Any,
                 system: str | None = None) -> list[dict[str, str]]:
    """trl rows: the rendered prompt text, plus the answer and question the reward reads."""
    out = []
    for row in rows:
        messages = prompting.task_messages(task, row.question, system)
        out.append({"prompt": prompting.render_prompt(tokenizer, messages).text,
                    "answer": row.answer, "question": row.question})
    return out


def encode_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts `grpo_records` rendered, exactly as `prompting` encodes them."""
    templated = prompting.has_chat_template(tokenizer)
    return [prompting.encode_prompt(tokenizer, prompting.Prompt(text, templated))
            for text in texts]


def trainer_class() -> type:
    """trl's GRPOTrainer, encoding text prompts with `encode_prompts` (built lazily)."""
    from trl import GRPOTrainer

    if not callable(getattr(GRPOTrainer, "_tokenize_prompts", None)):
        raise MissingDependency(
            "this trl's GRPOTrainer has no _tokenize_prompts: GRPO cannot feed it the "
            "student's prompt ids", hint="install the trl version `stratos[train]` pins")

    class PromptingGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose rollouts start from the ids the student is trained and served on."""

        def _tokenize_prompts(self, prompts: list[Any]) -> tuple[Any, Any, dict[str, Any]]:
            if prompts and isinstance(prompts[0], str):
                return encode_prompts(self.processing_class, prompts), None, {}
            return super()._tokenize_prompts(prompts)  # type: ignore[no-any-return]

    return PromptingGRPOTrainer


def reward_curve(log_history: Iterable[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """(step, mean reward) for each logged step, the last MAX_CURVE_POINTS of them."""
    curve = [(int(h.get("step", 0)), round(float(h["reward"]), 5))
             for h in log_history if "reward" in h]
    return curve[-MAX_CURVE_POINTS:]


def quarter_means(curve: Sequence[tuple[int, float]]) -> tuple[float | None, float | None]:
    """Mean reward over the first and the last quarter of the curve (None when empty)."""
    if not curve:
        return None, None
    n = max(len(curve) // 4, 1)
    first = [r for _, r in curve[:n]]
    last = [r for _, r in curve[-n:]]
    return round(sum(first) / n, 5), round(sum(last) / n, 5)
