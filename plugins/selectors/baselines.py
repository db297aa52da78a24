"""Baseline selectors the paper compares PFG with, plus a weighted sum.

All of them apply the same hard constraints (`objectives.filter_offers`) and report the same
Pareto set, so a plan can show where each baseline's pick sits relative to the front.

- `hardware-first` (the paper's accuracy-first): the largest hardware score H.
- `cost-first`: the lowest job cost C ($/h times the hours this server needs).
- `latency-first`: the lowest latency L.
- `random`: uniform over the candidates (sorted by id first, so input order does not matter),
  seeded by `seed`.
- `weighted-sum`: the smallest weighted sum of normalised badness (0 = best, 1 = worst per
  objective); weights `hardware`, `cost`, `latency`, 1.0 each by default.

Ties are broken by the other objectives (named per selector below), then by id.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from schemas.specs import Constraints, Selection, ServerOffer
from stratosd import hookimpl
from stratosd.api import ServerSelector
from stratosd.errors import ConfigError

if TYPE_CHECKING:
    from plugins.selectors.objectives import Candidates, FloatArray
    from stratosd.costmodel import JobCosting

# numpy and the objectives load on first use (see pfg.py).


def _argbest(cands: Candidates, keys: Sequence[FloatArray]) -> int:
    """Index of the smallest key tuple; remaining exact ties go to the smaller id."""
    import numpy as np

    left = np.arange(len(cands))
    for key in keys:
        sub = key[left]
        left = left[sub == sub.min()]
        if len(left) == 1:
            return int(left[0])
    return int(min(left, key=lambda i: cands.offer(int(i)).id))


class _Baseline(ServerSelector):
    """Shared flow: filter, pick by a rule, report the Pareto set and explain."""

    params_allowed: ClassVar[frozenset[str]] = frozenset()
    rule: ClassVar[str] = ""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = dict(params or {})
        unknown = set(self.params) - self.params_allowed
        if unknown:
            allowed = ", ".join(sorted(self.params_allowed)) or "none"
            raise ConfigError(
                f"unknown {self.name} parameter(s): {', '.join(sorted(unknown))}",
                hint=f"{self.name} takes: {allowed}", field="selector",
            )

    @abc.abstractmethod
    def _pick(self, cands: Candidates, seed: int) -> int:
        """Index of the chosen candidate."""

    def select(
        self,
        offers: Sequence[ServerOffer],
        constraints: Constraints,
        *,
        costing: JobCosting | None = None,
        est_train_hours: float | None = None,
        seed: int = 0,
    ) -> Selection:
        """Filter, apply the rule, explain."""
        import numpy as np

        from plugins.selectors.objectives import (
            describe_cost_model,
            describe_offer,
            describe_removed,
            filter_offers,
            offer_summary,
            pareto_mask,
        )

        cands = filter_offers(offers, constraints,
                             costing if costing is not None else est_train_hours)
        chosen = self._pick(cands, seed)
        pareto = pareto_mask(cands.minimised())
        on_front = "is" if pareto[chosen] else "is not"
        explanation = "\n".join([
            f"{self.name} over {cands.total} servers. Hard constraints first: "
            f"{describe_removed(cands.removed)}; {len(cands)} candidates remain.",
            f"Rule: {self.rule}. {cands.offer(chosen).id} wins and {on_front} one of the "
            f"{int(pareto.sum())} Pareto-optimal candidates.",
            f"It offers {describe_offer(cands, chosen)}.",
            describe_cost_model(cands),
        ])
        return Selection(
            selector=self.name,
            chosen=cands.offer(chosen),
            pareto_ids=[cands.offer(int(i)).id for i in np.flatnonzero(pareto)],
            explanation=explanation,
            removed=cands.removed,
            candidates=cands.total,
            details={"est_train_hours": est_train_hours,
                     "cost_model": cands.costing.describe(),
                     "chosen": offer_summary(cands, chosen), "params": self.params,
                     "seed": seed},
        )


class HardwareFirst(_Baseline):
    """The paper's accuracy-first: the most capable hardware."""

    name: ClassVar[str] = "hardware-first"
    description: ClassVar[str] = "most capable hardware (the paper's accuracy-first baseline)"
    rule: ClassVar[str] = "largest hardware score H; ties by job cost, latency, id"

    def _pick(self, cands: Candidates, seed: int) -> int:
        return _argbest(cands, [-cands.hardware, cands.job_usd, cands.latency_ms])


class CostFirst(_Baseline):
    """The cheapest job."""

    name: ClassVar[str] = "cost-first"
    description: ClassVar[str] = "lowest cost for this job"
    rule: ClassVar[str] = "lowest job cost; ties by $/h, hardware score, latency, id"

    def _pick(self, cands: Candidates, seed: int) -> int:
        return _argbest(cands, [cands.job_usd, cands.price, -cands.hardware, cands.latency_ms])


class LatencyFirst(_Baseline):
    """The lowest latency."""

    name: ClassVar[str] = "latency-first"
    description: ClassVar[str] = "lowest latency"
    rule: ClassVar[str] = "lowest latency; ties by job cost, hardware score, id"

    def _pick(self, cands: Candidates, seed: int) -> int:
        return _argbest(cands, [cands.latency_ms, cands.job_usd, -cands.hardware])


class RandomPick(_Baseline):
    """A uniform random candidate, reproducible from the seed."""

    name: ClassVar[str] = "random"
    description: ClassVar[str] = "uniform random candidate (seeded)"
    rule: ClassVar[str] = "uniform random choice among candidates sorted by id, seeded by `seed`"

    def _pick(self, cands: Candidates, seed: int) -> int:
        import numpy as np

        order = sorted(range(len(cands)), key=lambda i: cands.offer(i).id)
        return order[int(np.random.default_rng(seed).integers(len(order)))]


class WeightedSum(_Baseline):
    """Smallest weighted sum of normalised objectives."""

    name: ClassVar[str] = "weighted-sum"
    description: ClassVar[str] = "smallest weighted sum of normalised hardware, cost, latency"
    params_allowed: ClassVar[frozenset[str]] = frozenset({"hardware", "cost", "latency"})

    def __init__(self, params: Mapping[str, Any] | None = None, **weights: float) -> None:
        super().__init__({**dict(params or {}), **weights})
        w = [self.params.get(a, 1.0) for a in ("hardware", "cost", "latency")]
        if any(not isinstance(x, int | float) or isinstance(x, bool) or x < 0 for x in w) \
                or sum(w) <= 0:
            raise ConfigError(
                f"weighted-sum weights must be numbers >= 0, not all zero, got {w}",
                hint="e.g. hardware = 1.0, cost = 2.0, latency = 0.5", field="selector",
            )
        self.weights: tuple[float, float, float] = (float(w[0]), float(w[1]), float(w[2]))

    @property
    def rule(self) -> str:  # type: ignore[override]
        """The rule with its weights."""
        h, c, lat = self.weights
        return (f"smallest {h:g}*hardware + {c:g}*cost + {lat:g}*latency over objectives "
                "scaled to 0 (best) .. 1 (worst); ties by $/h, id")

    def _pick(self, cands: Candidates, seed: int) -> int:
        import numpy as np

        score = cands.normalised() @ np.array(self.weights)
        return _argbest(cands, [np.round(score, 12), cands.price])


BASELINES: tuple[type[_Baseline], ...] = (
    HardwareFirst, CostFirst, LatencyFirst, RandomPick, WeightedSum,
)


@hookimpl
def stratos_server_selectors() -> list[type[ServerSelector]]:
    """Register the baseline selectors."""
    return list(BASELINES)
