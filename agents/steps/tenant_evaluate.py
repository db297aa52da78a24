"""Step `tenant_evaluate`: held-out accuracy of a tenant's model, on its own agent.

Args: TenantArgs + `model` (the student), `track`, `limit`, `seed`, `max_new_tokens`. The
track's merged model (or the student when nothing was applied) answers the local test split;
returns accuracy, n, correct, latency per answer and where the model lives on the agent.
"""

from __future__ import annotations

from typing import Any

from agents.stepctx import StepContext
from agents.steps.tenant_common import (
    TenantArgs,
    current_model,
    evaluate_model,
    local_task,
    parse_args,
    track_dir,
)


class EvalArgs(TenantArgs, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """tenant_evaluate's arguments."""

    model: str
    track: str = "agg"
    limit: int = 64
    seed: int = 0
    max_new_tokens: int = 12


def run(ctx: StepContext) -> dict[str, Any]:
    """Evaluate the track's model on the tenant's test split."""
    args: EvalArgs = parse_args(ctx, EvalArgs)
    task = local_task(ctx, args)
    model = current_model(track_dir(ctx, args.tenant, args.track), args.model)
    got = evaluate_model(ctx, task, task.examples("test")[: args.limit], model, seed=args.seed,
                         max_new_tokens=args.max_new_tokens)
    return {**got, "model": model, "track": args.track}
