"""The run report: Markdown + JSON + PNG plots, with the multi-objective score and baselines.

`write_report` is the pipeline's last stage (run in a thread). It reads what the earlier stages
stored in `run.results` (see `stratosd/stages.py`); any stage may be missing or partial, and
the report then says what is missing instead of failing. matplotlib is imported inside the
plot functions only.

The score and the baselines on the same fleet come from `stratosd.score`, their time and $
from the core cost model (`stratosd.costmodel`): only the run's own server was measured, and
every other number says it is an estimate, with the model's interval and history. The
"Cost model" section sets each phase's estimate (made before it ran) against its measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from schemas.commands import RunInfo
from schemas.costs import Estimate
from schemas.specs import Selection, ServerOffer
from stratosd import score as mos
from stratosd.plugins import Plugins
from stratosd.score import RunCosting, compare_selectors, run_costing, stage_costs, sub_dict
from stratosd.score import as_offer as _offer
from stratosd.score import decode as _decode
from stratosd.score import finite as _num
from stratosd.score import stage_result as _res

if TYPE_CHECKING:
    from stratosd.costmodel.costs import CostModel
    from stratosd.costmodel.model import JobCosting

log = structlog.stdlib.get_logger(__name__)

STAGES = ("select_server", "probe_teachers", "select_student", "choose_strategy",
          "synthesize", "train", "evaluate", "deploy")


# --- plots ----------------------------------------------------------------------------------


def _figure(w: float = 7.0, h: float = 4.5) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_pareto(run: RunInfo, path: Path, costing: JobCosting | None = None) -> Path | None:
    """The fleet with the Pareto front and the pick (planning.plot_plan, else a simple scatter);
    costing: the job's, as the selectors saw it (select_server's stored work)."""
    sel = _res(run, "select_server")
    offers = [o for o in (_offer(x) for x in sel.get("offers", []) or []) if o is not None]
    try:
        selection = msgspec.convert(sel.get("selection"), Selection)
    except (msgspec.ValidationError, TypeError):
        return None
    offers = offers or [selection.chosen]
    try:
        from stratosd.planning import plot_plan

        return Path(plot_plan(offers, selection, path, costing=costing))
    except Exception:  # noqa: BLE001 - fall back to our own scatter, never lose the report
        log.warning("plot_plan_failed", run_id=run.run_id, exc_info=True)
    return plot_servers_simple(offers, selection, path, costing=costing)


def plot_servers_simple(
    offers: list[ServerOffer], selection: Selection, path: Path, *,
    costing: JobCosting | None = None,
) -> Path:
    """Fallback Pareto plot: the cost model's job $ (else $/h) vs latency, pick starred."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    front = set(selection.pareto_ids)
    pts = [*offers, selection.chosen]
    xs = ([float(x) for x in costing.columns(pts).total_usd] if costing is not None
          else [o.price_usd_per_hour for o in pts])
    for o, x in zip(offers, xs, strict=False):
        ax.scatter([x], [o.latency_ms], c="k" if o.id in front else "0.6", s=30)
    pick = selection.chosen
    ax.scatter([xs[-1]], [pick.latency_ms], marker="*", s=250, c="red", label=f"pick: {pick.id}")
    ax.set_xlabel("estimated job $ (cost model)" if costing is not None else "$/h")
    ax.set_ylabel("latency, ms")
    ax.set_title("Servers (black: Pareto-optimal)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_loss(run: RunInfo, path: Path) -> Path | None:
    """Training loss per step (loss_history), else first and final loss as two points."""
    tr = _res(run, "train")
    hist = [(float(p[0]), float(p[1])) for p in tr.get("loss_history", []) or []
            if isinstance(p, list | tuple) and len(p) == 2 and _num(p[1]) is not None]
    first, final, steps = _num(tr.get("first_loss")), _num(tr.get("final_loss")), tr.get("steps")
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if hist:
        ax.plot([h[0] for h in hist], [h[1] for h in hist], marker=".", label="training loss")
        ax.set_title("Training loss (loss_history)")
    elif first is not None or final is not None:
        xs, ys, labels = [], [], []
        if first is not None:
            xs, ys, labels = [0.0], [first], ["first loss"]
        if final is not None:
            xs.append(_num(steps) or 1.0)
            ys.append(final)
            labels.append("final loss")
        ax.plot(xs, ys, "o--", label="first / final loss only (no loss history)")
        for x, y, lab in zip(xs, ys, labels, strict=True):
            ax.annotate(f"{lab} {y:.3f}", (x, y), xytext=(5, 5), textcoords="offset points")
        ax.set_title("Training loss: first and final only")
    else:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def accuracy_bars(run: RunInfo) -> list[dict[str, Any]]:
    """(label, accuracy, 95% CI) of the teacher's probe and the student before/after."""
    from plugins.models.evaluate import wilson_interval

    bars = []
    best = _res(run, "probe_teachers").get("best")
    for s in _res(run, "probe_teachers").get("scores", []) or []:
        if isinstance(s, dict) and s.get("name") == best and _num(s.get("accuracy")) is not None:
            lo, hi = wilson_interval(int(s.get("correct", 0)), int(s.get("n", 0)))
            bars.append({"label": f"teacher {best} (probe)", "accuracy": float(s["accuracy"]),
                         "ci_low": lo, "ci_high": hi, "n": s.get("n")})
    ev = _res(run, "evaluate")
    for key in ("before", "after"):
        r = sub_dict(ev, key)
        acc = _num(r.get("accuracy"))
        if acc is not None:
            bars.append({"label": f"student {key} training", "accuracy": acc,
                         "ci_low": _num(r.get("ci_low")) if _num(r.get("ci_low")) is not None
                         else acc,
                         "ci_high": _num(r.get("ci_high")) if _num(r.get("ci_high")) is not None
                         else acc, "n": r.get("n")})
    return bars


def plot_accuracy(run: RunInfo, path: Path) -> Path | None:
    """Bars: teacher probe vs student before/after, with 95% CI error bars."""
    bars = accuracy_bars(run)
    if not bars:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    acc = [b["accuracy"] for b in bars]
    err = [[max(a - b["ci_low"], 0.0) for a, b in zip(acc, bars, strict=True)],
           [max(b["ci_high"] - a, 0.0) for a, b in zip(acc, bars, strict=True)]]
    colors = ["tab:orange" if b["label"].startswith("teacher") else "tab:blue" for b in bars]
    ax.bar(range(len(bars)), acc, yerr=err, capsize=6, color=colors)
    ax.set_xticks(range(len(bars)), [f"{b['label']}\n(n={b['n']})" for b in bars], fontsize=8)
    for i, a in enumerate(acc):
        ax.annotate(f"{a:.1%}", (i, a), xytext=(0, 4), textcoords="offset points", ha="center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_title("Teacher probe vs student, held-out test set")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


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
    sel = _res(run, "select_server")
    selection = sub_dict(sel, "selection")
    chosen = sub_dict(selection, "chosen")
    if not chosen:
        return out + _missing("select_server")
    gpu = (f"{chosen.get('gpu_count')}x {chosen.get('gpu_model')}" if chosen.get("gpu_count")
           else f"CPU only, {chosen.get('cpu_count')} cores")
    out += [f"Chosen server: **{chosen.get('id')}** (agent `{sel.get('agent_id')}`), {gpu}, "
            f"${_f(chosen.get('price_usd_per_hour'), '{:.2f}')}/h, network latency "
            f"{_f(chosen.get('latency_ms'), '{:.0f}')} ms, region {chosen.get('region') or '?'}; "
            f"selector `{selection.get('selector')}`, {len(selection.get('pareto_ids') or [])} "
            f"Pareto-optimal of {selection.get('candidates')} servers.", "",
            "Why (the selector's explanation):", "", "```",
            str(selection.get("explanation") or "(none)"), "```", ""]
    if plots.get("plot_pareto"):
        out += ["![Pareto front and pick](pareto.png)", ""]
    return out


def _md_teacher(run: RunInfo) -> list[str]:
    out = ["## Teacher", ""]
    probe = _res(run, "probe_teachers")
    scores = [s for s in probe.get("scores", []) or [] if isinstance(s, dict)]
    if not scores:
        return out + _missing("probe_teachers")
    out += [f"Best teacher on the probe: **{probe.get('best')}** (highest probe accuracy).", ""]
    out += _table(["teacher", "backend", "model", "probe accuracy", "correct/n", "cost $",
                   "latency ms", "error"],
                  [[s.get("name"), s.get("backend"), s.get("model"), _pct(s.get("accuracy")),
                    f"{s.get('correct')}/{s.get('n')}", _f(s.get("cost_usd"), "{:.4f}"),
                    _f(s.get("latency_ms_mean"), "{:.0f}"), s.get("error") or ""]
                   for s in scores])
    return out


def _md_student(run: RunInfo) -> list[str]:
    out = ["## Student", ""]
    stu = _res(run, "select_student")
    if not stu:
        return out + _missing("select_student")
    out += [f"Chosen student: **{stu.get('chosen')}**. Why: {stu.get('reason') or 'n/a'}", ""]
    cands = [c for c in stu.get("candidates", []) or [] if isinstance(c, dict)]
    out += _table(["student", "params (M)", "train MiB (est.)", "serve MiB (est.)", "fits",
                   "pre-screen acc.", "probe loss drop", "kept", "reason"],
                  [[c.get("model"), _f(c.get("params_m"), "{:.4g}"),
                    _f(c.get("est_train_mem_mib"), "{:.0f}"),
                    _f(c.get("est_serve_mem_mib"), "{:.0f}"), c.get("fits"),
                    _pct(c.get("prescreen_accuracy")), _f(c.get("probe_loss_drop")),
                    c.get("kept"), c.get("reason", "")] for c in cands])
    return out


def _md_strategy(run: RunInfo) -> list[str]:
    out = ["## Strategy", ""]
    st, syn = _res(run, "choose_strategy"), _res(run, "synthesize")
    if not st:
        out += _missing("choose_strategy")
    else:
        out += [f"Mode **{st.get('mode')}** with teacher {st.get('teacher')} (probe accuracy "
                f"{_pct(st.get('teacher_accuracy'))}, threshold {_pct(st.get('threshold'))}). "
                f"Why: {st.get('reason')}.", ""]
    if not syn:
        return out + _missing("synthesize")
    return out + [f"Synthesis: {syn.get('rows')} rows written, {syn.get('kept')} kept, "
                  f"{syn.get('dropped')} dropped; by mode {syn.get('by_mode')}, by teacher "
                  f"{syn.get('by_teacher')}; verified {syn.get('verified')}; "
                  f"{_f(syn.get('rows_per_s'))} rows/s; "
                  f"cost ${_f(syn.get('cost_usd'), '{:.4f}')}.",
                  ""]


def _md_training(run: RunInfo, plots: dict[str, Any]) -> list[str]:
    out = ["## Training", ""]
    tr = _res(run, "train")
    if not tr:
        return out + _missing("train")
    out += [f"Trainer `{tr.get('trainer')}`: {tr.get('steps')} steps, loss "
            f"{_f(tr.get('first_loss'), '{:.4f}')} → {_f(tr.get('final_loss'), '{:.4f}')}; "
            f"training time {_f(tr.get('train_time_s'), '{:.1f}')} s, "
            f"{_f(tr.get('tokens_per_s'), '{:.0f}')} tokens/s over {tr.get('train_tokens')} "
            f"tokens, peak RSS {_f(tr.get('peak_rss_mib'), '{:.0f}')} MiB"
            f"{'; resumed from a checkpoint' if tr.get('resumed') else ''}.", ""]
    if plots.get("plot_loss"):
        out += ["![Training loss](loss.png)", ""]
    return out


def _md_accuracy(run: RunInfo, plots: dict[str, Any]) -> list[str]:
    out = ["## Accuracy and latency", ""]
    ev = _res(run, "evaluate")
    if not ev:
        out += _missing("evaluate")
    else:
        b = sub_dict(ev, "before")
        a = sub_dict(ev, "after")
        t = _num(ev.get("teacher_probe_accuracy"))
        ratio = (f" ({a['accuracy'] / t:.2f}× the teacher)"
                 if t and _num(a.get("accuracy")) is not None else "")
        out += [f"Student accuracy on the held-out test set: {_pct(b.get('accuracy'))} "
                f"[95% CI {_pct(b.get('ci_low'))}–{_pct(b.get('ci_high'))}, n={b.get('n')}] → "
                f"**{_pct(a.get('accuracy'))}** [95% CI {_pct(a.get('ci_low'))}–"
                f"{_pct(a.get('ci_high'))}, n={a.get('n')}] after training; teacher probe "
                f"accuracy {_pct(t)}{ratio}.", ""]
        out += _table(["", "accuracy", "partial", "latency ms mean", "latency ms p95",
                       "tokens/s"],
                      [[k, _pct(r.get("accuracy")), _f(r.get("partial")),
                        _f(r.get("latency_ms_mean"), "{:.1f}"),
                        _f(r.get("latency_ms_p95"), "{:.1f}"), _f(r.get("tokens_per_s"), "{:.1f}")]
                       for k, r in (("before", b), ("after", a))])
    if plots.get("plot_accuracy"):
        out += ["![Accuracy](accuracy.png)", ""]
    return out


def _md_endpoint(run: RunInfo) -> list[str]:
    out = ["## Endpoint", ""]
    dep = _res(run, "deploy")
    if not dep:
        return out + _missing("deploy")
    if dep.get("skipped"):
        return out + [f"Deployment skipped{': ' + dep['reason'] if dep.get('reason') else ''}.",
                      ""]
    m = sub_dict(dep, "metrics")
    out += [f"URL: **{dep.get('url')}** (endpoint `{dep.get('endpoint_id')}`, model "
            f"`{dep.get('model')}`, deployer `{dep.get('deployer')}`, agent "
            f"`{dep.get('agent_id')}`).", ""]
    return out + [f"Measured serving: {serving_latency(m)}.", ""]


def serving_latency(m: dict[str, Any]) -> str:
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
    e = None if measured else _decode(est, Estimate)
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
    tr = _res(run, "train")
    loop = _decode(tr.get("train_time_estimate"), Estimate)
    if not costs and loop is None:
        out += ["_No stage stored a cost (estimate vs measurement)._", ""]
    else:
        out += ["Each phase's estimate was made on the run's server just before it ran (90% "
                "interval and source in brackets); measured = the stage's wall time. Error = "
                "measured / estimated − 1.", ""]
        rows = []
        for phase, c in costs.items():
            est = _decode(c.get("estimated_s"), Estimate)
            usd = _decode(c.get("estimated_usd"), Estimate)
            rows.append([phase, c.get("server") or "?",
                         est.describe() if est else "n/a", _f(c.get("measured_s"), "{:.1f}"),
                         _err(c.get("measured_s"), est), usd.describe("{:.4f}") if usd else "n/a",
                         _f(c.get("measured_usd"), "{:.4f}")])
        if loop is not None or _num(tr.get("train_time_s")) is not None:
            rows.append(["training loop (train_time_s)",
                         (costs.get("train") or {}).get("server") or "",
                         loop.describe() if loop else "n/a",
                         _f(tr.get("train_time_s"), "{:.1f}"),
                         _err(tr.get("train_time_s"), loop), "—", "—"])
        out += _table(["phase", "server", "estimated s", "measured s", "error",
                       "estimated $", "measured $"], rows)
    total, budget = summary.get("cost_usd"), run.spec.constraints.budget_usd
    job = _decode(sub_dict(_res(run, "select_server"), "estimate").get("usd"), Estimate)
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
    missing = [s for s in STAGES if not _res(run, s)]
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
    ev = _res(run, "evaluate")
    before = sub_dict(ev, "before")
    after = sub_dict(ev, "after")
    chosen = sub_dict(sub_dict(_res(run, "select_server"), "selection"), "chosen")
    teacher_acc = _num(ev.get("teacher_probe_accuracy"))
    if teacher_acc is None:
        teacher_acc = _num(_res(run, "choose_strategy").get("teacher_accuracy"))
    if teacher_acc is None:
        probe = _res(run, "probe_teachers")
        teacher_acc = next((_num(t.get("accuracy")) for t in probe.get("scores", []) or []
                            if isinstance(t, dict) and t.get("name") == probe.get("best")), None)
    measured = comparison.get("measured") or mos.measured_metrics(run)
    target = run.spec.constraints.target_accuracy
    acc_after = _num(after.get("accuracy"))
    words, met = quality_target(target, acc_after)
    return {
        "target_accuracy": target,
        "target": words,
        "target_met": met,
        "server": chosen.get("id"),
        "teacher": _res(run, "choose_strategy").get("teacher")
        or _res(run, "probe_teachers").get("best"),
        "student": _res(run, "select_student").get("chosen"),
        "mode": _res(run, "choose_strategy").get("mode"),
        "accuracy_before": _num(before.get("accuracy")),
        "accuracy_after": acc_after,
        "teacher_accuracy": teacher_acc,
        "train_time_s": _num(_res(run, "train").get("train_time_s")),
        "cost_usd": measured.get("total_usd"),
        "budget_usd": run.spec.constraints.budget_usd,
        "latency_ms": _num(sub_dict(_res(run, "deploy"), "metrics").get("latency_ms_p50")),
        "url": _res(run, "deploy").get("url"),
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
