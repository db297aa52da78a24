"""`hybrid` mode (beyond the paper): per question, keep the teacher's correct forward
reasoning and inject only where it failed.

The paper switches once per task on probe accuracy; a teacher at 60% still knows most
questions, so forcing one mode either wastes good forward reasoning or keeps no row for
the other 40%. Here the try budget is split: half forward (at least one), the rest
answer-conditioned, then the reference fallback. Each row's `mode` names what produced it.
"""

from __future__ import annotations

from typing import ClassVar

from plugins.modes.common import inject, make_row, sample_until_accepted
from stratosd import hookimpl
from stratosd.api import DataRow, DistillationMode, Example, SynthesisContext


class HybridMode(DistillationMode):
    """Alignment where the teacher knows the answer, injection where it does not."""

    name: ClassVar[str] = "hybrid"
    description: ClassVar[str] = "forward reasoning when right, injection where it failed"

    async def synthesize(self, example: Example, ctx: SynthesisContext) -> DataRow | None:
        """A forward row when the teacher gets it right, else an injected one."""
        tries = max(2, ctx.tries)
        forward = max(1, tries // 2)
        accepted, used = await sample_until_accepted(
            ctx, example, teacher=ctx.teacher, injected=False, tries=forward
        )
        if accepted is not None:
            return make_row(ctx.task, example, accepted, teacher=ctx.teacher_name,
                            mode="alignment", tries=used)
        return await inject(ctx, example, tries=tries - forward, tries_before=used)


@hookimpl
def stratos_distillation_modes() -> list[type[DistillationMode]]:
    """Register the `hybrid` mode."""
    return [HybridMode]
