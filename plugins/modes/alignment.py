"""`alignment` mode (Knowledge Alignment): keep the teacher's own forward chain-of-thought.

The teacher sees only the question (`task.prompt`); a text is kept when its final answer is
right and the task's verifier, if any, does not reject the reasoning; up to `ctx.tries`
samples (the first greedy, the rest at `ctx.temperature`).
"""

from __future__ import annotations

from typing import ClassVar

from plugins.modes.common import make_row, sample_until_accepted
from stratosd import hookimpl
from stratosd.api import DataRow, DistillationMode, Example, SynthesisContext


class AlignmentMode(DistillationMode):
    """Forward reasoning from a teacher that already knows the task."""

    name: ClassVar[str] = "alignment"
    description: ClassVar[str] = "teacher's forward chain-of-thought, kept when correct"

    async def synthesize(self, example: Example, ctx: SynthesisContext) -> DataRow | None:
        """The first correct forward reasoning in ctx.tries samples, or None."""
        accepted, used = await sample_until_accepted(
            ctx, example, teacher=ctx.teacher, injected=False, tries=max(1, ctx.tries)
        )
        if accepted is None:
            return None
        return make_row(ctx.task, example, accepted, teacher=ctx.teacher_name,
                        mode=self.name, tries=used)


@hookimpl
def stratos_distillation_modes() -> list[type[DistillationMode]]:
    """Register the `alignment` mode."""
    return [AlignmentMode]
