"""The run report: Markdown + JSON + PNG plots, with the multi-objective score and baselines.

`write_report` is the pipeline's last stage (run in a thread). It reads what the earlier stages
stored in `run.results` (see `stratosd/stages.py`); any stage may be missing or partial, and
the report then says what is missing instead of failing. matplotlib is imported inside the
plot functions only.

The score (`stratosd.score`) and the baselines on the same fleet (`stratosd.comparison`), their
time and $ from the core cost model (`stratosd.costmodel`): only the run's own server was
measured, and
every other number says it is an estimate, with the model's interval and history. The
"Cost model" section sets each phase's estimate (made before it ran) against its measurement.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from schemas.commands import RunInfo
from schemas.costs import Estimate
from schemas.stages import (
    ChooseStrategyResult,
    DeployResult,
    EvaluateResult,
    ProbeTeachersResult,
    SelectServerResult,
    SelectStudentResult,
    SynthesizeResult,
    TrainResult,
)
from stratosd import score as mos
from stratosd.comparison import (
    RunCosting,
    compare_selectors,
    measured_metrics,
    run_costing,
    stage_costs,
)
from stratosd.plugins import Plugins
from stratosd.report_plots import accuracy_bars, plot_accuracy, plot_loss, plot_pareto
from stratosd.results import stage_result
from stratosd.score import finite as _num

if TYPE_CHECKING:
    from stratosd.costmodel.costs import CostModel

log = structlog.stdlib.get_logger(__name__)

STAGES = ("select_server", "probe_teachers", "select_student", "choose_strategy",
          "synthesize", "train", "evaluate", "deploy")


# --- Markdown -------------------------------------------------------------------------------


def _f(value: Any, fmt: str = "{:.3g}", none: str = "n/a") -> str:
    v = _num(value)
    return none if v is None else fmt.format(v)


def _pct(value: Any) -> str:
    return _f(value, "{:.1%}")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(x) for x in r) + " |" for r in rows), ""]


def _missing(stage: str) -> list[str]:
    return [f"_Missing: the `{stage}` stage stored no result._", ""]


def _md_server(run: RunInfo, plots: dict[str, Any]) -> list[str]:
    out = ["## Server", ""]
    sel = stage_result(run, SelectServerResult)
    if sel is None:
        return out + _missing("select_server")
    selection, chosen = sel.selection, sel.selection.chosen
    gpu = (f"{chosen.gpu_count}x {chosen.gpu_model}" if chosen.gpu_count
           else f"CPU only, {chosen.cpu_count} cores")
    latency = (f"{chosen.latency_ms:.0f} ms" if chosen.latency_known else "not measured")
    out += [f"Chosen server: **{chosen.id}** (agent `{sel.agent_id}`), {gpu}, "
            f"${chosen.price_usd_per_hour:.2f}/h, network latency {latency}, region "
            f"{chosen.region or '?'}; selector `{selection.selector}`, "
            f"{len(selection.pareto_ids)} Pareto-optimal of {selection.candidates} servers.", "",
            "Why (the selector's explanation):", "", "```",
            selection.explanation or "(none)", "```", ""]
    if plots.get("plot_pareto"):
        out += ["![Pareto front and pick](pareto.png)", ""]
    return out


def _md_teacher(run: RunInfo) -> list[str]:
    out = ["## Teacher", ""]
    probe = stage_result(run, ProbeTeachersResult)
    if probe is None or not probe.scores:
        return out + _missing("probe_teachers")
    out += [f"Best teacher on the probe: **{probe.best}** (highest probe accuracy).", ""]
    out += _table(["teacher", "backend", "model", "probe accuracy", "correct/n", "cost $",
                   "latency ms", "error"],
                  [[s.name, s.backend, s.model, _pct(s.accuracy), f"{s.correct}/{s.n}",
                    _f(s.cost_usd, "{:.4f}"), _f(s.latency_ms_mean, "{:.0f}"), s.error or ""]
                   for s in probe.scores])
    return out


def _md_student(run: RunInfo) -> list[str]:
    out = ["## Student", ""]
    stu = stage_result(run, SelectStudentResult)
    if stu is None:
        return out + _missing("select_student")
    out += [f"Chosen student: **{stu.chosen}**. Why: {stu.reason or 'n/a'}", ""]
    out += [f"Pre-screen prediction vs outcome: {prediction_vs_outcome(run)}.", ""]
    out += _table(["student", "params (M)", "train MiB (est.)", "serve MiB (est.)", "fits",
                   "pre-screen acc.", "probe loss drop", "estimate [95% CI]", "kept", "reason"],
                  [[c.model, _f(c.params_m, "{:.4g}"), _f(c.est_train_mem_mib, "{:.0f}"),
                    _f(c.est_serve_mem_mib, "{:.0f}"), c.fits, _pct(c.prescreen_accuracy),
                    _f(c.probe_loss_drop), _ci(c.estimate), c.kept, c.reason]
                   for c in stu.candidates])
    return out


def _ci(est: Any) -> str:
    if est is None:
        return "n/a"
    return f"{_pct(est.accuracy)} [{_pct(est.ci_low)}–{_pct(est.ci_high)}, n={est.n}]"


def prediction_vs_outcome(run: RunInfo) -> str:
    """The pre-screen's estimate for the chosen student next to its accuracy after training."""
    stu = stage_result(run, SelectStudentResult)
    ev = stage_result(run, EvaluateResult)
    chosen = None if stu is None else next(
        (c for c in stu.candidates if c.model == stu.chosen), None)
    pred = None if stu is None else stu.prediction or (chosen.estimate if chosen else None)
    if pred is not None:
        said = f"predicted {_ci(pred)} ({pred.basis or 'pre-screen'})"
    elif chosen is not None and chosen.prescreen_accuracy is not None:
        said = f"predicted {_pct(chosen.prescreen_accuracy)} (few-shot, no interval recorded)"
    else:
        return "n/a (no pre-screen estimate)"
    if ev is None:
        return f"{said}; not evaluated yet"
    a = ev.after
    got = f"{said}; measured after training {_ci(a)} on the {a.split or 'test'} set"
    if pred is None:
        return got
    where = ("within the predicted interval: the prediction held" if
             pred.ci_low <= a.accuracy <= pred.ci_high else
             "above the predicted interval: training did better than the pre-screen predicted"
             if a.accuracy > pred.ci_high else
             "below the predicted interval: the pre-screen over-predicted")
    return f"{got}: {where}"


