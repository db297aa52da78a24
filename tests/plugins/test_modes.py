"""Distillation modes and the mode policy, with real task packs and in-process teachers."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from plugins.modes.alignment import AlignmentMode
from plugins.modes.common import check, leaks_answer, split_reasoning, try_seed
from plugins.modes.hybrid import HybridMode
from plugins.modes.injection import InjectionMode
from plugins.modes.policy import decide, explain_mode
from plugins.tasks.gsm8k import Gsm8kTask
from plugins.tasks.jsonl_qa import JsonlQaTask
from plugins.teachers.reference import ReferenceTeacher
from schemas.specs import TaskSpec, TeacherScore, TeacherSpec
from stratosd import hookimpl
from stratosd.api import (
    Example,
    Generation,
    SynthesisContext,
    TaskPack,
    TeacherBackend,
    TeacherRequest,
)
from stratosd.plugins import Plugins, make_plugin_manager

Script = Callable[[TeacherRequest, int | None, float], str]


class ScriptedTeacher(TeacherBackend):
    """A teacher whose text is a function of the request, seed and temperature."""

    name: ClassVar[str] = "scripted"

    def __init__(self, script: Script) -> None:
        super().__init__(TeacherSpec(backend="scripted", model="s"))
        self.script = script
        self.calls: list[TeacherRequest] = []

    async def generate(
        self, requests: Sequence[TeacherRequest], *, max_new_tokens: int = 256,
        temperature: float = 0.0, seed: int | None = None,
    ) -> list[Generation]:
        self.calls.extend(requests)
        return [Generation(text=self.script(r, seed, temperature)) for r in requests]


@pytest.fixture
def gsm() -> Gsm8kTask:
    return Gsm8kTask({"synthetic": True, "n_train": 12, "n_test": 2})


@pytest.fixture
def qa(tmp_path: Path) -> JsonlQaTask:
    path = tmp_path / "qa.jsonl"
    rows = [("Capital of France?", "Paris"), ("Capital of Italy?", "Rome"),
            ("Capital of Peru?", "Lima"), ("Capital of Chad?", "N'Djamena")]
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return JsonlQaTask({"train_path": str(path), "test_path": str(path)})


def ctx_for(task: TaskPack, teacher: TeacherBackend, *, tries: int = 4,
            reference: bool = False) -> SynthesisContext:
    ref = ReferenceTeacher(TeacherSpec(backend="reference", model=task.name), task)
    return SynthesisContext(task=task, teacher=teacher, teacher_name="t",
                            reference=ref if reference else None, tries=tries)


def solution(ex: Example) -> str:
    return f"{ex.meta['solution']}\nAnswer: {ex.answer}"


async def test_alignment_keeps_the_first_correct_sample(gsm: Gsm8kTask) -> None:
    ex = gsm.examples("train")[0]
    # Greedy (temperature 0) is wrong; sampled tries are right.
    teacher = ScriptedTeacher(lambda _r, _s, t: solution(ex) if t > 0 else "Answer: -1")
    row = await AlignmentMode().synthesize(ex, ctx_for(gsm, teacher))
    assert row is not None and row.tries == 2 and row.mode == "alignment"
    assert row.verified is True and row.teacher == "t"
    assert teacher.calls[0].answer is None  # forward: the teacher never saw the answer
    assert row.target == gsm.format_target(row.reasoning, ex.answer)


async def test_alignment_gives_up_after_tries(gsm: Gsm8kTask) -> None:
    ex = gsm.examples("train")[0]
    teacher = ScriptedTeacher(lambda *_: "no idea")
    assert await AlignmentMode().synthesize(ex, ctx_for(gsm, teacher, tries=3)) is None
    assert len(teacher.calls) == 3


async def test_alignment_rejects_right_answer_with_wrong_reasoning(gsm: Gsm8kTask) -> None:
    ex = gsm.examples("train")[0]
    teacher = ScriptedTeacher(lambda *_: f"7 + 7 = 15\nAnswer: {ex.answer}")
    assert await AlignmentMode().synthesize(ex, ctx_for(gsm, teacher, tries=2)) is None


async def test_injection_rejection_sampling_and_reference_fallback(gsm: Gsm8kTask) -> None:
    exs = gsm.examples("train")
    seeds_ok = {try_seed(0, ex.id, 2) for ex in exs}  # only the third try is ever right

    def script(r: TeacherRequest, seed: int | None, _t: float) -> str:
        ex = next(e for e in exs if e.question == r.question)
        return solution(ex) if seed in seeds_ok else f"2 + 2 = 5\nAnswer: {r.answer}"

    teacher = ScriptedTeacher(script)
    row = await InjectionMode().synthesize(exs[0], ctx_for(gsm, teacher, tries=4))
    assert row is not None and row.tries == 3 and row.teacher == "t" and row.verified is True
    assert teacher.calls[0].answer == exs[0].answer  # the teacher was given the answer
    # Two tries only: all fail the verifier; without a reference nothing is kept ...
    assert await InjectionMode().synthesize(exs[1], ctx_for(gsm, teacher, tries=2)) is None
    # ... with one, the reference reasoner writes the row, and says so.
    row = await InjectionMode().synthesize(exs[1], ctx_for(gsm, teacher, tries=2,
                                                           reference=True))
    assert row is not None and row.teacher == "reference" and row.verified is True
    assert row.tries == 3 and row.mode == "injection"
    assert gsm.verify(row.question, row.reasoning, row.answer) is True


async def test_injection_without_verifier_checks_answer_and_leaks(qa: JsonlQaTask) -> None:
    ex = qa.examples("train")[0]
    leaky = ScriptedTeacher(lambda r, *_: f"The correct answer is {r.answer}.\nAnswer: {r.answer}")
    assert await InjectionMode().synthesize(ex, ctx_for(qa, leaky, tries=2)) is None
    honest = ScriptedTeacher(lambda r, *_: f"Its seat of government is there.\nAnswer: {r.answer}")
    row = await InjectionMode().synthesize(ex, ctx_for(qa, honest))
    assert row is not None and row.verified is None  # no verifier: answer check only
    # jsonl-qa has no reference reasoner: the fallback cannot invent one.
    assert await InjectionMode().synthesize(ex, ctx_for(qa, leaky, tries=1,
                                                        reference=True)) is None


async def test_hybrid_aligns_known_questions_and_injects_the_rest(qa: JsonlQaTask) -> None:
    known = {"Capital of France?": "Paris", "Capital of Italy?": "Rome"}

    def script(r: TeacherRequest, *_: object) -> str:
        if r.answer is not None:  # injection: reasons towards the given answer
            return f"Recalling the atlas entry.\nAnswer: {r.answer}"
        return f"I remember this one.\nAnswer: {known.get(r.question, 'London')}"

    teacher = ScriptedTeacher(script)
    rows = [await HybridMode().synthesize(ex, ctx_for(qa, teacher, tries=4))
            for ex in qa.examples("train")]
    assert all(r is not None for r in rows)
    modes = {r.question: (r.mode, r.tries) for r in rows if r is not None}
    assert modes["Capital of France?"] == ("alignment", 1)
    assert modes["Capital of Peru?"] == ("injection", 3)  # 2 forward tries, then injected


def test_check_and_split() -> None:
    text = "Step one.\nStep two.\nAnswer: 4"
    assert split_reasoning(text) == "Step one.\nStep two."
    assert split_reasoning("Final answer: 3") == ""
    assert leaks_answer("Since we are told the answer is 5, ...")
    assert not leaks_answer("Add the two numbers to get 5.")
    gsm = Gsm8kTask({"synthetic": True, "n_train": 2, "n_test": 1})
    ex = gsm.examples("train")[0]
    assert check(gsm, ex, solution(ex)).ok
    assert check(gsm, ex, "Answer: " + ex.answer).reason == "no reasoning before the answer"


def _score(acc: float, n: int = 10) -> TeacherScore:
    return TeacherScore(name="t", backend="openai", model="m", accuracy=acc, n=n,
                        correct=round(acc * n))


def test_policy_threshold_is_inclusive_and_explained() -> None:
    assert decide(0.5, 0.5) == "alignment"
    assert decide(0.49, 0.5) == "injection"
    line = explain_mode(_score(0.1), 0.5)
    assert line == "teacher t probe accuracy 10% [95% CI 2–40%, n=10] < threshold 50%: injection"
    plugins = Plugins(make_plugin_manager(autoload=False))
    task = TaskSpec(name="gsm8k")
    assert plugins.choose_mode(task, _score(0.9), 0.5) == "alignment"
    # Changed on purpose with the interval-aware policy: 9/10 has a 95% interval of 60–98%,
    # which straddles 0.95, so the built-in policy now hedges with hybrid; a probe large
    # enough to separate 0.9 from 0.95 still gets injection.
    assert plugins.choose_mode(task, _score(0.9), 0.95) == "hybrid"
    assert plugins.choose_mode(task, _score(0.9, n=400), 0.95) == "injection"


def test_policy_is_trylast_so_a_plugin_can_override() -> None:
    class PreferHybrid:
        @hookimpl
        def stratos_choose_mode(self, task: TaskSpec, teacher: TeacherScore,
                                threshold: float) -> str | None:
            return "hybrid" if 0.3 <= teacher.accuracy < 0.7 else None

    plugins = Plugins(make_plugin_manager(autoload=False, extra=[PreferHybrid()]))
    task = TaskSpec(name="gsm8k")
    assert plugins.choose_mode(task, _score(0.5), 0.5) == "hybrid"
    assert plugins.choose_mode(task, _score(0.9), 0.5) == "alignment"  # falls through


def test_modes_are_registered() -> None:
    plugins = Plugins(make_plugin_manager(autoload=False))
    assert {"alignment", "injection", "hybrid"} <= set(plugins.modes.names())
