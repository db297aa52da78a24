"""Step `tenant_probe`: measure student candidates on the tenant's probe data, on its agent.

Args: TenantArgs + `candidates`, `measure` (empty: all), `probe_size`, `fit_steps`, `lora_r`,
`learning_rate`, `params`, `seed`, `trainer`. Every candidate's size is counted; a measured
one gets a short LoRA fit on the train split minus the probe rows (fit_steps = 0: none), then
on the probe rows: exact accuracy, the task's partial credit and latency per answer
(generation), and graded quality teacher-forced on the gold targets (token accuracy, mean NLL
per target token and its standard error), which separates candidates that all answer wrong.
Returns `{"points": [CandidatePoint]}` (unmeasured candidates carry only their size here; the
daemon predicts the rest and labels them predicted).
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
    target_scores,
    track_dir,
)
from schemas.tenants import CandidatePoint
from stratosd.tenants.selection import memory_mib


class ProbeArgs(TenantArgs, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """tenant_probe's arguments."""

    candidates: list[str]
    measure: list[str] = []
    probe_size: int = 16
    fit_steps: int = 40  # at lr 1e-2 the tiny students' fit loss plateaus by ~40 steps
    lora_r: int = 8
    learning_rate: float = 1e-2
    params: dict[str, Any] = {}
    seed: int = 0
    trainer: str = "lora-sft"
    max_new_tokens: int = 12


def _loss(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else round(float(value), 6)


def run(ctx: StepContext) -> dict[str, Any]:
    """Count, fit and evaluate each candidate; return the measured points."""
    from plugins.models.hf import load_model

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
        metrics: dict[str, Any] = {}
        if args.fit_steps > 0:
            out = track_dir(ctx, args.tenant, f"probe-{i}") / "adapter"
            metrics = fit(ctx, task, fit_part, model=model, out=out, steps=args.fit_steps,
                          lora_r=args.lora_r, learning_rate=args.learning_rate,
                          params=args.params, seed=args.seed, trainer=args.trainer)
            evaluated = str(out)
        loaded = load_model(evaluated, seed=args.seed)  # one load for both measurements
        got = evaluate_model(ctx, task, probe, evaluated, seed=args.seed,
                             max_new_tokens=args.max_new_tokens, loaded=loaded)
        graded = target_scores(task, probe, evaluated, seed=args.seed, loaded=loaded)
        points.append(CandidatePoint(
            model=model, params=n, accuracy=got["accuracy"], latency_ms=got["latency_ms"],
            memory_mib=memory_mib(n), partial=got["partial"], n_probe=got["n"],
            token_accuracy=graded["token_accuracy"], target_nll=graded["target_nll"],
            target_nll_se=graded["target_nll_se"],
            fit_first_loss=_loss(metrics, "first_loss"),
            fit_final_loss=_loss(metrics, "final_loss")))
        ctx.progress(i + 1, len(args.candidates), unit="candidates")
    return {"points": [msgspec.to_builtins(p) for p in points]}