def _md_strategy(run: RunInfo) -> list[str]:
    out = ["## Strategy", ""]
    st = stage_result(run, ChooseStrategyResult)
    syn = stage_result(run, SynthesizeResult)
    if st is None:
        out += _missing("choose_strategy")
    else:
        out += [f"Mode **{st.mode}** with teacher {st.teacher} (probe accuracy "
                f"{_pct(st.teacher_accuracy)}, threshold {_pct(st.threshold)}). "
                f"Why: {st.reason}.", ""]
    if syn is None:
        return out + _missing("synthesize")
    out += [f"Synthesis: {syn.rows} rows written, {syn.kept} kept, {syn.dropped} "
            f"dropped; by mode {syn.by_mode}, by teacher {syn.by_teacher}; verified "
            f"{syn.verified}; cost ${_f(syn.cost_usd, '{:.4f}')}.", ""]
    if syn.by_teacher.get("reference"):
        out += [f"{syn.by_teacher['reference']} of the {syn.kept} kept rows carry reasoning "
                "written by the task's own reference reasoner, not by a model: the teacher's "
                "tries all failed the check, as they do on a CPU, where no local model can "
                "write this reasoning.", ""]
    return out


def _md_training(run: RunInfo, plots: dict[str, Any]) -> list[str]:
    out = ["## Training", ""]
    tr = stage_result(run, TrainResult)
    if tr is None:
        return out + _missing("train")
    out += [f"Trainer `{tr.trainer}`: {tr.steps} steps, loss "
            f"{_f(tr.first_loss, '{:.4f}')} → {_f(tr.final_loss, '{:.4f}')}; "
            f"training time {_f(tr.train_time_s, '{:.1f}')} s, "
            f"{_f(tr.tokens_per_s, '{:.0f}')} tokens/s over {tr.train_tokens} "
            f"tokens, peak RSS {_f(tr.peak_rss_mib, '{:.0f}')} MiB"
            f"{'; resumed from a checkpoint' if tr.resumed else ''}.", ""]
    if tr.degradations:
        out += ["Degraded to fit memory: " + "; ".join(tr.degradations) + ".", ""]
    if plots.get("plot_loss"):
        out += ["![Training loss](loss.png)", ""]
    return out


