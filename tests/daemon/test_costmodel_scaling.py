"""The cost model credits the ranks the trainer launches, at a learned scaling efficiency."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from schemas.commands import RunInfo
from schemas.specs import RunSpec, ServerOffer
from stratosd.costmodel import JobCosting
from stratosd.costmodel.learn import EfficiencyBook
from stratosd.costmodel.model import (
    PRIOR_SCALING,
    observe_scaling,
    prior_scaling,
    scaling,
    train_loop_prior_s,
)
from stratosd.costmodel.work import ALL_DEVICES, estimate_work
from stratosd.plugins import Plugins
from stratosd.validate import parse_spec_toml
from tests.conftest import ROOT

DEMO = ROOT / "examples" / "mahjong-demo.toml"
ONE = ServerOffer(id="1", gpu_model="H100", gpu_count=1, gpu_mem_mib=81920,
                  price_usd_per_hour=2.0)
EIGHT = msgspec.structs.replace(ONE, id="8", gpu_count=8, price_usd_per_hour=16.0)


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return Plugins()


def spec(**train: Any) -> RunSpec:
    data = msgspec.to_builtins(parse_spec_toml(DEMO))
    data["train"] = {**data.get("train", {}), **train}
    return msgspec.convert(data, RunSpec)


def test_every_device_is_credited_at_its_scaling_efficiency(plugins: Plugins) -> None:
    w = estimate_work(spec(), plugins)  # full-sft, ranks = 0: one rank per device
    assert w.devices == ALL_DEVICES and "ranks = 0" in w.notes["devices"]
    cols = JobCosting(w).columns([ONE, EIGHT])
    assert cols.hardware[1] == pytest.approx(cols.hardware[0] * 8 * PRIOR_SCALING["gpu"][8])
    est = JobCosting(w).estimate(EIGHT)
    train = next(p for p in est.phases if p.phase == "train")
    assert "8 rank(s) x scaling efficiency 0.85 (prior)" in train.basis
    # a job that asks for 2 ranks gets 2 on the 8-GPU box
    two = estimate_work(spec(ranks=2), plugins)
    assert JobCosting(two).columns([EIGHT]).hardware[0] == pytest.approx(
        cols.hardware[0] * 2 * PRIOR_SCALING["gpu"][2])


def test_a_trainer_on_one_device_gets_one(plugins: Plugins) -> None:
    data = msgspec.to_builtins(parse_spec_toml(DEMO))
    data["trainer"] = "grpo"
    w = estimate_work(msgspec.convert(data, RunSpec), plugins)
    assert w.devices == 1
    cols = JobCosting(w).columns([ONE, EIGHT])
    assert cols.hardware[0] == cols.hardware[1]


def test_prior_scaling_is_a_table_not_an_exponent() -> None:
    assert prior_scaling("gpu", 1) == 1.0
    assert prior_scaling("gpu", 4) == PRIOR_SCALING["gpu"][4]
    assert prior_scaling("cpu", 2) == PRIOR_SCALING["cpu"][2]
    assert 0 < prior_scaling("gpu", 16) < prior_scaling("gpu", 8)  # past the table: decays
    assert prior_scaling("gpu", 4) <= prior_scaling("gpu", 3) <= prior_scaling("gpu", 2)


def test_scaling_efficiency_is_learned_from_runs_with_that_many_ranks(plugins: Plugins) -> None:
    w = msgspec.structs.replace(estimate_work(spec(), plugins), devices=ALL_DEVICES)
    book = EfficiencyBook()
    prior_loop = train_loop_prior_s(msgspec.structs.replace(w, devices=8), EIGHT)
    # runs on 8 ranks measured only 0.5 efficiency where the prior said 0.85: slower loops
    measured = prior_loop * PRIOR_SCALING["gpu"][8] / 0.5
    for _ in range(4):
        k = observe_scaling(book, w, EIGHT, 8, measured)
    assert k is not None and k.endswith(".scaling8")
    costing = JobCosting(w, book)
    ranks, eff, source = scaling(costing._priors(EIGHT)[0], w, book)
    assert ranks == 8 and eff == pytest.approx(0.5, rel=0.05) and "learned from 4" in source
    before = JobCosting(w).columns([EIGHT])
    after = costing.columns([EIGHT])
    assert after.hardware[0] < before.hardware[0] and after.seconds[0] > before.seconds[0]
    # other rank counts keep their prior; one rank never learns a scaling record
    assert observe_scaling(book, w, ONE, 1, measured) is None
    four = msgspec.structs.replace(EIGHT, id="4", gpu_count=4)
    assert scaling(JobCosting(w, book)._priors(four)[0], w, book)[1] == PRIOR_SCALING["gpu"][4]


def test_a_finished_multi_rank_train_stage_teaches_the_scaling_record(plugins: Plugins) -> None:
    from stratosd.costmodel.costs import CostModel

    costs = CostModel(plugins)
    w = costs.work(spec())
    loop = train_loop_prior_s(msgspec.structs.replace(w, devices=8), EIGHT) * 2
    now = datetime.now(UTC)
    run = RunInfo(run_id="r1", name="r1", state="running", stage="train", created=now,
                  updated=now, spec=spec())
    got = costs.stage_cost(run, "train", EIGHT, loop + 60.0,
                           {"train_time_s": loop, "ranks": 8})
    assert got is not None
    keys = list(costs.book.keys())
    assert any(k.endswith(".scaling8") for k in keys)
    assert not any(k.endswith(".loop") for k in keys)  # one rank's record stays one rank's
