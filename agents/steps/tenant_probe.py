"""Step `tenant_probe`: measure student candidates on the tenant's probe data, on its agent.

Args: TenantArgs + `candidates`, `measure` (empty: all), `probe_size`, `fit_steps`, `lora_r`,
`learning_rate`, `params`, `seed`, `trainer`. Every candidate's size is counted; a measured
one gets a short LoRA fit on the train split minus the probe rows (fit_steps = 0: none), then
accuracy and latency per answer on the probe rows. Returns `{"points": [CandidatePoint]}`
(unmeasured candidates have accuracy and latency 0 here; the daemon predicts them).
"""

from __future__ import annotations

from typing import Any

import msgspec

from agents.stepctx import StepContext
from agents.steps.tenant_common import (
    TenantArgs,
    evaluate_model,
    fit,
    local_task,
    param_count,
    parse_args,
    probe_split,
    track_dir,
)
from schemas.tenants import CandidatePoint
from stratosd.tenants.selection import memory_mib


class ProbeArgs(TenantArgs, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """tenant_probe's arguments."""

    candidates: list[str]
    measure: list[str] = []
    probe_size: int = 16
    fit_steps: int = 20
    lora_r: int = 8
    learning_rate: float = 1e-2
    params: dict[str, Any] = {}
    seed: int = 0
    trainer: str = "lora-sft"
    max_new_tokens: int = 12


def run(ctx: StepContext) -> dict[str, Any]:
    """Count, fit and evaluate each candidate; return the measured points."""
    args: ProbeArgs = parse_args(ctx, ProbeArgs)
    task = local_task(ctx, args)
    fit_part, probe = probe_split(task, args.probe_size)
    points: list[CandidatePoint] = []
    for i, model in enumerate(args.candidates):
        n = param_count(model)
        if args.measure and model not in args.measure:
            points.append(CandidatePoint(model=model, params=n, accuracy=0.0, latency_ms=0.0,
                                         memory_mib=memory_mib(n), predicted=True))
            continue
        evaluated = model
        if args.fit_steps > 0:
            out = track_dir(ctx, args.tenant, f"probe-{i}") / "adapter"
            fit(ctx, task, fit_part, model=model, out=out, steps=args.fit_steps,
                lora_r=args.lora_r, learning_rate=args.learning_rate, params=args.params,
                seed=args.seed, trainer=args.trainer)
            evaluated = str(out)
        got = evaluate_model(ctx, task, probe, evaluated, seed=args.seed,
                             max_new_tokens=args.max_new_tokens)
        points.append(CandidatePoint(model=model, params=n, accuracy=got["accuracy"],
                                     latency_ms=got["latency_ms"], memory_mib=memory_mib(n)))
        ctx.progress(i + 1, len(args.candidates), unit="candidates")
    return {"points": [msgspec.to_builtins(p) for p in points]}