def _md_accuracy(run: RunInfo, plots: dict[str, Any]) -> list[str]:
    out = ["## Accuracy and latency", ""]
    ev = stage_result(run, EvaluateResult)
    if ev is None:
        out += _missing("evaluate")
    else:
        b, a = ev.before, ev.after
        t = _num(ev.teacher_probe_accuracy)
        ratio = f" ({a.accuracy / t:.2f}× the teacher)" if t else ""
        out += [f"Student accuracy on the held-out test set: {_pct(b.accuracy)} "
                f"[95% CI {_pct(b.ci_low)}–{_pct(b.ci_high)}, n={b.n}] → "
                f"**{_pct(a.accuracy)}** [95% CI {_pct(a.ci_low)}–{_pct(a.ci_high)}, n={a.n}] "
                f"after training; teacher probe accuracy {_pct(t)}{ratio}.", ""]
        out += _table(["", "accuracy", "partial", "latency ms mean", "latency ms p95",
                       "tokens/s"],
                      [[k, _pct(r.accuracy), _f(r.partial), _f(r.latency_ms_mean, "{:.1f}"),
                        _f(r.latency_ms_p95, "{:.1f}"), _f(r.tokens_per_s, "{:.1f}")]
                       for k, r in (("before", b), ("after", a))])
    if plots.get("plot_accuracy"):
        out += ["![Accuracy](accuracy.png)", ""]
    return out


def _md_endpoint(run: RunInfo) -> list[str]:
    out = ["## Endpoint", ""]
    dep = stage_result(run, DeployResult)
    if dep is None:
        return out + _missing("deploy")
    if dep.skipped:
        return out + [f"Deployment skipped{': ' + dep.reason if dep.reason else ''}.", ""]
    out += [f"URL: **{dep.url}** (endpoint `{dep.endpoint_id}`, model `{dep.model}`, "
            f"deployer `{dep.deployer}`, agent `{dep.agent_id}`).", ""]
    return out + [f"Measured serving: {serving_latency(dep.metrics)}.", ""]


def serving_latency(m: Mapping[str, Any]) -> str:
    """The deploy probe's latency in words; missing numbers are n/a, never 0."""
    requests, errors = _num(m.get("requests")), _num(m.get("errors"))
    counts = (f"{errors:.0f} failed of {requests:.0f} probe requests"
              if requests is not None and errors is not None else "")
    if _num(m.get("latency_ms_p50")) is None:
        why = ("every probe request failed" if requests and errors is not None
               and errors >= requests else "not measured")
        return f"latency n/a ({why})" + (f"; {counts}" if counts else "")
    parts = [f"p50 {_f(m.get('latency_ms_p50'), '{:.1f}')} ms, p95 "
             f"{_f(m.get('latency_ms_p95'), '{:.1f}')} ms per request"]
    if _num(m.get("ttft_ms_p50")) is not None:
        parts.append(f"TTFT p50 {_f(m.get('ttft_ms_p50'), '{:.1f}')} ms")
    if _num(m.get("tpot_ms_p50")) is not None:
        parts.append(f"TPOT p50 {_f(m.get('tpot_ms_p50'), '{:.1f}')} ms")
    parts.append(f"{_f(m.get('tokens_per_s'), '{:.1f}')} tokens/s")
    return ", ".join(parts) + (f"; {counts}" if counts else "")


