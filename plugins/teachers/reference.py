"""`reference` teacher: the task pack's own reference reasoner, used as a teacher.

It can only justify answers it is given (Knowledge Injection and the injection fallback);
a forward request without an answer comes back as an error Generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from plugins.teachers.common import TeacherStats
from schemas.specs import TeacherSpec
from stratosd import hookimpl
from stratosd.api import Generation, TaskPack, TeacherBackend, TeacherRequest
from stratosd.errors import ConfigError


class ReferenceTeacher(TeacherBackend):
    """Writes the task's reference derivation for a known answer; free and deterministic."""

    name: ClassVar[str] = "reference"
    description: ClassVar[str] = "the task pack's reference reasoner (needs the answer)"

    def __init__(self, spec: TeacherSpec, task: TaskPack | None = None) -> None:
        super().__init__(spec, task)
        if task is None:
            raise ConfigError(
                "the reference teacher needs a task pack",
                hint="construct it with the task (the synthesis and probe steps do)",
                field="teacher.backend",
            )
        self.stats = TeacherStats()

    async def generate(
        self,
        requests: Sequence[TeacherRequest],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """The reference derivation for each request that carries an answer."""
        out = [self._one(r) for r in requests]
        for g in out:
            self.stats.add(g)
        return out

    def _one(self, req: TeacherRequest) -> Generation:
        assert self.task is not None
        if req.answer is None:
            return Generation(
                text="",
                error="the reference teacher can only justify known answers; "
                "use it for injection, not for forward (alignment) prompts",
            )
        try:
            reasoning = self.task.reference_reasoning(req.question, req.answer)
        except Exception as exc:  # noqa: BLE001 - a task bug becomes a failed row, not a crash
            return Generation(text="", error=f"reference reasoner failed: {exc!r}")
        if reasoning is None:
            return Generation(
                text="", error=f"task {self.task.name!r} has no reference reasoner for this "
                "question",
            )
        text = self.task.format_target(reasoning, req.answer)
        return Generation(text=text, completion_tokens=len(text.split()))


@hookimpl
def stratos_teacher_backends() -> list[type[TeacherBackend]]:
    """Register the `reference` teacher backend."""
    return [ReferenceTeacher]
