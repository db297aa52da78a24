"""The planner proposes a group of agents only when the job's deadline needs one
(stratosd.groupplan): same region, smallest group that is fast enough, scored as one server."""

from __future__ import annotations

from typing import Any

import pytest

from plugins.selectors.baselines import CostFirst
from plugins.selectors.pfg import ParetoFrontGrid
from schemas.costs import JobWork
from schemas.specs import RunSpec, ServerOffer
from schemas.telemetry import Capacity
from stratosd.costmodel.model import JobCosting
from stratosd.costmodel.work import ALL_DEVICES
from stratosd.errors import ConfigError, Infeasible
from stratosd.groupplan import MAX_AUTO_NODES, deadline_groups, plan_select
from stratosd.plugins import Plugins
from stratosd.validate import spec_from_data

# a 500M-parameter full SFT: training dominates, so more nodes finish sooner
WORK = JobWork(student="s", params=5e8, trainable_params=5e8, layers=24, hidden=1024,
               seq_tokens=512, trainer="full-sft", train_tokens=2e7, train_steps=200,
               devices=ALL_DEVICES)  # full SFT: one rank per device, or per group member
CAP = Capacity(source="measured", device="cpu", threads=8, matmul_tflops={"fp32": 2.0})


def _costing() -> JobCosting:
    return JobCosting(WORK, phases=("train",))


def _cpu(name: str, region: str = "eu", price: float = 1.0, **kw: Any) -> ServerOffer:
    return ServerOffer(id=name, agent_id=name, region=region, cpu_count=8, ram_mib=32000,
                       price_usd_per_hour=price, latency_ms=10.0, capacity=CAP, **kw)


def _data() -> dict[str, Any]:
    return {"name": "deadline", "task": {"name": "mahjong-winning-tiles"}, "trainer": "full-sft",
            "teachers": [{"backend": "reference", "model": "reference"}],
            "students": [{"model": "config:tiny"}]}


def _spec(**constraints: Any) -> RunSpec:
    return spec_from_data({**_data(), "constraints": constraints})


def _hours(offers: list[ServerOffer]) -> list[float]:
    return [float(s) / 3600 for s in _costing().columns(offers).seconds]


FLEET = [_cpu("cpu-a"), _cpu("cpu-b", price=1.2), _cpu("cpu-c", region="us", price=0.8),
         _cpu("cpu-d", price=1.5)]
SINGLE_H = _hours([FLEET[0]])[0]


def test_without_a_deadline_one_server_as_before() -> None:
    plan = plan_select(ParetoFrontGrid(), FLEET, _spec(), _costing())
    assert not plan.selection.chosen.members and plan.offers is FLEET
    assert "Deadline" not in plan.selection.explanation


def test_a_deadline_one_server_meets_needs_no_group() -> None:
    plan = plan_select(CostFirst(), FLEET, _spec(deadline_hours=SINGLE_H * 1.1), _costing())
    assert plan.selection.chosen.id == "cpu-c" and not plan.selection.chosen.members
    assert len(plan.offers) == len(FLEET)
    assert plan.selection.explanation.startswith(
        f"Deadline {SINGLE_H * 1.1:g} h: cpu-c meets it alone")


def test_a_tight_deadline_gets_the_smallest_same_region_group_that_meets_it() -> None:
    two = deadline_groups(FLEET, 0.0, _costing(), max_nodes=2)[0]
    assert SINGLE_H * 0.5 < two.hours < SINGLE_H  # N ranks at scaling efficiency < 1
    deadline = (two.hours + SINGLE_H) / 2
    plan = plan_select(CostFirst(), FLEET, _spec(deadline_hours=deadline), _costing())
    chosen = plan.selection.chosen
    # cpu-c (us) is alone in its region: the group is the two cheapest of eu
    assert chosen.members == ["cpu-a", "cpu-b"] and chosen.id == "cpu-a+cpu-b"
    assert chosen.region == "eu" and chosen.agent_id == "cpu-a"
    assert chosen.price_usd_per_hour == pytest.approx(2.2)
    assert _hours([chosen])[0] <= deadline
    why = plan.selection.explanation
    assert why.startswith(f"Deadline {deadline:g} h: no single server meets it")
    assert f"cpu-a {SINGLE_H:.3g} h" in why and "group cpu-a+cpu-b" in why and "meets it" in why
    assert "scaling efficiency 0.80 prior" in why
    info = plan.selection.details["deadline"]
    assert info["groups"][0]["members"] == ["cpu-a", "cpu-b"]
    assert {o.id for o in plan.offers} >= {"cpu-a", "cpu-c", "cpu-a+cpu-b"}