def _est_cell(value: Any, est: Any, fmt: str, measured: bool) -> str:
    """A value, with the estimate's interval when it is an estimate."""
    e = None if measured or est is None else msgspec.convert(est, Estimate)
    text = _f(value, fmt)
    if e is None or _num(value) is None:
        return text
    return f"{text} ({fmt.format(e.low)}–{fmt.format(e.high)})"


def _md_score(comparison: dict[str, Any]) -> list[str]:
    out = ["## Multi-objective score and baselines on the same fleet", ""]
    if not comparison.get("available"):
        return out + [f"_Not computed: {comparison.get('reason')}._", ""]
    sc = comparison["score"]
    w = sc["weights"]
    out += ["Formula (PAPER.md): each metric min-max normalised over the feasible candidates "
            "below (1 = best), then a weighted sum divided by the sum of weights:", "",
            "```", sc["formula"], "```", "",
            "Weights: " + ", ".join(f"{m} = {w[m]:g}" for m in mos.METRICS) + ". Ranges: "
            + ("; ".join(f"{m} {r['min']:.6g} … {r['max']:.6g}" for m, r in sc["ranges"].items())
               or "none") + ".", ""]
    if sc["degenerate"]:
        out += [f"Degenerate metrics (all candidates equal, term = 1 for all): "
                f"{', '.join(sc['degenerate'])}.", ""]
    if sc["dropped"]:
        out += [f"Left out of the score (no value for some candidate): "
                f"{', '.join(sc['dropped'])}.", ""]
    rows = comparison["rows"]
    out += _table(
        ["selector", "server", "TFLOP/s", "$/h", "accuracy", "network latency ms", "train s",
         "job $", *(f"n_{m}" for m in mos.METRICS), "score", "numbers"],
        [[f"**{r['selector']} (Stratos)**" if r["role"] == "stratos" else r["selector"],
          r.get("server") or "—", _f(r.get("hardware_tflops"), "{:.3g}"),
          _f(r.get("price_usd_per_hour"), "{:.2f}"), _pct(r.get("accuracy")),
          _f(r.get("latency_ms"), "{:.1f}"),
          _est_cell(r.get("train_time_s"), (r.get("estimate") or {}).get("train_time_s"),
                    "{:.3g}", bool(r.get("measured"))),
          _est_cell(r.get("cost_usd"), (r.get("estimate") or {}).get("cost_usd"), "{:.3g}",
                    bool(r.get("measured"))),
          *(_f((r.get("terms") or {}).get(m), "{:.3f}", "—") for m in mos.METRICS),
          _f(r.get("score"), "{:.3f}", "infeasible"),
          r.get("provenance", "") + ("" if r.get("feasible") else f"; {r.get('fit', '')}")]
         for r in rows])
    imp = comparison.get("improvement_pct")
    mine = _f(comparison["stratos_score"], "{:.3f}")
    if comparison.get("agreement"):
        out += [f"**{str(comparison['agreement']).capitalize()}.** Improvement over the best "
                "baseline: n/a: all selectors agree.", ""]
    else:
        out += [f"Stratos ({comparison['selector']}) score **{mine}**; best baseline "
                f"{comparison.get('best_baseline')} "
                f"{_f(comparison.get('best_baseline_score'), '{:.3f}')}; improvement "
                f"**{_f(imp, '{:+.1f}%')}**"
                + (" (n/a: no feasible baseline, or its score is 0)" if imp is None else "")
                + (f" ({comparison.get('best_baseline')} picked the same server)"
                   if imp is not None and any(r["selector"] == comparison.get("best_baseline")
                                              and r.get("server") == comparison["trained_on"]
                                              for r in rows) else "")
                + ".", ""]
    cm = comparison.get("cost_model") or {}
    out += [f"Only {comparison['trained_on']} was measured (a server the model sees exactly "
            "like it takes its measurements at its own $/h: 'same class'). Other servers' "
            "training time and $ are the cost model's estimates for the same work (student "
            f"{cm.get('work_student') or 'unknown'}), with their 90% interval in brackets and "
            "the model's history in the last column; "
            + ("the daemon's learned efficiencies include this run's measured phases."
               if cm.get("learned") else "no learned efficiencies were passed: priors only.")
            + " Latency is each server's network latency as the selectors see it; the run's "
            "serving latency is in the Endpoint section.", "",
            comparison.get("accuracy_note", ""), ""]
    out += [f"- {n}" for n in comparison.get("notes", [])]
    return out + ([""] if comparison.get("notes") else [])


