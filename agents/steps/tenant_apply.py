"""Step `tenant_apply`: apply the tenant's aggregated mix to its own model, on its agent.

Args: `tenant`, `model` (the student), `track`, `round`, `kind` and, for ACME's rule,
`importance` (module → mixed score per rank) and `keep`. Input `mix` (kind "delta"): an npz
of module → ΔW. kind "delta": W += ΔW. kind "importance": the tenant's own adapter of that
round keeps its `keep` top ranks by the mixed scores, and that ΔW is merged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from agents.stepctx import StepContext
from agents.steps.tenant_common import current_model, merge_into, parse_args, read_lora, track_dir
from stratosd.errors import ConfigError
from stratosd.tenants import aggregation


class ApplyArgs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """tenant_apply's arguments."""

    tenant: str
    model: str
    track: str = "agg"
    round: int = 1
    kind: Literal["delta", "importance", "export", "import"] = "delta"
    importance: dict[str, list[float]] = {}
    keep: int = 4


def run(ctx: StepContext) -> dict[str, Any]:
    """Merge the mix into the track's model (or export / import its weights)."""
    args: ApplyArgs = parse_args(ctx, ApplyArgs)
    track = track_dir(ctx, args.tenant, args.track)
    if args.kind in ("export", "import"):
        return _serve_weights(ctx, args, track)
    start = current_model(track, args.model)
    if args.kind == "delta":
        mix_path = ctx.inputs.get("mix")
        if mix_path is None:
            raise ConfigError("tenant_apply kind=delta needs the `mix` input artifact",
                              hint="the daemon uploads each tenant's mix", field="inputs.mix")
        with np.load(mix_path) as data:
            deltas = {k: data[k].astype(np.float32) for k in data.files}
    else:
        own = read_lora(track / f"adapter-r{args.round}")
        pruned = aggregation.keep_ranks(own, args.importance, args.keep)
        deltas = {m: aggregation.delta(pruned, m).astype(np.float32)
                  for m in aggregation.modules(pruned)}
    merge_into(start, deltas, track / "model")
    return {"applied": args.kind, "modules": len(deltas), "round": args.round}


def _serve_weights(ctx: StepContext, args: ApplyArgs, track: Path) -> dict[str, Any]:
    from agents.steps.tenant_weights import export_delta, stage_adapter

    if args.kind == "export":
        out, modules = export_delta(track, args.model,
                                    ctx.output(f"weights-{args.tenant}.npz"))
        return {"kind": "export", "modules": modules, "weights_bytes": out.stat().st_size}
    given = ctx.inputs.get("weights")
    if given is None:  # the tenant lives on this agent: its own track, nothing moved
        given, _n = export_delta(track, args.model, ctx.workdir / "weights.npz")
    with np.load(given) as data:
        factors = {k: data[k] for k in data.files}
    serve = track.parent / "serve"
    ref = stage_adapter(factors, args.model, serve / "adapter")
    return {"kind": "import", "ref": ref, "local": "weights" not in ctx.inputs}
