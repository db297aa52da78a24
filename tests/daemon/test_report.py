"""The run report: Markdown, JSON and plots from a hand-built run, complete and partial."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas.base import to_builtins
from schemas.commands import RunInfo
from schemas.costs import JobEstimate, StageCost
from schemas.specs import RunSpec, ScoreWeights, ServerOffer
from stratosd.comparison import compare_selectors
from stratosd.costmodel.costs import STAGE_PHASE, CostModel
from stratosd.plugins import Plugins
from stratosd.report import write_report
from stratosd.score import METRICS

OFFERS = [
    ServerOffer(id="a100-eu", agent_id="ag-a100", gpu_model="NVIDIA A100-SXM4-80GB",
                gpu_count=1, gpu_mem_mib=81920, cpu_count=16, ram_mib=131072,
                price_usd_per_hour=1.29, latency_ms=25.0, region="eu-west"),
    ServerOffer(id="h100x8-us", agent_id="ag-h100", gpu_model="NVIDIA H100 80GB HBM3",
                gpu_count=8, gpu_mem_mib=81920, cpu_count=128, ram_mib=1048576,
                price_usd_per_hour=23.9, latency_ms=95.0, region="us-east"),
    ServerOffer(id="l4-eu", agent_id="ag-l4", gpu_model="NVIDIA L4", gpu_count=1,
                gpu_mem_mib=23034, cpu_count=8, ram_mib=32768, price_usd_per_hour=0.44,
                latency_ms=18.0, region="eu-west"),
    ServerOffer(id="t4-asia", agent_id="ag-t4", gpu_model="Tesla T4", gpu_count=1,
                gpu_mem_mib=15360, cpu_count=4, ram_mib=16384, price_usd_per_hour=0.21,
                latency_ms=180.0, region="ap-south"),
    ServerOffer(id="4090-home", agent_id="ag-4090", gpu_model="NVIDIA GeForce RTX 4090",
                gpu_count=1, gpu_mem_mib=24564, cpu_count=16, ram_mib=65536,
                price_usd_per_hour=0.35, latency_ms=8.0, region="eu-central"),
    ServerOffer(id="cpu-box", agent_id="ag-cpu", cpu_count=32, ram_mib=65536,
                price_usd_per_hour=0.10, latency_ms=5.0, region="eu-west"),
]
BEFORE = {"n": 100, "correct": 4, "accuracy": 0.04, "ci_low": 0.0157, "ci_high": 0.0984,
          "partial": 0.11, "latency_ms_mean": 410.0, "latency_ms_p95": 690.0,
          "tokens_per_s": 52.0, "completion_tokens": 5200}
AFTER = {"n": 100, "correct": 38, "accuracy": 0.38, "ci_low": 0.2896, "ci_high": 0.4793,
         "partial": 0.52, "latency_ms_mean": 380.0, "latency_ms_p95": 640.0,
         "tokens_per_s": 55.0, "completion_tokens": 5500}


# measured / estimated on the run's server, per phase: the model is ~20-40% optimistic here
MEASURED_RATIO = {"probe": 1.2, "prescreen": 0.9, "synthesis": 1.4, "train": 1.3,
                  "evaluate": 1.1, "deploy": 1.25}
TRAIN_LOOP_RATIO = 1.3


def make_spec(**over: Any) -> RunSpec:
    """A job spec like the Mahjong example (an API teacher and a local one)."""
    spec = {"name": "mahjong-demo", "task": {"name": "mahjong-winning-tiles"},
            "teachers": [{"backend": "openai", "model": "gpt-4o", "name": "gpt-4o"},
                         {"backend": "hf", "model": "Qwen/Qwen2.5-7B-Instruct",
                          "name": "qwen-7b"}],
            "students": [{"model": "Qwen/Qwen2.5-3B"}, {"model": "Qwen/Qwen2.5-1.5B"}], **over}
    return msgspec.convert(spec, RunSpec)


def stage_cost(est: JobEstimate, price: float, api_usd: float = 0.0) -> dict[str, Any]:
    """A stage's `cost` as the daemon stores it: the phase's estimate (made before it ran,
    API $ included) and a measurement of MEASURED_RATIO x the estimate."""
    p = est.phases[0]
    secs = p.seconds.value * MEASURED_RATIO[p.phase]
    return to_builtins(StageCost(phase=p.phase, server=est.server, estimated_s=p.seconds,
                                 measured_s=round(secs, 3), estimated_usd=est.usd, key=p.key,
                                 measured_usd=round(secs / 3600 * price + api_usd, 6)))


def full_results(plugins: Plugins, spec: RunSpec, offers: list[ServerOffer] = OFFERS
                 ) -> dict[str, Any]:
    """Every stage's result as the daemon stores it, with the real selector's pick and real
    cost-model estimates; measurements are the estimates x MEASURED_RATIO."""
    model = CostModel(plugins)
    work = model.work(spec)  # at server selection: the largest candidate student
    costing = model.costing(spec, None, work=work)
    selection = plugins.selectors.get(spec.selector)().select(
        offers, spec.constraints, costing=costing, seed=spec.seed)
    chosen = selection.chosen
    results: dict[str, Any] = {
        "select_server": {"selection": to_builtins(selection), "agent_id": chosen.agent_id,
                          "offers": [to_builtins(o) for o in offers],
                          "work": to_builtins(work),
                          "estimate": to_builtins(costing.estimate(chosen)),
                          "train_loop_estimate": to_builtins(
                              model.loop_estimate(work, chosen, spec.est_train_hours)),
                          "queued_s": 0.0},
        "probe_teachers": {"best": "qwen-7b", "scores": [
            {"name": "gpt-4o", "backend": "openai", "model": "gpt-4o", "accuracy": 0.12,
             "n": 50, "correct": 6, "cost_usd": 0.31, "latency_ms_mean": 2100.0},
            {"name": "qwen-7b", "backend": "hf", "model": "Qwen/Qwen2.5-7B-Instruct",
             "accuracy": 0.14, "n": 50, "correct": 7, "latency_ms_mean": 900.0},
        ]},
        "select_student": {"chosen": "Qwen/Qwen2.5-3B", "reason": "best pre-screen accuracy",
                           "candidates": [
            {"model": "Qwen/Qwen2.5-3B", "params_m": 3090.0, "est_train_mem_mib": 21500.0,
             "est_serve_mem_mib": 7400.0, "fits": True, "prescreen_accuracy": 0.22,
             "probe_loss_drop": 0.41, "kept": True, "reason": "fits: 21,500 MiB to train"},
            {"model": "Qwen/Qwen2.5-1.5B", "params_m": 1540.0, "est_train_mem_mib": 11800.0,
             "est_serve_mem_mib": 3900.0, "fits": True, "prescreen_accuracy": 0.06,
             "probe_loss_drop": 0.05, "kept": False,
             "reason": "pre-screen 6% below the 10% floor (capacity threshold)"},
        ]},
        "choose_strategy": {"mode": "injection", "teacher": "qwen-7b",
                            "teacher_spec": {"backend": "hf", "model": "q"},
                            "teacher_accuracy": 0.14, "threshold": 0.5,
                            "reason": "teacher qwen-7b probe accuracy 14.0% < threshold 50%"},
        "synthesize": {"rows": 1200, "kept": 1010, "dropped": 190,
                       "by_mode": {"injection": 1010}, "by_teacher": {"qwen-7b": 1010},
                       "verified": 1010, "cost_usd": 0.42, "rows_per_s": 3.1,
                       "artifact": "r/dataset.jsonl"},
        "train": {"first_loss": 2.31, "final_loss": 0.47, "steps": 300,
                  "tokens_per_s": 4100.0, "train_tokens": 5_166_000, "peak_rss_mib": 9100.0,
                  "trainer": "lora-sft", "artifact": "r/model.tar", "resumed": False,
                  "loss_history": [[i * 10, 2.31 * 0.93 ** i + 0.4] for i in range(31)]},
        "evaluate": {"before": BEFORE, "after": AFTER, "teacher_probe_accuracy": 0.14},
        "deploy": {"endpoint_id": "ep-01", "url": "http://10.0.0.7:8400/v1",
                   "model": "mahjong-demo", "agent_id": chosen.agent_id,
                   "metrics": {"requests": 8.0, "errors": 0.0, "latency_ms_p50": 120.0,
                               "latency_ms_p95": 240.0, "ttft_ms_p50": 41.0,
                               "tpot_ms_p50": 9.5, "tokens_per_s": 61.0},
                   "deployer": "builtin"},
    }
    # what the stages store once they ran: the work as done (chosen student, rows kept)
    run = make_run(spec, results)
    loop = model.loop_estimate(model.work(spec, run), chosen, spec.est_train_hours)
    results["train"].update(train_time_s=round(loop.value * TRAIN_LOOP_RATIO, 3),
                            train_time_estimate=to_builtins(loop))
    for stage, phase in STAGE_PHASE.items():
        if phase == "deploy" and not spec.deploy:
            continue  # nothing deployed: no deploy phase, no cost
        est = model.costing(spec, run, phases=(phase,)).estimate(chosen)
        api = 0.42 if phase == "synthesis" else 0.0
        results[stage]["cost"] = stage_cost(est, chosen.price_usd_per_hour, api)
    return results


def make_run(spec: RunSpec, results: dict[str, Any], **over: Any) -> RunInfo:
    """A RunInfo as the store keeps it."""
    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    fields: dict[str, Any] = {"state": "running", "stage": "report", **over}
    return RunInfo(run_id="01jrunreport0000000000000", name=spec.name, created=now, updated=now,
                   spec=spec, results=results, **fields)


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return Plugins()


@pytest.fixture(scope="module")
def full(plugins: Plugins, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    spec = make_spec()
    run = make_run(spec, full_results(plugins, spec))
    out = tmp_path_factory.mktemp("report")
    ret = write_report(run, plugins, out)
    return {"run": run, "ret": ret, "out": out,
            "md": (out / "report.md").read_text(),
            "json": json.loads((out / "report.json").read_text())}


def test_files_and_small_return(full: dict[str, Any]) -> None:
    ret = full["ret"]
    assert set(ret) == {"paths", "score", "improvement_pct", "summary"}
    assert set(ret["paths"]) == {"markdown", "json", "plot_pareto", "plot_loss",
                                 "plot_accuracy"}
    for key, path in ret["paths"].items():
        assert path is not None, key
        assert Path(path).is_file() and Path(path).stat().st_size > 0, key
    for key in ("plot_pareto", "plot_loss", "plot_accuracy"):
        assert Path(ret["paths"][key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.0 <= ret["score"] <= 1.0
    assert len(json.dumps(ret)) < 2000  # it goes into the run's KV entry
    s, run = ret["summary"], full["run"]
    assert s["server"] == run.results["select_server"]["selection"]["chosen"]["id"]
    assert (s["teacher"], s["student"], s["mode"]) == ("qwen-7b", "Qwen/Qwen2.5-3B",
                                                       "injection")
    assert (s["accuracy_before"], s["accuracy_after"]) == (0.04, 0.38)
    assert s["url"] == "http://10.0.0.7:8400/v1"
    assert s["latency_ms"] == 120.0  # serving p50, measured
    assert s["cost_usd"] == pytest.approx(  # every phase's measured $
        sum(run.results[st]["cost"]["measured_usd"] for st in STAGE_PHASE))
    assert s["all_selectors_agree"] is False


def test_markdown_says_what_and_why(full: dict[str, Any]) -> None:
    md, run = full["md"], full["run"]
    sel = run.results["select_server"]["selection"]
    for needle in [
        sel["chosen"]["id"], sel["explanation"].splitlines()[0],  # server and why
        "gpt-4o", "qwen-7b", "14.0%", "12.0%",  # teacher scores
        "Qwen/Qwen2.5-3B", "best pre-screen accuracy", "capacity threshold",  # student
        "injection", "threshold 50%", "probe accuracy 14.0% < threshold 50%",  # mode
        "4.0%", "38.0%", "29.0%", "47.9%",  # accuracy before -> after with CI
        f"{run.results['train']['train_time_s']:.1f} s", "2.3100", "0.4700",  # training
        "p50 120.0 ms", "TTFT p50 41.0 ms", "TPOT p50 9.5 ms",  # serving latency
        "cost $0.4200",  # synthesis
        "sum_m w_m * n_m / sum_m w_m", "accuracy = 1", "cost = 1",  # formula and weights
        "hardware-first", "cost-first", "latency-first", "random", "weighted-sum",
        "improvement", "http://10.0.0.7:8400/v1", "What is estimated vs measured",
        "## Cost model: estimated vs measured", "Accuracy does not separate the servers",
        "estimated ±", "measured", "pareto.png", "loss.png", "accuracy.png",
    ]:
        assert needle in md, needle
    assert "Missing" not in md and "derived" not in md
    assert "| quality target (constraints.target_accuracy) | no target |" in md


def test_json_holds_the_full_data(full: dict[str, Any]) -> None:
    data, run = full["json"], full["run"]
    assert data["results"] == json.loads(msgspec.json.encode(run.results))
    assert data["missing_stages"] == []
    comp = data["comparison"]
    assert comp["available"] and comp["selector"] == "pfg"
    names = [r["selector"] for r in comp["rows"]]
    assert names == ["pfg", "hardware-first", "cost-first", "latency-first", "random",
                     "weighted-sum"]
    assert data["estimated_vs_measured"]["estimated"]
    assert {b["label"] for b in data["accuracy_bars"]} == {
        "teacher qwen-7b (probe)", "student before training", "student after training"}
    assert full["ret"]["score"] == comp["stratos_score"]
    assert comp["cost_model"] == {"learned": False, "work_student": "Qwen/Qwen2.5-3B"}
    assert comp["all_agree"] is False and comp["agreement"] is None
    assert "same accuracy" in comp["accuracy_note"]


def test_score_recomputed_from_the_json(full: dict[str, Any]) -> None:
    """Anyone can recompute the score from the raw numbers, weights and formula printed."""
    comp = full["json"]["comparison"]
    sc = comp["score"]
    w = sc["weights"]
    rows = [r for r in sc["rows"] if r["feasible"]]
    for r in rows:
        num = 0.0
        for m in METRICS:
            vals = [x["raw"][m] for x in rows]
            lo, hi = min(vals), max(vals)
            if hi == lo:
                term = 1.0
            elif m == "accuracy":
                term = (r["raw"][m] - lo) / (hi - lo)
            else:
                term = (hi - r["raw"][m]) / (hi - lo)
            num += w[m] * term
        assert r["score"] == pytest.approx(num / sum(w.values()))
        assert 0.0 <= r["score"] <= 1.0
    best = max(r["score"] for r in rows if r["name"] != "pfg")
    mine = next(r["score"] for r in rows if r["name"] == "pfg")
    assert comp["improvement_pct"] == pytest.approx((mine - best) / best * 100)


def test_baseline_numbers_come_from_the_cost_model(
    full: dict[str, Any], plugins: Plugins
) -> None:
    comp, run = full["json"]["comparison"], full["run"]
    own = comp["rows"][0]
    assert own["measured"] and own["basis"] == own["provenance"] == "measured"
    assert own["train_time_s"] == run.results["train"]["train_time_s"]
    assert own["cost_usd"] == pytest.approx(full["ret"]["summary"]["cost_usd"])
    assert own["latency_ms"] == own["network_latency_ms"]
    hw = next(r for r in comp["rows"] if r["selector"] == "hardware-first")
    assert hw["server"] == "h100x8-us" and not hw["measured"] and hw["basis"] == "estimated"
    model = CostModel(plugins)
    costing = model.costing(run.spec, run)  # the work the run did
    h100 = next(o for o in OFFERS if o.id == "h100x8-us")
    est = costing.estimate(h100)
    assert est.usd is not None
    api = sum(p.usd.value for p in est.phases if p.billed_on == "api")
    # the whole job's $ there, with the API teacher's $ as measured (0.42, any server)
    assert hw["cost_usd"] == pytest.approx(est.usd.value - api + 0.42)
    assert hw["train_time_s"] == pytest.approx(model.loop_estimate(costing.work, h100,
                                                                   None).value)
    assert hw["latency_ms"] == h100.latency_ms
    assert hw["accuracy"] == 0.38  # the same student, the same data
    assert hw["estimate"]["train_time_s"]["source"] == "prior"
    # every GPU the trainer's ranks use, at the cost model's scaling efficiency
    assert hw["hardware_tflops"] == pytest.approx(float(costing.columns([h100]).hardware[0]))
    assert 989.0 < hw["hardware_tflops"] < 8 * 989.0


def test_student_that_does_not_fit_makes_a_baseline_infeasible(plugins: Plugins) -> None:
    spec = make_spec(selector="hardware-first")
    results = full_results(plugins, spec)
    # the chosen student needs 60 GB: fits the H100 box, not the L4/4090/T4 picks
    results["select_student"]["candidates"][0]["est_train_mem_mib"] = 60000.0
    comp = compare_selectors(make_run(spec, results), plugins)
    rows = {r["selector"]: r for r in comp["rows"]}
    assert rows["hardware-first"]["feasible"] and rows["hardware-first"]["role"] == "stratos"
    small = [r for r in comp["rows"] if r["server"] in ("l4-eu", "4090-home", "t4-asia")]
    assert small and all(not r["feasible"] and r["score"] is None for r in small)
    assert all("student needs" in r["fit"] for r in small)


def test_weights_from_the_job_change_the_ranking(plugins: Plugins) -> None:
    spec = make_spec(selector="pfg")
    results = full_results(plugins, spec)
    fast = compare_selectors(make_run(msgspec.structs.replace(
        spec, score=ScoreWeights(accuracy=0, latency=0, train_time=1, cost=0)), results), plugins)
    cheap = compare_selectors(make_run(msgspec.structs.replace(
        spec, score=ScoreWeights(accuracy=0, latency=0, train_time=0, cost=1)), results), plugins)
    assert fast["score"]["weights"]["train_time"] == 1.0

    def top(comp: dict[str, Any]) -> str:
        return str(max(comp["rows"], key=lambda r: r["score"] or -1)["server"])

    feasible = [r for r in cheap["rows"] if r["score"] is not None]
    assert top(fast) == "h100x8-us"  # the fastest hardware trains fastest
    assert top(cheap) == min(feasible, key=lambda r: r["cost_usd"])["server"]
    assert top(cheap) != top(fast)
    for r in feasible:  # one weight: the score is that term alone
        assert r["score"] == pytest.approx(r["terms"]["cost"])


def test_zero_weights_fall_back_to_equal_and_say_so(plugins: Plugins) -> None:
    spec = make_spec(score={"accuracy": 0, "latency": 0, "train_time": 0, "cost": 0})
    comp = compare_selectors(make_run(spec, full_results(plugins, spec)), plugins)
    assert comp["score"]["weights"] == dict.fromkeys(METRICS, 1.0)
    assert any("equal weights" in n for n in comp["notes"])


def test_partial_run_writes_what_exists(plugins: Plugins, tmp_path: Path) -> None:
    spec = make_spec(deploy=False)
    full_res = full_results(plugins, spec)
    results = {k: full_res[k] for k in ("select_server", "probe_teachers", "select_student")}
    results["train"] = {"first_loss": 2.2, "final_loss": 0.9, "steps": 40}  # no history/time
    results["deploy"] = {"skipped": True}
    run = make_run(spec, results, state="failed",
                   error={"code": "job_failed", "message": "synthesis ran out of budget"})
    ret = write_report(run, plugins, tmp_path)
    md = (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["missing_stages"] == ["choose_strategy", "synthesize", "evaluate"]
    for stage in ("choose_strategy", "synthesize", "evaluate"):
        assert f"`{stage}` stage stored no result" in md
    assert "synthesis ran out of budget" in md and "Deployment skipped" in md
    assert ret["paths"]["plot_pareto"] and Path(ret["paths"]["plot_pareto"]).stat().st_size
    assert Path(ret["paths"]["plot_loss"]).stat().st_size > 0  # first/final only
    assert ret["paths"]["plot_accuracy"]  # the teacher probe alone
    # no accuracy measured: dropped; time and $ the run did not measure are estimates, said so
    comp = data["comparison"]
    assert comp["score"]["dropped"] == ["accuracy"]
    own = comp["rows"][0]
    assert own["basis"] == "measured" and "training time estimated" in own["provenance"]
    assert own["cost_phases_estimated"] == ["synthesis", "train", "evaluate"]  # no deploy
    assert ret["summary"]["accuracy_after"] is None
    assert ret["summary"]["target"] == "no target"
    assert ret["summary"]["teacher_accuracy"] == 0.14  # from the probe, without a strategy
    assert ret["summary"]["cost_usd"] == pytest.approx(
        sum(results[s]["cost"]["measured_usd"] for s in ("probe_teachers", "select_student")))


def test_empty_run_still_writes_a_report(plugins: Plugins, tmp_path: Path) -> None:
    run = make_run(make_spec(), {}, state="failed")
    ret = write_report(run, plugins, tmp_path)
    assert Path(ret["paths"]["markdown"]).is_file() and Path(ret["paths"]["json"]).is_file()
    assert set(ret["paths"]) == {"markdown", "json"}  # no data to plot: no plot paths
    msgspec.convert(ret["paths"], dict[str, str])  # ReportReply.paths
    md = (tmp_path / "report.md").read_text()
    assert "`select_server` stage stored no result" in md
    assert "Not computed" in md and "No stage stored a cost" in md


def test_measurements_follow_the_server_the_run_moved_to(plugins: Plugins) -> None:
    spec = make_spec()
    results = full_results(plugins, spec)
    run = make_run(spec, results, progress={"agent_id": "ag-l4", "excluded_agents": ["ag-a100"]})
    comp = compare_selectors(run, plugins)
    own = comp["rows"][0]
    assert comp["trained_on"] == own["server"] == "l4-eu" and own["measured"]
    assert own["train_time_s"] == results["train"]["train_time_s"]
    assert any("moved from a100-eu to l4-eu" in n for n in comp["notes"])
    # the server it left (and any other) is not measured: only l4-eu was
    others = [r for r in comp["rows"] if r["server"] and r["server"] != "l4-eu"]
    assert others and not any(r["basis"] == "measured" for r in others)


def test_fallback_server_plot(plugins: Plugins, tmp_path: Path) -> None:
    from schemas.specs import Constraints
    from stratosd.costmodel import JobCosting
    from stratosd.report_plots import plot_servers_simple

    selection = plugins.selectors.get("cost-first")().select(OFFERS, Constraints())
    for costing in (JobCosting.reference_hours(0.5), None):
        out = plot_servers_simple(OFFERS, selection, tmp_path / "p.png", costing=costing)
        assert out.read_bytes()[:4] == b"\x89PNG"
