"""Shared by the distillation modes: the acceptance check, seeds, and the sampling loops.

A teacher's text is accepted when its extracted answer is the gold answer *and* the task's
verifier (when it has one) does not reject the reasoning. Injection adds a leak check: the
reasoning must not lean on having been told the answer, since the student never is.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import msgspec

from stratosd.api import (
    DataRow,
    Example,
    SynthesisContext,
    TaskPack,
    TeacherBackend,
    TeacherRequest,
)

_ANSWER_LINE = re.compile(r"(?im)^\s*(?:final\s+)?answer\s*:")
_LEAK = re.compile(
    r"(?i)\b(?:the\s+correct\s+answer\s+is|(?:we\s+are|i\s+am|i\s+was|we\s+were)\s+told|"
    r"given\s+(?:the\s+)?answer|answer\s+(?:is\s+)?(?:given|provided)|provided\s+answer)\b"
)


@dataclass(frozen=True)
class Check:
    """The verdict on one teacher text."""

    ok: bool
    reasoning: str
    predicted: str | None
    verified: bool | None
    reason: str = ""


def split_reasoning(text: str) -> str:
    """The reasoning part of a teacher text: everything before its last `Answer:` line."""
    matches = list(_ANSWER_LINE.finditer(text))
    if matches:
        text = text[: matches[-1].start()]
    else:
        idx = text.lower().rfind("answer:")
        if idx >= 0:
            text = text[:idx]
    return text.strip()


def leaks_answer(reasoning: str) -> bool:
    """True when the reasoning says it was handed the answer (useless to a student)."""
    return bool(_LEAK.search(reasoning))


def check(task: TaskPack, example: Example, text: str, *, injected: bool = False) -> Check:
    """Accept text when its answer is right and the verifier (if any) agrees."""
    predicted = task.extract(text)
    reasoning = split_reasoning(text)
    if task.score(predicted, example.answer) < 1.0:
        return Check(False, reasoning, predicted, None, f"wrong answer {predicted!r}")
    if not reasoning:
        return Check(False, reasoning, predicted, None, "no reasoning before the answer")
    if injected and leaks_answer(reasoning):
        return Check(False, reasoning, predicted, None, "reasoning cites the given answer")
    verified = task.verify(example.question, reasoning, example.answer)
    if verified is False:
        return Check(False, reasoning, predicted, False, "verifier rejected the reasoning")
    return Check(True, reasoning, predicted, verified)


def try_seed(base: int, example_id: str, attempt: int) -> int:
    """A stable per-(run seed, example, try) seed, so reruns ask for the same samples."""
    digest = hashlib.blake2b(f"{base}:{example_id}:{attempt}".encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "big") & 0x7FFFFFFF


def make_row(task: TaskPack, example: Example, c: Check, *, teacher: str, mode: str,
             tries: int) -> DataRow:
    """A DataRow with provenance; the target always ends in the canonical gold answer."""
    return DataRow(
        example_id=example.id, question=example.question, answer=example.answer,
        reasoning=c.reasoning, target=task.format_target(c.reasoning, example.answer),
        teacher=teacher, mode=mode, tries=tries, verified=c.verified,
    )


async def sample_until_accepted(
    ctx: SynthesisContext,
    example: Example,
    *,
    teacher: TeacherBackend,
    injected: bool,
    tries: int,
    first_try: int = 0,
) -> tuple[Check | None, int]:
    """Ask teacher up to `tries` times (one request each, distinct seeds); stop at the first
    accepted text. Returns (accepted check or None, tries used)."""
    if injected:
        request = TeacherRequest(
            prompt=ctx.task.injection_prompt(example.question, example.answer),
            question=example.question, answer=example.answer,
        )
    else:
        request = TeacherRequest(prompt=ctx.task.prompt(example.question),
                                 question=example.question)
    used = 0
    for attempt in range(first_try, first_try + tries):
        used += 1
        # The first forward try is greedy: the teacher's own best answer is what we align to.
        temperature = 0.0 if attempt == 0 and not injected else ctx.temperature
        [gen] = await teacher.generate(
            [request], max_new_tokens=ctx.max_new_tokens, temperature=temperature,
            seed=try_seed(ctx.seed, example.id, attempt),
        )
        if gen.error is not None:
            continue
        verdict = check(ctx.task, example, gen.text, injected=injected)
        if verdict.ok:
            return verdict, used
    return None, used


async def inject(ctx: SynthesisContext, example: Example, *, tries: int,
                 tries_before: int = 0) -> DataRow | None:
    """Knowledge Injection for one example: k answer-conditioned tries, then the reference."""
    accepted, used = await sample_until_accepted(
        ctx, example, teacher=ctx.teacher, injected=True, tries=tries
    )
    total = tries_before + used
    if accepted is not None:
        return make_row(ctx.task, example, accepted, teacher=ctx.teacher_name,
                        mode="injection", tries=total)
    if ctx.reference is None:
        return None
    [gen] = await ctx.reference.generate(
        [TeacherRequest(prompt=ctx.task.injection_prompt(example.question, example.answer),
                        question=example.question, answer=example.answer)],
        max_new_tokens=ctx.max_new_tokens,
    )
    if gen.error is not None:
        return None
    verdict = check(ctx.task, example, gen.text, injected=True)
    if not verdict.ok:
        return None
    # The reference reasoner is correct by construction; a verifier, when present, agreed.
    row = make_row(ctx.task, example, verdict, teacher="reference", mode="injection",
                   tries=total + 1)
    return msgspec.structs.replace(row, verified=True)