def _md_costmodel(run: RunInfo, summary: dict[str, Any]) -> list[str]:
    out = ["## Cost model: estimated vs measured", ""]
    costs = stage_costs(run)
    tr = stage_result(run, TrainResult)
    loop = None if tr is None else tr.train_time_estimate
    train_s = None if tr is None else tr.train_time_s
    if not costs and loop is None:
        out += ["_No stage stored a cost (estimate vs measurement)._", ""]
    else:
        out += ["Each phase's estimate was made on the run's server just before it ran (90% "
                "interval and source in brackets); measured = the stage's wall time. Error = "
                "measured / estimated − 1.", ""]
        rows = []
        for phase, c in costs.items():
            est, usd = c.estimated_s, c.estimated_usd
            rows.append([phase, c.server or "?",
                         est.describe() if est else "n/a", _f(c.measured_s, "{:.1f}"),
                         _err(c.measured_s, est), usd.describe("{:.4f}") if usd else "n/a",
                         _f(c.measured_usd, "{:.4f}")])
        if loop is not None or _num(train_s) is not None:
            train_cost = costs.get("train")
            rows.append(["training loop (train_time_s)",
                         train_cost.server if train_cost is not None else "",
                         loop.describe() if loop else "n/a", _f(train_s, "{:.1f}"),
                         _err(train_s, loop), "—", "—"])
        out += _table(["phase", "server", "estimated s", "measured s", "error",
                       "estimated $", "measured $"], rows)
    total, budget = summary.get("cost_usd"), run.spec.constraints.budget_usd
    sel = stage_result(run, SelectServerResult)
    job = None if sel is None or sel.estimate is None else sel.estimate.usd
    out += [f"Total $ (measured): **{_f(total, '${:.4f}')}** "
            + (f"of budget ${budget:.2f} ({total / budget:.0%})" if budget and total is not None
               else f"(budget ${budget:.2f})" if budget is not None else "(no budget set)")
            + (f"; estimated at server selection: {job.describe('{:.4f}')}" if job else "")
            + ".", ""]
    return out


def _err(measured: Any, est: Estimate | None) -> str:
    m = _num(measured)
    if m is None or est is None or est.value <= 0:
        return "n/a"
    return f"{(m / est.value - 1.0) * 100:+.0f}%"


