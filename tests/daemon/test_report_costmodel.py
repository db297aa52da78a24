"""The report and the cost model: estimated vs measured per phase, baselines' provenance,
selectors that agree, quality targets and failed latency probes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas.specs import ServerOffer
from stratosd.comparison import compare_selectors
from stratosd.costmodel.costs import STAGE_PHASE, CostModel
from stratosd.costmodel.learn import EfficiencyBook
from stratosd.plugins import Plugins
from stratosd.report import headline, write_report
from tests.daemon.test_report import (
    MEASURED_RATIO,
    OFFERS,
    TRAIN_LOOP_RATIO,
    full_results,
    make_run,
    make_spec,
)

CPU_A = ServerOffer(id="cpu-a", agent_id="ag-cpu-a", cpu_count=8, ram_mib=131072,
                    price_usd_per_hour=0.10, latency_ms=5.0, region="eu-west")


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return Plugins()


@pytest.fixture(scope="module")
def full(plugins: Plugins, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    spec = make_spec(constraints={"budget_usd": 5.0})
    run = make_run(spec, full_results(plugins, spec))
    out = tmp_path_factory.mktemp("report")
    ret = write_report(run, plugins, out)
    return {"run": run, "ret": ret, "md": (out / "report.md").read_text()}


def test_per_phase_estimated_vs_measured_rows(full: dict[str, Any]) -> None:
    md, run = full["md"], full["run"]
    section = md.split("## Cost model: estimated vs measured", 1)[1].split("\n## ", 1)[0]
    for stage, phase in STAGE_PHASE.items():
        c = run.results[stage]["cost"]
        est = msgspec.convert(c["estimated_s"], dict)
        err = f"{(MEASURED_RATIO[phase] - 1) * 100:+.0f}%"
        row = next(line for line in section.splitlines() if line.startswith(f"| {phase} |"))
        cells = [x.strip() for x in row.strip("|").split("|")]
        assert cells[1] == c["server"]
        assert cells[2].startswith(f"{est['value']:.3g} s (") and "prior)" in cells[2]
        assert cells[3] == f"{c['measured_s']:.1f}" and cells[4] == err, row
        assert cells[6] == f"{c['measured_usd']:.4f}"
    tr = run.results["train"]
    loop = next(line for line in section.splitlines() if "training loop" in line)
    assert f"{tr['train_time_s']:.1f}" in loop
    assert f"{(TRAIN_LOOP_RATIO - 1) * 100:+.0f}%" in loop
    total = sum(run.results[s]["cost"]["measured_usd"] for s in STAGE_PHASE)
    assert f"Total $ (measured): **${total:.4f}** of budget $5.00 ({total / 5:.0%})" in section
    assert "estimated at server selection" in section


def test_baseline_row_says_estimated_and_its_source(full: dict[str, Any]) -> None:
    md = full["md"]
    row = next(line for line in md.splitlines() if line.startswith("| hardware-first |"))
    assert "estimated ±" in row and "(prior, no history)" in row  # a100-eu: within budget
    own = next(line for line in md.splitlines() if line.startswith("| **pfg (Stratos)** |"))
    assert own.rstrip(" |").endswith("measured")
    assert "priors only" in md


def test_learned_efficiencies_show_their_history(plugins: Plugins) -> None:
    spec = make_spec()
    run = make_run(spec, full_results(plugins, spec))
    model = CostModel(plugins, EfficiencyBook())
    costing = model.costing(spec, run)
    h100 = next(o for o in OFFERS if o.id == "h100x8-us")
    prior = costing.estimate(h100)
    for p in prior.phases:
        for ratio in (2.0, 2.2, 1.8):  # three runs, each about twice the prior
            if p.key:
                model.book.observe(p.key, p.seconds.value, p.seconds.value * ratio)
                model.book.observe(p.key + ".loop", 1.0, ratio)
    comp = compare_selectors(run, plugins, model)
    hw = next(r for r in comp["rows"] if r["selector"] == "hardware-first")
    assert hw["basis"] == "estimated" and "from 3 runs" in hw["provenance"]
    assert hw["estimate"]["seconds"]["source"] == "calibrated"
    assert hw["estimate"]["train_time_s"]["n"] == 3
    assert prior.seconds is not None
    assert hw["estimate"]["seconds"]["value"] > 1.5 * prior.seconds.value
    assert comp["cost_model"]["learned"] is True
    assert not any("priors" in n for n in comp["notes"])


def test_all_selectors_agree_says_so_plainly(plugins: Plugins, tmp_path: Path) -> None:
    spec = make_spec()
    run = make_run(spec, full_results(plugins, spec, offers=[CPU_A]))
    ret = write_report(run, plugins, tmp_path)
    md = (tmp_path / "report.md").read_text()
    comp = compare_selectors(run, plugins)
    assert comp["all_agree"] is True and comp["improvement_pct"] is None
    assert comp["agreement"] == "every selector picked cpu-a: nothing to compare on this fleet"
    assert "Every selector picked cpu-a: nothing to compare on this fleet." in md
    assert "| improvement over best baseline | n/a: all selectors agree |" in md
    assert "+0.0%" not in md
    assert ret["improvement_pct"] is None and ret["summary"]["all_selectors_agree"] is True
    assert ret["summary"]["improvement_pct"] is None


def test_same_class_server_takes_the_runs_measurements(plugins: Plugins) -> None:
    """cpu-b is cpu-a at half the price and 10x the latency: the model sees them alike."""
    cpu_b = msgspec.structs.replace(CPU_A, id="cpu-b", agent_id="ag-cpu-b",
                                    price_usd_per_hour=0.05, latency_ms=50.0)
    spec = make_spec(selector="latency-first")
    results = full_results(plugins, spec, offers=[CPU_A, cpu_b])
    comp = compare_selectors(make_run(spec, results), plugins)
    own = comp["rows"][0]
    b = next(r for r in comp["rows"] if r["server"] == "cpu-b")
    assert own["server"] == "cpu-a" and b["basis"] == "measured on cpu-a (same class)"
    assert b["train_time_s"] == own["train_time_s"] == results["train"]["train_time_s"]
    secs = sum(results[s]["cost"]["measured_s"] for s in STAGE_PHASE)
    assert b["cost_usd"] == pytest.approx(own["cost_usd"] - secs / 3600 * 0.05)
    assert comp["improvement_pct"] is not None  # different numbers: something to compare


def test_no_target_is_not_met(plugins: Plugins) -> None:
    spec = make_spec()
    results = full_results(plugins, spec)
    for target, words, met in ((0.0, "no target", None), (0.3, "met", True),
                               (0.5, "NOT met", False)):
        run = make_run(make_spec(constraints={"target_accuracy": target}), results)
        s = headline(run, {})
        assert (s["target"], s["target_met"]) == (words, met)
    no_eval = {k: v for k, v in results.items() if k != "evaluate"}
    s = headline(make_run(make_spec(constraints={"target_accuracy": 0.3}), no_eval), {})
    assert (s["target"], s["target_met"]) == ("n/a (not evaluated)", None)


def test_failed_latency_probe_is_na_not_zero(plugins: Plugins, tmp_path: Path) -> None:
    spec = make_spec(constraints={"target_accuracy": 0.3})
    results = full_results(plugins, spec)
    results["deploy"]["metrics"] = {"requests": 8.0, "errors": 8.0}
    ret = write_report(make_run(spec, results), plugins, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "latency n/a (every probe request failed); 8 failed of 8 probe requests" in md
    assert "| serving latency p50 ms (measured) | n/a |" in md
    assert "| quality target (constraints.target_accuracy) | 30.0%: met |" in md
    assert ret["summary"]["latency_ms"] is None
    assert ret["score"] is not None  # the score's latency is each server's network latency
