"""Selectors on a hand-made fleet: constraints, infeasible messages, baselines, PFG, discovery."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plugins.selectors.baselines import (
    CostFirst,
    HardwareFirst,
    LatencyFirst,
    RandomPick,
    WeightedSum,
)
from plugins.selectors.objectives import (
    filter_offers,
    gpu_spec,
    hardware_score,
)
from plugins.selectors.pfg import ParetoFrontGrid
from schemas.specs import Constraints, Selection, ServerOffer
from stratosd.api import ServerSelector
from stratosd.errors import ConfigError, Infeasible
from stratosd.plugins import Plugins

# est 0.75 h on the reference (1x A100, 312 TFLOP/s bf16): a server with H = 312 bills
# 0.75 + 0.25 set-up = 1.0 h.
EST = 0.75
REFERENCE_SCORE = 312.0


def offer(oid: str, h: float, price: float, lat: float, region: str = "us-east",
          mem: int = 81920, count: int = 1, status: str = "up") -> ServerOffer:
    return ServerOffer(id=oid, gpu_model="test gpu", gpu_count=count, gpu_mem_mib=mem,
                       cpu_count=16, hardware_score=h, price_usd_per_hour=price, latency_ms=lat,
                       region=region, status=status)  # type: ignore[arg-type]


FLEET = [
    offer("big", 4 * REFERENCE_SCORE, 8.0, 40),  # 0.4375 h -> $3.50
    offer("mid", REFERENCE_SCORE, 1.5, 20, mem=49152),  # $1.50
    offer("cheap", REFERENCE_SCORE / 2, 0.4, 60, region="eu-west", mem=24576),  # 1.75 h: $0.70
    offer("near", REFERENCE_SCORE, 2.0, 5, mem=24576),  # $2.00
    offer("down", 2000, 0.1, 1, status="down"),
    offer("slow", REFERENCE_SCORE, 1.0, 300, region="ap-northeast"),  # $1.00
    ServerOffer(id="cpu", cpu_count=32, price_usd_per_hour=1.0, latency_ms=10,
                region="us-east"),  # H = 32 x 0.073: 100.42 h -> $100.42
]


def select(selector: ServerSelector, **constraints: Any) -> Selection:
    return selector.select(FLEET, Constraints(**constraints), est_train_hours=EST)


# --- objectives ---------------------------------------------------------------------------


def test_hardware_score_is_the_training_speed_the_job_gets() -> None:
    assert gpu_spec("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert gpu_spec("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert gpu_spec("NVIDIA A10G")[0] == "A10G"  # not A100, not A10
    assert gpu_spec("Tesla T4")[0] == "T4"
    assert gpu_spec("NVIDIA GeForce RTX 4090")[0] == "RTX 4090"
    assert gpu_spec("mystery accelerator")[0] == ""
    a100 = ServerOffer(id="a", gpu_model="A100 80GB", gpu_count=1, gpu_mem_mib=81920)
    assert hardware_score(a100) == pytest.approx(REFERENCE_SCORE)
    # the trainer uses one device: an 8-GPU box gets no credit for seven idle GPUs
    eight = ServerOffer(id="b", gpu_model="A100 80GB", gpu_count=8, gpu_mem_mib=81920)
    assert hardware_score(eight) == pytest.approx(REFERENCE_SCORE)
    assert hardware_score(ServerOffer(id="d", cpu_count=32)) == pytest.approx(32 * 0.073)
    assert hardware_score(ServerOffer(id="e", cpu_count=32, hardware_score=7.0)) == 7.0


def test_job_cost_scales_with_hardware() -> None:
    cands = filter_offers(FLEET, Constraints(), EST)
    by_id = {cands.offer(i).id: float(cands.job_usd[i]) for i in range(len(cands))}
    cpu_hours = EST * REFERENCE_SCORE / (32 * 0.073) + 0.25
    assert by_id == pytest.approx(
        {"big": 3.5, "mid": 1.5, "cheap": 0.7, "near": 2.0, "slow": 1.0, "cpu": cpu_hours}
    )


# --- hard constraints -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("constraints", "name", "gone"),
    [
        ({}, "status", ["down"]),
        ({"region": "us"}, "region", ["cheap", "slow"]),
        ({"region": "eu-west"}, "region", ["big", "mid", "near", "slow", "cpu"]),
        ({"min_gpu_mem_mib": 40000}, "min_gpu_mem_mib", ["cheap", "near", "cpu"]),
        ({"max_price_usd_per_hour": 1.8}, "max_price_usd_per_hour", ["big", "near"]),
        ({"max_latency_ms": 50}, "max_latency_ms", ["cheap", "slow"]),
        ({"budget_usd": 1.6}, "budget_usd", ["big", "near", "cpu"]),
    ],
)
def test_each_constraint_removes_the_right_ids(
    constraints: dict[str, Any], name: str, gone: list[str]
) -> None:
    sel = select(ParetoFrontGrid(), **constraints)
    assert sel.removed[name] == gone
    extra = {"latency_known"} if "max_latency_ms" in constraints else set()
    assert set(sel.removed) == {"status", "busy", *constraints, *extra}
    kept = {o.id for o in FLEET} - {i for ids in sel.removed.values() for i in ids}
    assert sel.chosen.id in kept
    assert sel.candidates == len(FLEET)


def test_offer_is_charged_to_the_first_constraint_it_breaks() -> None:
    sel = select(CostFirst(), region="us", max_latency_ms=50, budget_usd=1.6)
    assert sel.removed == {
        "status": ["down"], "busy": [], "region": ["cheap", "slow"], "latency_known": [],
        "max_latency_ms": [], "budget_usd": ["big", "near", "cpu"],
    }
    assert sel.chosen.id == "mid"


def test_infeasible_budget_names_cheapest_option() -> None:
    with pytest.raises(Infeasible) as exc:
        select(ParetoFrontGrid(), budget_usd=0.5)
    assert str(exc.value) == (
        "budget $0.50 too low: the cheapest server meeting the other constraints costs $0.70 "
        "for this job (cheap)"
    )
    assert exc.value.field == "constraints.budget_usd"
    assert "$0.70" in exc.value.hint


def test_infeasible_latency_is_binding_when_the_budget_fits() -> None:
    with pytest.raises(Infeasible) as exc:
        select(ParetoFrontGrid(), budget_usd=0.8, max_latency_ms=50)
    assert str(exc.value) == (
        "max latency 50 ms too low: the fastest server meeting the other constraints answers "
        "in 60 ms (cheap, eu-west)"
    )
    assert exc.value.field == "constraints.max_latency_ms"


def test_infeasible_budget_with_latency_names_cheapest_fast_server() -> None:
    with pytest.raises(Infeasible, match=r"costs \$2\.00 for this job \(near\)"):
        select(CostFirst(), budget_usd=0.5, max_latency_ms=10)


@pytest.mark.parametrize(
    ("constraints", "message"),
    [
        ({"max_price_usd_per_hour": 0.3},
         "max price $0.30/h too low: the cheapest server meeting the other constraints costs "
         "$0.40/h (cheap)"),
        ({"min_gpu_mem_mib": 100000},
         "min GPU memory 100000 MiB too high: the largest GPU meeting the other constraints "
         "has 81920 MiB (slow)"),  # tied with big on memory: the cheaper job is nearer
        ({"region": "ap", "max_latency_ms": 50},
         "max latency 50 ms too low: the fastest server meeting the other constraints answers "
         "in 300 ms (slow, ap-northeast)"),
        ({"region": "sa"}, "no server in region 'sa' meets the other constraints: the nearest "
         "option is cheap in eu-west"),
        ({"max_latency_ms": 3},  # `down` answers in 1 ms but is down: near is nearer
         "max latency 3 ms too low: the fastest server meeting the other constraints answers "
         "in 5 ms (near, us-east)"),
        ({"min_gpu_mem_mib": 100000, "budget_usd": 0.5},
         "no server meets min_gpu_mem_mib and budget_usd together: the nearest option is cheap "
         "(min_gpu_mem_mib: 24576 MiB per GPU, budget_usd: $0.70 for this job)"),
    ],
)
def test_infeasible_messages(constraints: dict[str, Any], message: str) -> None:
    with pytest.raises(Infeasible) as exc:
        select(WeightedSum(), **constraints)
    assert str(exc.value) == message
    assert exc.value.hint


def test_no_offers_is_infeasible() -> None:
    with pytest.raises(Infeasible, match="no servers to choose from"):
        ParetoFrontGrid().select([], Constraints())


# --- baselines --------------------------------------------------------------------------------


def test_baselines_pick_their_extreme() -> None:
    assert select(HardwareFirst()).chosen.id == "big"
    assert select(CostFirst()).chosen.id == "cheap"
    assert select(LatencyFirst()).chosen.id == "near"
    assert select(WeightedSum(cost=1, hardware=0, latency=0)).chosen.id == "cheap"
    assert select(WeightedSum(latency=1, hardware=0, cost=0)).chosen.id == "near"
    assert select(WeightedSum({"hardware": 1, "cost": 0, "latency": 0})).chosen.id == "big"


def test_baseline_selection_carries_explanation_and_front() -> None:
    sel = select(HardwareFirst(), max_latency_ms=50)
    assert sel.selector == "hardware-first"
    text = sel.explanation
    assert "max_latency_ms removed 2 (cheap, slow)" in text
    assert "largest hardware score" in text and "big wins" in text
    assert "big" in sel.pareto_ids
    assert sel.details["chosen"]["est_job_usd"] == pytest.approx(3.5)


def test_random_is_seeded_and_order_independent() -> None:
    picks = {RandomPick().select(FLEET, Constraints(), seed=s).chosen.id for s in range(40)}
    assert picks == {"big", "mid", "cheap", "near", "slow", "cpu"}
    for seed in range(5):
        a = RandomPick().select(FLEET, Constraints(), seed=seed).chosen.id
        b = RandomPick().select(FLEET[::-1], Constraints(), seed=seed).chosen.id
        assert a == b


def test_ties_go_to_smaller_id() -> None:
    twins = [offer("b-twin", 312, 1.0, 10), offer("a-twin", 312, 1.0, 10)]
    for selector in (ParetoFrontGrid(), HardwareFirst(), CostFirst(), LatencyFirst(),
                     WeightedSum()):
        sel = selector.select(twins, Constraints())
        assert sel.chosen.id == "a-twin"
        assert sorted(sel.pareto_ids) == ["a-twin", "b-twin"]


# --- PFG ------------------------------------------------------------------------------------


def test_pfg_explains_itself() -> None:
    sel = select(ParetoFrontGrid(k=4), max_latency_ms=100)
    text = sel.explanation
    pareto = sel.pareto_ids
    assert sorted(pareto) == ["big", "cheap", "mid", "near"]
    assert "Pareto Front Grid over 7 servers" in text
    assert "max_latency_ms removed 1 (slow)" in text
    assert "4 of them are Pareto-optimal" in text
    assert f"{sel.chosen.id} wins that cell" in text
    d = sel.details
    assert d["k"] == 4 and len(d["cell"]) == 3
    assert set(d["normalised"]) == {"hardware", "cost", "latency"}
    assert d["distance"] == pytest.approx(float(np.linalg.norm(list(d["normalised"].values()))),
                                          abs=1e-3)
    assert d["cell"][1] == min(c[1] for c in d["pareto_cells"])


def test_pfg_grid_resolution_changes_the_pick() -> None:
    # k=1: one cell, the Pareto server nearest the ideal point wins (mid, balanced);
    # k=2: mid and near share the cheapest cell, mid is nearer the ideal;
    # k=4: cheap alone has the lowest cost band
    picks = {k: select(ParetoFrontGrid(k=k), max_latency_ms=100) for k in (1, 2, 4)}
    assert {k: s.chosen.id for k, s in picks.items()} == {1: "mid", 2: "mid", 4: "cheap"}
    assert picks[2].details["cell_members"] == ["mid", "near"]


def test_all_down_is_infeasible_on_status() -> None:
    down = [offer("x", 312, 1.0, 5, status="down"), offer("y", 312, 2.0, 5, status="down")]
    with pytest.raises(Infeasible) as exc:
        ParetoFrontGrid().select(down, Constraints())
    assert str(exc.value) == (
        "every server meeting the other constraints is down: the nearest is x"
    )
    assert exc.value.field == "constraints.status"


def test_selector_params_are_validated() -> None:
    assert ParetoFrontGrid({"k": 6}).k == 6
    assert ParetoFrontGrid(normalise="candidates").normalise == "candidates"
    with pytest.raises(ConfigError, match="`k`"):
        ParetoFrontGrid(k=0)
    with pytest.raises(ConfigError, match="unknown pfg parameter"):
        ParetoFrontGrid({"grid": 3})
    with pytest.raises(ConfigError, match="weights"):
        WeightedSum(cost=-1)
    with pytest.raises(ConfigError, match="unknown cost-first parameter"):
        CostFirst({"x": 1})


def test_plugins_are_discoverable() -> None:
    plugins = Plugins()
    assert {"pfg", "hardware-first", "cost-first", "latency-first", "random",
            "weighted-sum"} <= set(plugins.selectors.names())
    assert "static" in plugins.catalogs
    assert plugins.selectors.get("pfg") is ParetoFrontGrid


def test_plugin_modules_import_no_numpy_or_matplotlib() -> None:
    """The daemon and CLI import every plugin module at start: numpy loads on first select."""
    code = (
        "import sys, plugins.selectors.pfg, plugins.selectors.baselines, "
        "plugins.catalogs.static, stratosd.planning; "
        "print(sorted(m for m in ('numpy', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