def render_markdown(run: RunInfo, data: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    s, plots = data["summary"], data["plots"]
    # the report is the last stage: every other stage has finished when it is written
    state = "completed" if run.stage == "report" and run.state == "running" else run.state
    out = [f"# Stratos run report: {run.name}", "",
           f"Run `{run.run_id}`, state **{state}** (stage {run.stage}), created "
           f"{run.created:%Y-%m-%d %H:%M:%S} UTC, updated {run.updated:%Y-%m-%d %H:%M:%S} UTC.",
           ""]
    if run.error:
        out += [f"Error: {run.error.get('message', run.error)}", ""]
    if data["missing_stages"]:
        out += [f"Missing stage results: {', '.join(data['missing_stages'])}.", ""]
    target = ("no target" if s["target"] == "no target"
              else f"{_pct(s['target_accuracy'])}: {s['target']}")
    improvement = ("n/a: all selectors agree" if s["all_selectors_agree"]
                   else _f(s["improvement_pct"], "{:+.1f}%"))
    out += ["## Summary", ""]
    out += _table(["", "value"], [
        ["server", s["server"] or "n/a"], ["teacher", s["teacher"] or "n/a"],
        ["student", s["student"] or "n/a"], ["strategy", s["mode"] or "n/a"],
        ["accuracy before → after", f"{_pct(s['accuracy_before'])} → {_pct(s['accuracy_after'])}"],
        ["pre-screen prediction → outcome", prediction_vs_outcome(run)],
        ["quality target (constraints.target_accuracy)", target],
        ["teacher probe accuracy", _pct(s["teacher_accuracy"])],
        ["serving latency p50 ms (measured)", _f(s["latency_ms"], "{:.1f}")],
        ["training time s (measured)", _f(s["train_time_s"], "{:.1f}")],
        ["cost $ (measured, every phase)", _f(s["cost_usd"], "{:.4f}")],
        ["budget $", _f(s["budget_usd"], "{:.2f}", "none")],
        ["multi-objective score", _f(s["score"], "{:.3f}")],
        ["improvement over best baseline", improvement],
        ["endpoint", s["url"] or "n/a"],
    ])
    out += _md_server(run, plots) + _md_teacher(run) + _md_student(run) + _md_strategy(run)
    out += _md_training(run, plots) + _md_accuracy(run, plots) + _md_costmodel(run, s)
    out += _md_score(data["comparison"]) + _md_endpoint(run)
    out += ["## What is estimated vs measured", ""]
    for kind, items in data["estimated_vs_measured"].items():
        out += [f"**{kind.capitalize()}:**", "", *(f"- {i}" for i in items), ""]
    return "\n".join(out)


# --- entry point -----------------------------------------------------------------------------


def write_report(run: RunInfo, plugins: Plugins, out_dir: Path,
                 costs: CostModel | None = None) -> dict[str, Any]:
    """Write report.md, report.json and the plots into out_dir; return a small summary.

    costs: the daemon's cost model (its learned efficiencies); without it the baselines'
    estimates are the model's priors, and the report says so."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [s for s in STAGES if s not in run.results]
    rc: RunCosting | None = None
    try:
        rc = run_costing(run, plugins, costs)
        comparison = compare_selectors(run, plugins, costs, rc=rc)
    except Exception as exc:  # noqa: BLE001 - the report must still be written
        log.warning("report_comparison_failed", run_id=run.run_id, exc_info=True)
        comparison = {"available": False, "reason": f"comparison failed: {exc!r}"}
    costing = rc.select if rc is not None else None
    plots: dict[str, str | None] = {}
    for key, fn, name in (("plot_pareto", lambda r, p: plot_pareto(r, p, costing), "pareto.png"),
                          ("plot_loss", plot_loss, "loss.png"),
                          ("plot_accuracy", plot_accuracy, "accuracy.png")):
        try:
            got = fn(run, out_dir / name)
        except Exception:  # noqa: BLE001 - one broken plot must not lose the report
            log.warning("report_plot_failed", run_id=run.run_id, plot=key, exc_info=True)
            got = None
        plots[key] = str(got) if got is not None else None
    summary = headline(run, comparison)
    data = {
        "run_id": run.run_id, "name": run.name, "state": run.state, "stage": run.stage,
        "spec": msgspec.to_builtins(run.spec), "results": run.results,
        "missing_stages": missing, "summary": summary, "comparison": comparison,
        "accuracy_bars": _safe(accuracy_bars, run), "plots": plots,
        "estimated_vs_measured": ESTIMATED_VS_MEASURED,
    }
    md_path, json_path = out_dir / "report.md", out_dir / "report.json"
    try:
        md = render_markdown(run, data)
    except Exception as exc:  # noqa: BLE001 - odd stage data must not lose the JSON report
        log.warning("report_markdown_failed", run_id=run.run_id, exc_info=True)
        md = (f"# Stratos run report: {run.name}\n\nThe Markdown report could not be rendered "
              f"({exc!r}); everything is in report.json beside this file.\n")
    md_path.write_text(md, encoding="utf-8")
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=2))
    log.info("report_written", run_id=run.run_id, path=str(md_path),
             score=comparison.get("stratos_score"))
    return {
        # ReportReply.paths is dict[str, str]: a plot that could not be drawn is left out
        "paths": {"markdown": str(md_path), "json": str(json_path),
                  **{k: v for k, v in plots.items() if v is not None}},
        "score": comparison.get("stratos_score"),
        "improvement_pct": comparison.get("improvement_pct"),
        "summary": summary,
    }


def _safe(fn: Any, run: RunInfo) -> Any:
    try:
        return fn(run)
    except Exception:  # noqa: BLE001 - optional section
        log.warning("report_section_failed", run_id=run.run_id, exc_info=True)
        return None


def quality_target(target: float, accuracy: float | None) -> tuple[str, bool | None]:
    """('no target' | 'met' | 'NOT met' | 'n/a (not evaluated)', target_met)."""
    if target <= 0:
        return "no target", None
    if accuracy is None:
        return "n/a (not evaluated)", None
    met = accuracy >= target
    return ("met" if met else "NOT met"), met


def headline(run: RunInfo, comparison: dict[str, Any]) -> dict[str, Any]:
    """The few numbers worth keeping in the run's KV entry."""
    ev = stage_result(run, EvaluateResult)
    sel = stage_result(run, SelectServerResult)
    st = stage_result(run, ChooseStrategyResult)
    probe = stage_result(run, ProbeTeachersResult)
    dep = stage_result(run, DeployResult)
    tr = stage_result(run, TrainResult)
    stu = stage_result(run, SelectStudentResult)
    teacher_acc = None if ev is None else _num(ev.teacher_probe_accuracy)
    if teacher_acc is None and st is not None:
        teacher_acc = _num(st.teacher_accuracy)
    if teacher_acc is None and probe is not None:
        teacher_acc = next((t.accuracy for t in probe.scores if t.name == probe.best), None)
    measured = comparison.get("measured") or measured_metrics(run)
    target = run.spec.constraints.target_accuracy
    acc_after = None if ev is None else _num(ev.after.accuracy)
    words, met = quality_target(target, acc_after)
    pred = None if stu is None else stu.prediction
    return {
        "target_accuracy": target,
        "target": words,
        "target_met": met,
        "server": None if sel is None else sel.selection.chosen.id,
        "teacher": st.teacher if st is not None else probe.best if probe is not None else None,
        "student": None if stu is None else stu.chosen,
        "mode": None if st is None else st.mode,
        "accuracy_before": None if ev is None else _num(ev.before.accuracy),
        "accuracy_after": acc_after,
        "prescreen_predicted": None if pred is None else _num(pred.accuracy),
        "prescreen_interval": None if pred is None else [_num(pred.ci_low), _num(pred.ci_high)],
        "teacher_accuracy": teacher_acc,
        "train_time_s": None if tr is None else _num(tr.train_time_s),
        "cost_usd": measured.get("total_usd"),
        "budget_usd": run.spec.constraints.budget_usd,
        "latency_ms": None if dep is None else _num(dep.metrics.get("latency_ms_p50")),
        "url": None if dep is None or dep.skipped else dep.url,
        "score": comparison.get("stratos_score"),
        "best_baseline": comparison.get("best_baseline"),
        "best_baseline_score": comparison.get("best_baseline_score"),
        "improvement_pct": comparison.get("improvement_pct"),
        "all_selectors_agree": bool(comparison.get("all_agree")),
    }


ESTIMATED_VS_MEASURED: dict[str, list[str]] = {
    "measured": [
        "the run's own server: each phase's wall time and $ (its stage's `cost`, API $ "
        "included), the training loop (train_time_s), student accuracy before and after "
        "training (evaluate), serving latency (deploy probe: p50/p95, TTFT, TPOT; n/a when "
        "every request failed), teacher probe accuracy",
        "every server's network latency (offer.latency_ms, by its agent): the score's latency",
    ],
    "estimated": [
        "each phase, before it ran: the cost model's estimate with its 90% interval and source "
        "(prior, or calibrated from N past runs), set against the measurement above",
        "other servers: training time and the whole job's $ from the same cost model for the "
        "work this run did (API $ as measured); a server the model sees exactly like the run's "
        "takes the run's measurements at its own $/h ('same class')",
        "not estimated: accuracy elsewhere (the same student on the same data reaches the same "
        "accuracy wherever it fits; where it does not fit the server is infeasible) and serving "
        "latency elsewhere (the cost model has none: it stays out of the cross-server score)",
        "the Pareto plot: the cost model's estimates at server selection",
    ],
}
