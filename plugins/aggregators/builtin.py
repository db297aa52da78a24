"""Built-in aggregation rules for tenants jobs (numpy; the math is in stratosd.tenants)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from stratosd import hookimpl
from stratosd.api import Aggregator
from stratosd.tenants import aggregation


class AcmeTopRank(Aggregator):
    """ACME's form: per-rank importance mixed by similarity; each tenant keeps its top ranks."""

    name: ClassVar[str] = "acme-top-rank"
    description: ClassVar[str] = "ACME: similarity-weighted per-rank importance, keep top ranks"
    sends: ClassVar[Literal["importance", "lora"]] = "importance"
    returns: ClassVar[Literal["importance", "delta"]] = "importance"

    def aggregate(self, updates: Mapping[str, Mapping[str, Any]],
                  weights: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
        """tenant → module → mixed importance per rank."""
        return dict(aggregation.importance_mix(updates, weights))


class LoraProductAverage(Aggregator):
    """Personalised federated averaging of the LoRA product ΔW = B·A, similarity-weighted."""

    name: ClassVar[str] = "lora-product-average"
    description: ClassVar[str] = "similarity-weighted average of each tenant's ΔW = B·A"
    sends: ClassVar[Literal["importance", "lora"]] = "lora"
    returns: ClassVar[Literal["importance", "delta"]] = "delta"

    def aggregate(self, updates: Mapping[str, Mapping[str, Any]],
                  weights: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
        """tenant → module → Σ_j w_ij ΔW_j."""
        return dict(aggregation.product_average(updates, weights))


@hookimpl
def stratos_aggregators() -> list[type[Aggregator]]:
    """Register ACME's top-rank rule and LoRA product averaging."""
    return [AcmeTopRank, LoraProductAverage]
