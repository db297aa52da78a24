"""OfferTable: the columnar offers selection reads gives the same answers as the structs."""

from __future__ import annotations

import numpy as np
import pytest

from plugins.selectors.baselines import CostFirst, HardwareFirst
from plugins.selectors.pfg import ParetoFrontGrid
from schemas.specs import Constraints, ServerOffer
from schemas.telemetry import Capacity
from stratosd.costmodel.model import JobCosting
from stratosd.errors import Infeasible
from stratosd.offers import OfferTable

REGIONS = ["us-east", "eu-west", "eu-central", "ap-south", ""]
GPUS = [("H100", 81559), ("A100", 81920), ("L4", 23034), ("cpu", 0)]


def fleet(n: int, seed: int = 0) -> list[ServerOffer]:
    rng = np.random.default_rng(seed)
    cap = Capacity(source="measured", device="cpu", threads=2, matmul_tflops={"fp32": 0.2})
    out = []
    for i in range(n):
        model, mem = GPUS[int(rng.integers(len(GPUS)))]
        gpus = 0 if model == "cpu" else int(rng.choice([1, 2, 8]))
        out.append(ServerOffer(
            id=f"o{i}", agent_id=f"o{i}" if i % 3 else None, gpu_model=model, gpu_count=gpus,
            gpu_mem_mib=mem, cpu_count=int(rng.choice([2, 16])),
            price_usd_per_hour=float(np.round(rng.uniform(0.1, 20), 2)),
            latency_ms=float(np.round(rng.uniform(5, 300), 1)),
            region=REGIONS[int(rng.integers(len(REGIONS)))],
            status="down" if i % 17 == 0 else "up", busy=i % 23 == 0,
            latency_known=i % 11 != 0, capacity=cap if i % 5 == 0 else None))
    return out


def test_columns_and_kinds_match_the_offers() -> None:
    offers = fleet(300)
    t = OfferTable.from_offers(offers)
    assert len(t) == 300 and list(t) == offers and t[7] == offers[7]
    assert t.ids.tolist() == [o.id for o in offers]
    assert t.price.tolist() == [o.price_usd_per_hour for o in offers]
    assert t.up.tolist() == [o.status == "up" for o in offers]
    assert t.busy.tolist() == [o.busy for o in offers]
    assert t.latency_known.tolist() == [o.latency_known for o in offers]
    assert [t.regions[r] for r in t.region] == [o.region for o in offers]
    # a handful of hardware kinds stand for the whole fleet; each row's kind is its hardware
    assert len(t.kinds) < 60
    for i, o in enumerate(offers):
        k = t.kinds[t.kind[i]]
        assert (k.gpu_model, k.gpu_count, k.cpu_count) == (o.gpu_model, o.gpu_count,
                                                            o.cpu_count)
    assert OfferTable.from_offers(t) is t


def test_region_mask_matches_prefixes() -> None:
    t = OfferTable.from_offers(fleet(50))
    assert t.region_mask("eu").tolist() == [r.startswith("eu-") for r in
                                            (o.region for o in t)]
    assert t.region_mask("EU-WEST").tolist() == [o.region == "eu-west" for o in t]


def test_concat_is_the_table_of_both() -> None:
    a, b = fleet(40, seed=1), fleet(60, seed=2)
    both = OfferTable.concat(OfferTable.from_offers(a), OfferTable.from_offers(b))
    direct = OfferTable.from_offers(a + b)
    assert list(both) == a + b
    for name in ("ids", "price", "latency_ms", "up", "busy", "latency_known", "gpu_count"):
        assert getattr(both, name).tolist() == getattr(direct, name).tolist()
    assert [both.regions[r] for r in both.region] == [o.region for o in a + b]
    costing = JobCosting.reference_hours(2.0)
    assert np.allclose(costing.columns(both).total_usd, costing.columns(a + b).total_usd)


@pytest.mark.parametrize("selector", [ParetoFrontGrid, HardwareFirst, CostFirst])
@pytest.mark.parametrize("constraints", [
    Constraints(), Constraints(max_latency_ms=150), Constraints(region="eu", budget_usd=30),
    Constraints(min_gpu_mem_mib=40000, max_price_usd_per_hour=10)])
def test_selection_on_a_table_equals_selection_on_the_list(
        selector: type, constraints: Constraints) -> None:
    offers = fleet(400, seed=3)
    costing = JobCosting.reference_hours(1.5)
    on_list = selector().select(offers, constraints, costing=costing)
    on_table = selector().select(OfferTable.from_offers(offers), constraints, costing=costing)
    assert on_table == on_list


def test_infeasible_on_a_table_names_the_binding_constraint() -> None:
    t = OfferTable.from_offers(fleet(100))
    with pytest.raises(Infeasible) as exc:
        ParetoFrontGrid().select(t, Constraints(max_price_usd_per_hour=0.01))
    assert exc.value.field == "constraints.max_price_usd_per_hour"