def test_a_tighter_deadline_gets_a_larger_group() -> None:
    opts = {len(g.offer.members): g.hours
            for n in (2, 3) for g in deadline_groups(FLEET, 0.0, _costing(), max_nodes=n)}
    assert opts[3] < opts[2]
    deadline = (opts[3] + opts[2]) / 2
    plan = plan_select(CostFirst(), FLEET, _spec(deadline_hours=deadline), _costing())
    assert plan.selection.chosen.members == ["cpu-a", "cpu-b", "cpu-d"]


def test_groups_are_capped_and_free_agents_come_first() -> None:
    fleet = [_cpu(f"n{i}", price=1.0 + i / 10) for i in range(8)]
    fleet[0] = _cpu("n0", busy=True)
    [biggest] = deadline_groups(fleet, 0.0, _costing())
    assert len(biggest.offer.members) == MAX_AUTO_NODES
    assert biggest.offer.members == ["n1", "n2", "n3", "n4"] and not biggest.offer.busy


def test_an_unreachable_deadline_names_the_best_achievable_time() -> None:
    fastest = deadline_groups(FLEET, 0.0, _costing())[0]
    assert fastest.offer.members == ["cpu-a", "cpu-b", "cpu-d"]
    with pytest.raises(Infeasible) as err:
        plan_select(CostFirst(), FLEET, _spec(deadline_hours=0.01), _costing())
    assert err.value.field == "constraints.deadline_hours"
    msg = err.value.message
    assert msg.startswith("deadline 0.01 h too short: the fastest option meeting the other "
                          f"constraints takes {fastest.hours:.3g} h for this job (group "
                          "cpu-a+cpu-b+cpu-d)")
    assert f"cpu-a {SINGLE_H:.3g} h" in msg
    assert "raise deadline_hours" in (err.value.hint or "")


def test_a_group_meets_deadline_and_budget_where_the_fast_single_breaks_the_budget() -> None:
    fast = ServerOffer(id="gpu-x", agent_id="gpu-x", region="eu", gpu_model="H100",
                       gpu_count=1, gpu_mem_mib=81559, cpu_count=16, price_usd_per_hour=5000.0,
                       latency_ms=10.0)
    fleet = [*FLEET, fast]
    assert _hours([fast])[0] < SINGLE_H / 2
    two = deadline_groups(FLEET, 0.0, _costing(), max_nodes=2)[0]
    spec = _spec(deadline_hours=(two.hours + SINGLE_H) / 2, budget_usd=100.0)
    plan = plan_select(ParetoFrontGrid(), fleet, spec, _costing())
    assert plan.selection.chosen.id == "cpu-a+cpu-b"


def test_a_trainer_that_runs_on_one_device_gets_no_group() -> None:
    spec = spec_from_data({**_data(), "trainer": "grpo",
                           "constraints": {"deadline_hours": SINGLE_H / 2}})
    with pytest.raises(Infeasible) as err:
        plan_select(CostFirst(), FLEET, spec, _costing(), plugins=Plugins())
    assert "trainer 'grpo' runs on one device" in err.value.message


def test_train_nodes_still_wins_over_the_planner() -> None:
    spec = spec_from_data({**_data(), "train": {"nodes": 2},
                           "constraints": {"deadline_hours": 1000.0}})
    plan = plan_select(CostFirst(), FLEET, spec, _costing())
    assert plan.selection.chosen.members == ["cpu-a", "cpu-b"]


def test_a_bad_deadline_is_refused_naming_the_field() -> None:
    for bad in (0, -1, "soon"):
        with pytest.raises(ConfigError) as err:
            spec_from_data({**_data(), "constraints": {"deadline_hours": bad}})
        assert err.value.field == "constraints.deadline_hours"
        assert "deadline_hours" in err.value.message
