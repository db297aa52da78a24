"""`injection` mode (Knowledge Injection): the teacher gets the question *and* the answer
and writes the reasoning that leads there; rejection sampling keeps only checked rows.

Each of `ctx.tries` samples is checked by the task's verifier (the reasoning itself) when
the task has one, else by the answer check, and refused when it cites the given answer.
When every try fails and `ctx.reference` is set, the task's reference reasoner writes the
row (provenance: teacher="reference", verified=True).
"""

from __future__ import annotations

from typing import ClassVar

from plugins.modes.common import inject
from stratosd import hookimpl
from stratosd.api import DataRow, DistillationMode, Example, SynthesisContext


class InjectionMode(DistillationMode):
    """Answer-conditioned (reverse) reasoning, rejection-sampled, reference fallback."""

    name: ClassVar[str] = "injection"
    description: ClassVar[str] = "answer-conditioned reasoning, verified, reference fallback"

    async def synthesize(self, example: Example, ctx: SynthesisContext) -> DataRow | None:
        """The first verified injected reasoning in ctx.tries samples, else the reference."""
        return await inject(ctx, example, tries=max(1, ctx.tries))


@hookimpl
def stratos_distillation_modes() -> list[type[DistillationMode]]:
    """Register the `injection` mode."""
    return [InjectionMode]
