"""Resuming a stopped run: the command that raises its budget, and a spec edited by dotted paths
(`stratosctl resume RUN --set constraints.budget_usd=12`)."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from schemas.specs import RunSpec
from stratosd.errors import ConfigError


def suggested_budget(spent_usd: float, next_usd: float) -> float:
    """A budget above spent + next: 10 % headroom, whole dollars (cents below $1)."""
    need = (spent_usd + next_usd) * 1.1
    if need >= 1.0:
        return float(math.floor(need) + 1)
    return math.floor(need * 100 + 1) / 100


def resume_hint(run_id: str, spent_usd: float, next_usd: float) -> str:
    """The command that raises the budget and goes on."""
    budget = suggested_budget(spent_usd, next_usd)
    return (f"raise the budget above ${spent_usd + next_usd:.2f} and go on: "
            f"stratosctl resume {run_id} --set constraints.budget_usd={budget:g}")


def apply_overrides(spec: RunSpec, overrides: dict[str, Any]) -> RunSpec:
    """spec with each dotted path set to its value (`constraints.budget_usd`, `train.max_steps`,
    `teachers.0.model`); ConfigError names the first path that is not a field or gets a bad
    value."""
    from stratosd.validate import spec_from_data

    data = msgspec.to_builtins(spec)
    for path, value in overrides.items():
        _set_path(data, path, value)
        # one path at a time, so the error names the path that caused it
        try:
            spec = spec_from_data(data, origin=f"set {path}={msgspec.json.encode(value).decode()}")
        except ConfigError as exc:
            raise ConfigError(exc.message, hint="use a field of the job TOML with a value it "
                              "accepts (see `stratosctl status RUN --json` for the spec)",
                              field=path) from None
    return spec


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    hint = "give a dotted field path of the job TOML, e.g. constraints.budget_usd"
    if not all(parts):
        raise ConfigError(f"set {path!r}: not a dotted field path", hint=hint, field=path)
    node: Any = data
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        key: int | str = part
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"set {path}: {where} has {len(node)} entries, "
                                  f"no index {part!r}", hint=hint, field=path)
            key = int(part)
        elif not isinstance(node, dict):
            what = "not set" if node is None else f"the value {node!r}"
            raise ConfigError(f"set {path}: {where} is {what}, not a table",
                              hint=f"set {where} itself", field=path)
        elif i < len(parts) - 1:
            node.setdefault(part, {})  # a new key of a free-form table (train.synthesis.n)
        if i == len(parts) - 1:
            node[key] = value
        else:
            node = node[key]
