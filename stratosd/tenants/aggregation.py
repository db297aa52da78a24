"""The math of the built-in aggregation rules, on numpy arrays (small tensors in tests).

A LoRA update of one tenant is `{<module>.lora_A: (r, in), <module>.lora_B: (out, r),
<module>.scaling: ()}`; its weight delta is ΔW = scaling · B·A.

- **ACME's form** (`acme-top-rank`): each tenant sends, per module, the importance of each
  rank k, I_k = scaling · ‖B[:, k]‖ · ‖A[k, :]‖ (the norm of that rank-1 component), normalised
  to sum 1. Tenant i gets Σ_j w_ij Î_j and keeps its own `keep` ranks that score highest there.
  Only scores travel, never weights. Ranks are comparable across tenants because every tenant's
  LoRA of a round starts from the same seeded initialisation.
- **Similarity-weighted averaging of the LoRA product** (`lora-product-average`, personalised
  federated averaging): tenant i gets Σ_j w_ij · ΔW_j. The product is averaged, not the factors:
  avg(B)·avg(A) ≠ avg(B·A).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from stratosd.errors import ConfigError

Update = Mapping[str, Any]
Weights = Mapping[str, Mapping[str, float]]

A_SUFFIX, B_SUFFIX, SCALE_SUFFIX = ".lora_A", ".lora_B", ".scaling"


def modules(update: Update) -> list[str]:
    """The module names of a LoRA update, sorted."""
    return sorted(k[: -len(A_SUFFIX)] for k in update if k.endswith(A_SUFFIX))


def delta(update: Update, module: str) -> np.ndarray:
    """ΔW = scaling · B·A of one module."""
    a = np.asarray(update[module + A_SUFFIX], dtype=np.float64)
    b = np.asarray(update[module + B_SUFFIX], dtype=np.float64)
    scale = float(np.asarray(update.get(module + SCALE_SUFFIX, 1.0)))
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ConfigError(f"module {module}: LoRA factors of shapes {b.shape}·{a.shape} do not "
                          "multiply", hint="send <module>.lora_B (out×r) and .lora_A (r×in)",
                          field="update")
    return scale * (b @ a)


def rank_importance(update: Update) -> dict[str, np.ndarray]:
    """Per module, the norm of each rank-1 component, normalised to sum 1 (ACME's scores)."""
    out: dict[str, np.ndarray] = {}
    for module in modules(update):
        a = np.asarray(update[module + A_SUFFIX], dtype=np.float64)
        b = np.asarray(update[module + B_SUFFIX], dtype=np.float64)
        scale = abs(float(np.asarray(update.get(module + SCALE_SUFFIX, 1.0))))
        score = scale * np.linalg.norm(b, axis=0) * np.linalg.norm(a, axis=1)
        total = float(score.sum())
        out[module] = score / total if total > 0 else np.full_like(score, 1.0 / len(score))
    return out


def _check_rows(weights: Weights, tenants: list[str]) -> None:
    for i in tenants:
        row = weights.get(i)
        if row is None or set(row) - set(tenants):
            raise ConfigError(f"weights for {i!r} name tenants without an update",
                              hint="weights must cover exactly the tenants that sent updates",
                              field="weights")
        total = sum(row.values())
        if not np.isclose(total, 1.0, atol=1e-6):
            raise ConfigError(f"weights of {i!r} sum to {total:.6f}, not 1",
                              hint="normalise each row", field="weights")


def _same_modules(updates: Mapping[str, Mapping[str, Any]],
                  names: Mapping[str, list[str]]) -> list[str]:
    first = next(iter(names.values()))
    for tenant, mods in names.items():
        if mods != first:
            raise ConfigError(f"tenant {tenant!r} sent modules that differ from the others'",
                              hint="only tenants on the same student and rank are mixed",
                              field="update")
    return first


def product_average(updates: Mapping[str, Update], weights: Weights
                    ) -> dict[str, dict[str, np.ndarray]]:
    """tenant i → {module: Σ_j w_ij · scaling_j · B_j·A_j}."""
    tenants = sorted(updates)
    _check_rows(weights, tenants)
    mods = _same_modules(updates, {t: modules(u) for t, u in updates.items()})
    deltas = {t: {m: delta(updates[t], m) for m in mods} for t in tenants}
    for m in mods:
        shapes = {deltas[t][m].shape for t in tenants}
        if len(shapes) > 1:
            raise ConfigError(f"module {m}: tenants' weight deltas have shapes {sorted(shapes)}",
                              hint="only tenants on the same student are mixed",
                              field="update")
    return {i: {m: sum((w * deltas[j][m] for j, w in weights[i].items()),
                       np.zeros_like(deltas[i][m])) for m in mods} for i in tenants}


def importance_mix(importances: Mapping[str, Mapping[str, Any]], weights: Weights
                   ) -> dict[str, dict[str, np.ndarray]]:
    """tenant i → {module: Σ_j w_ij · Î_j} (ACME: similarity-weighted importance scores)."""
    tenants = sorted(importances)
    _check_rows(weights, tenants)
    mods = _same_modules(importances, {t: sorted(v) for t, v in importances.items()})
    arrays = {t: {m: np.asarray(importances[t][m], dtype=np.float64) for m in mods}
              for t in tenants}
    for m in mods:
        if len({arrays[t][m].shape for t in tenants}) > 1:
            raise ConfigError(f"module {m}: tenants' ranks differ",
                              hint="only tenants with the same LoRA rank are mixed",
                              field="update")
    return {i: {m: sum((w * arrays[j][m] for j, w in weights[i].items()),
                       np.zeros_like(arrays[i][m])) for m in mods} for i in tenants}


def top_ranks(scores: Any, keep: int) -> list[int]:
    """Indices of the `keep` highest scores (ties: lower index first), sorted."""
    arr = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-arr, kind="stable")
    return sorted(int(i) for i in order[: max(0, min(keep, len(arr)))])


def keep_ranks(update: Update, mixed: Mapping[str, Any], keep: int) -> dict[str, np.ndarray]:
    """The tenant's own update with, per module, only its top `keep` ranks by mixed score."""
    out: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in update.items()}
    for module in modules(update):
        kept = top_ranks(mixed[module], keep)
        mask = np.zeros(np.asarray(update[module + A_SUFFIX]).shape[0], dtype=bool)
        mask[kept] = True
        out[module + A_SUFFIX] = np.where(mask[:, None], out[module + A_SUFFIX], 0.0)
        out[module + B_SUFFIX] = np.where(mask[None, :], out[module + B_SUFFIX], 0.0)
    return out
