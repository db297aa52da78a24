"""Step `tenant_signature`: aggregates of the tenant's local data (never the rows themselves).

Args: TenantArgs + `max_rows` (ACME: ~200). Reads the train split of the local JSONL and
returns `{"signature": TenantSignature}`: hashed bigram and answer histograms, mean lengths,
and the file's size in bytes. See stratosd.tenants.signature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from agents.stepctx import StepContext
from agents.steps.tenant_common import TenantArgs, local_task, parse_args
from stratosd.tenants.signature import compute_signature


class SignatureArgs(TenantArgs, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """tenant_signature's arguments."""

    max_rows: int = 200


def run(ctx: StepContext) -> dict[str, Any]:
    """Compute the signature of the tenant's train split."""
    args: SignatureArgs = parse_args(ctx, SignatureArgs)
    task = local_task(ctx, args)
    rows = [(ex.question, ex.answer) for ex in task.examples("train")[: args.max_rows]]
    sig = compute_signature(args.tenant, rows,
                            raw_bytes=Path(args.data_path).expanduser().stat().st_size)
    ctx.log(f"signature of tenant {args.tenant}: {sig.n_examples} rows summarised")
    return {"signature": msgspec.to_builtins(sig)}
