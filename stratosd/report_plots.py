"""The report's plots (PNG): the fleet with its Pareto front, training loss, accuracy bars.

matplotlib is imported inside the functions only: the daemon starts without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from schemas.commands import RunInfo
from schemas.specs import Selection, ServerOffer
from schemas.stages import EvaluateResult, ProbeTeachersResult, SelectServerResult, TrainResult
from stratosd.results import stage_result
from stratosd.score import finite

if TYPE_CHECKING:
    from stratosd.costmodel.model import JobCosting

log = structlog.stdlib.get_logger(__name__)



def _figure(w: float = 7.0, h: float = 4.5) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_pareto(run: RunInfo, path: Path, costing: JobCosting | None = None) -> Path | None:
    """The fleet with the Pareto front and the pick (planning.plot_plan, else a simple scatter);
    costing: the job's, as the selectors saw it (select_server's stored work)."""
    sel = stage_result(run, SelectServerResult)
    if sel is None:
        return None
    selection = sel.selection
    offers = sel.offers or [selection.chosen]
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
    tr = stage_result(run, TrainResult)
    if tr is None:
        return None
    hist = [(float(p[0]), float(p[1])) for p in tr.loss_history
            if isinstance(p, list | tuple) and len(p) == 2 and finite(p[1]) is not None]
    first, final, steps = finite(tr.first_loss), finite(tr.final_loss), tr.steps
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
            xs.append(finite(steps) or 1.0)
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

    bars: list[dict[str, Any]] = []
    probe = stage_result(run, ProbeTeachersResult)
    for s in probe.scores if probe is not None else []:
        if s.name == probe.best:  # type: ignore[union-attr]
            lo, hi = wilson_interval(s.correct, s.n)
            bars.append({"label": f"teacher {s.name} (probe)", "accuracy": float(s.accuracy),
                         "ci_low": lo, "ci_high": hi, "n": s.n})
    ev = stage_result(run, EvaluateResult)
    for key, r in (() if ev is None else (("before", ev.before), ("after", ev.after))):
        bars.append({"label": f"student {key} training", "accuracy": r.accuracy,
                     "ci_low": finite(r.ci_low) if finite(r.ci_low) is not None else r.accuracy,
                     "ci_high": finite(r.ci_high) if finite(r.ci_high) is not None
                     else r.accuracy, "n": r.n})
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
