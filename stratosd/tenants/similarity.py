"""Tenant-to-tenant similarity and aggregation weights (ACME's form, with a temperature).

d = signature distance → s = 1/(1+d) (symmetric, s_ii = 1) → w_i· = softmax_j(s_ij / T).
ACME uses T = 1, at which the weights come out almost uniform (s only spans [1/3, 1]); a small
T (default 0.1) lets similar tenants dominate. T → ∞ is the plain average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from schemas.tenants import TenantSignature
from stratosd.errors import ConfigError
from stratosd.tenants.signature import distance

Matrix = dict[str, dict[str, float]]


def similarity_matrix(signatures: Sequence[TenantSignature]) -> Matrix:
    """s_ij = 1 / (1 + d_ij), symmetrised."""
    out: Matrix = {s.tenant: {} for s in signatures}
    for i, a in enumerate(signatures):
        out[a.tenant][a.tenant] = 1.0
        for b in signatures[i + 1:]:
            s = 1.0 / (1.0 + distance(a, b))
            out[a.tenant][b.tenant] = out[b.tenant][a.tenant] = round(s, 6)
    return out


def softmax_weights(similarity: Mapping[str, Mapping[str, float]], members: Sequence[str],
                    temperature: float) -> Matrix:
    """Row softmax of s/T restricted to members (each row sums to 1)."""
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}",
                          hint="set aggregation.temperature (e.g. 0.1)",
                          field="aggregation.temperature")
    out: Matrix = {}
    for i in members:
        row = {j: similarity[i][j] / temperature for j in members}
        top = max(row.values())
        exp = {j: math.exp(v - top) for j, v in row.items()}
        total = sum(exp.values())
        out[i] = {j: v / total for j, v in exp.items()}
    return out


def uniform_weights(members: Sequence[str]) -> Matrix:
    """The plain average: every member weighs 1/n for everyone."""
    n = len(members)
    return {i: {j: 1.0 / n for j in members} for i in members}


def group_by_student(students: Mapping[str, tuple[str, int]]) -> dict[str, list[str]]:
    """Tenants grouped by (student, LoRA rank): adapters mix only within a group."""
    groups: dict[str, list[str]] = {}
    for tenant, (student, rank) in sorted(students.items()):
        groups.setdefault(f"{student}#r{rank}", []).append(tenant)
    return groups


def check_same_group(keys: Mapping[str, tuple[str, int]]) -> None:
    """Refuse to mix updates of different students or ranks (ConfigError naming both)."""
    seen = set(keys.values())
    if len(seen) > 1:
        desc = ", ".join(f"{t}: {s} r={r}" for t, (s, r) in sorted(keys.items()))
        raise ConfigError(f"cannot aggregate adapters of different students or ranks ({desc})",
                          hint="group tenants by student first (similarity.group_by_student)",
                          field="aggregation")
