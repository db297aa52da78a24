"""Step `tenant_train`: one round of local LoRA training on the tenant's own data.

Args: TenantArgs + `model` (the student), `track` (agg | alone | ...), `round`, `steps`,
`lora_r`, `learning_rate`, `params`, `seed`, `trainer`, `send` and `apply_own`. Training
starts from the track's merged model (the student before any update) with a fresh LoRA whose
initialisation is seeded by seed + round, the same for every tenant (so ranks line up for
ACME's rule). The adapter stays on the agent. What travels, by `send`:
- `lora`: the factors as `update-<tenant>-<track>-r<round>.npz` in out/ (an artifact);
- `importance`: per module, one score per rank, inline in the result;
- `none`: nothing. `apply_own` merges the tenant's own ΔW at once (the *alone* baseline).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from agents.stepctx import StepContext
from agents.steps.tenant_common import (
    TenantArgs,
    current_model,
    fit,
    local_task,
    merge_into,
    parse_args,
    read_lora,
    track_dir,
)
from stratosd.tenants import aggregation


class TrainArgs(TenantArgs, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """tenant_train's arguments."""

    model: str
    track: str = "agg"
    round: int = 1
    steps: int = 40
    lora_r: int = 8
    learning_rate: float = 1e-2
    params: dict[str, Any] = {}
    seed: int = 0
    trainer: str = "lora-sft"
    send: Literal["lora", "importance", "none"] = "lora"
    apply_own: bool = False


def run(ctx: StepContext) -> dict[str, Any]:
    """Train one round; write or return the update."""
    args: TrainArgs = parse_args(ctx, TrainArgs)
    task = local_task(ctx, args)
    track = track_dir(ctx, args.tenant, args.track)
    start = current_model(track, args.model)
    adapter = track / f"adapter-r{args.round}"
    metrics = fit(ctx, task, task.examples("train"), model=start, out=adapter,
                  steps=args.steps, lora_r=args.lora_r, learning_rate=args.learning_rate,
                  params=args.params, seed=args.seed + args.round, trainer=args.trainer)
    update: dict[str, Any] = dict(read_lora(adapter))
    result: dict[str, Any] = {"metrics": metrics, "rank": args.lora_r, "round": args.round,
                              "modules": len(aggregation.modules(update))}
    if args.send == "lora":
        out = ctx.output(f"update-{args.tenant}-{args.track}-r{args.round}.npz")
        with out.open("wb") as fh:
            np.savez(fh, **update)
        result["update_bytes"] = out.stat().st_size
    elif args.send == "importance":
        result["importance"] = {m: [round(float(x), 6) for x in v]
                                for m, v in aggregation.rank_importance(update).items()}
    if args.apply_own:
        deltas = {m: aggregation.delta(update, m).astype(np.float32)
                  for m in aggregation.modules(update)}
        merge_into(start, deltas, track / "model")
    return result
