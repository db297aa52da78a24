"""Server plans for `stratosctl plan`: a table of the Pareto candidates, and a plot.

Nothing heavy at import time: numpy comes with the selector objectives (imported inside the
functions, so the CLI pays for them only when it plans) and matplotlib only inside plot_plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.costs import Estimate, JobEstimate, JobWork
from schemas.specs import Constraints, Selection, ServerOffer

if TYPE_CHECKING:
    from stratosd.costmodel import JobCosting

_PLOT_MAX_POINTS = 20_000  # a denser scatter adds nothing but seconds

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (row key, header, format)
    ("id", "server", "{}"),
    ("kind", "kind", "{}"),
    ("gpu", "hardware", "{}"),
    ("capacity", "speed", "{}"),
    ("price_usd_per_hour", "$/h", "{:.2f}"),
    ("est_s", "est time", "{}"),
    ("est_job_usd", "job $", "{:.4g}"),
    ("interval", "90% interval", "{}"),
    ("latency", "latency ms", "{}"),
    ("hardware_score", "TFLOP/s", "{:.3g}"),
    ("pareto", "pareto", "{}"),
    ("chosen", "chosen", "{}"),
)


def _gpu_label(o: ServerOffer) -> str:
    if o.gpu_count == 0:
        return f"CPU {o.cpu_count} cores"
    from plugins.selectors.objectives import gpu_spec

    name = gpu_spec(o.gpu_model)[0] or o.gpu_model or "GPU"
    mem = f" {o.gpu_mem_mib / 1024:.0f}G" if o.gpu_mem_mib else ""
    return f"{o.gpu_count}x {name}{mem}"


def duration(seconds: float) -> str:
    """'42 s', '12.5 min', '3.2 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def error_words(est: Estimate) -> str:
    """'±37% (prior, no history)' or '±12% from 4 runs' for an estimate's interval."""
    pct = (est.high / est.value - 1.0) * 100.0 if est.value > 0 else 0.0
    if est.source == "calibrated":
        return f"±{pct:.0f}% from {est.n} runs"
    if est.source == "given":
        return "given by the job"
    return f"±{pct:.0f}% ({est.source}, no history)"


def plan_rows(
    selection: Selection,
    offers: Sequence[ServerOffer],
    constraints: Constraints,
    costing: JobCosting,
) -> list[dict[str, Any]]:
    """One row per Pareto-optimal candidate plus the pick, cheapest job first."""
    wanted = set(selection.pareto_ids) | {selection.chosen.id}
    import numpy as np

    from stratosd.offers import OfferTable

    table = OfferTable.from_offers(offers)
    hits = np.flatnonzero(np.isin(table.ids, list(wanted)))
    picked = {table[int(i)].id: table[int(i)] for i in hits}
    picked.setdefault(selection.chosen.id, selection.chosen)
    chosen_rows = list(picked.values())
    cols = costing.columns(chosen_rows)
    pareto = set(selection.pareto_ids)
    rows: list[dict[str, Any]] = []
    for i, o in enumerate(chosen_rows):
        est = costing.estimate(o)
        usd = est.usd
        if usd is None:  # JobCosting.estimate always prices the job; None is a model bug
            raise TypeError(f"cost model gave no $ estimate for {o.id}")
        row: dict[str, Any] = {
            "id": o.id,
            "kind": (f"group of {len(o.members)} agents" if len(o.members) > 1
                     else "agent" if o.agent_id else "catalog (no agent)"),
            "gpu": _gpu_label(o),
            "region": o.region,
            "capacity": est.capacity_source,
            "price_usd_per_hour": o.price_usd_per_hour,
            "est_hours": float(cols.seconds[i]) / 3600.0,
            "est_s": duration(float(cols.seconds[i])),
            "est_job_usd": float(cols.total_usd[i]),
            "est_job_usd_low": usd.low,
            "est_job_usd_high": usd.high,
            "interval": f"${usd.low:.3g}-{usd.high:.3g} ({error_words(usd)})",
            "latency_ms": o.latency_ms if o.latency_known else None,
            "latency": f"{o.latency_ms:.0f}" if o.latency_known else "unknown",
            "hardware_score": float(cols.hardware[i]),
            "pareto": o.id in pareto,
            "chosen": o.id == selection.chosen.id,
        }
        if constraints.budget_usd is not None:
            row["budget_left_usd"] = constraints.budget_usd - float(cols.total_usd[i])
        rows.append(row)
    rows.sort(key=lambda r: (r["est_job_usd"], r["id"]))
    return rows


def plan_notes(selection: Selection, live: Sequence[ServerOffer],
               offers: Sequence[ServerOffer], *, catalog: bool,
               groups: Sequence[ServerOffer] = ()) -> list[str]:
    """What the plan's reader must know: what submit would use, which picks have no agent,
    which groups of live agents the planner proposed (stratosd.groupplan)."""
    notes = [f"planned over {len(live)} live agent(s), what `submit` would use"
             + (f", plus {len(offers) - len(live)} catalog offer(s) one could rent" if catalog
                else "; add --catalog to include offers one could rent")]
    if not selection.chosen.agent_id:
        notes.append(f"the pick {selection.chosen.id} is a catalog offer that no agent serves "
                     "yet: submit cannot use it until you start stratos-agent there")
    if groups:
        notes.append(f"{len(groups)} group(s) of live agents were candidates too: "
                     + ", ".join(g.id for g in groups[:5]) + (" ..." if len(groups) > 5 else ""))
    agents = {o.id for o in live} | {g.id for g in groups}
    no_agent = [i for i in selection.pareto_ids if i not in agents]
    if catalog and no_agent:
        notes.append(f"{len(no_agent)} Pareto-optimal offer(s) have no agent yet: "
                     + ", ".join(no_agent[:5]) + (" ..." if len(no_agent) > 5 else ""))
    return notes


def format_work(work: JobWork) -> list[str]:
    """The job's work, with where each input came from."""
    lines = [f"work (from the job): {work.train_tokens:.3g} training tokens, {work.train_steps}"
             f" steps, student {work.student} ({work.params / 1e6:.3g}M params, "
             f"{work.trainer}), {work.synth_rows} synthesis generations by {work.teacher}"
             f"{'' if work.teacher_local else ' (API)'}, {work.eval_prompts} evaluation prompts"]
    lines += [f"  {k}: {v}" for k, v in work.notes.items()]
    return lines


def format_estimate(est: JobEstimate) -> list[str]:
    """Each phase of the job on the pick: time and $, with its interval and source."""
    lines = [f"estimate on {est.server} (speed {est.capacity_source}):"]
    for p in est.phases:
        lines.append(f"  {p.phase:<14} {duration(p.seconds.value):>9}  ${p.usd.value:.4g}  "
                     f"{error_words(p.seconds)}  [{p.basis}]")
    if est.seconds is not None and est.usd is not None:
        lines.append(f"  {'total':<14} {duration(est.seconds.value):>9}  ${est.usd.value:.4g}"
                     f"  (${est.usd.low:.3g}-{est.usd.high:.3g}, {error_words(est.usd)})")
    return lines


def format_plan(selection: Selection, rows: Sequence[dict[str, Any]],
                work: JobWork | None = None, estimate: JobEstimate | None = None,
                notes: Sequence[str] = ()) -> str:
    """An aligned text table (the pick marked with *), the explanation, the work, the estimate
    phase by phase, and notes."""

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key, "")
        if isinstance(value, bool):
            return "yes" if value else ""
        if value is None:
            return "-"
        return fmt.format(value)

    table = [[h for _k, h, _f in COLUMNS]]
    table += [[cell(r, k, f) for k, _h, f in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    numeric = {"price_usd_per_hour", "est_s", "est_job_usd", "latency", "hardware_score"}
    out = []
    for n, line in enumerate(table):
        mark = "*" if n and rows[n - 1].get("chosen") else " "
        cells = [
            text.rjust(w) if key in numeric else text.ljust(w)
            for (key, _h, _f), text, w in zip(COLUMNS, line, widths, strict=True)
        ]
        out.append(f"{mark} " + "  ".join(cells).rstrip())
    header = (f"selector {selection.selector}: {selection.chosen.id} "
              f"({len(selection.pareto_ids)} Pareto-optimal of {selection.candidates} servers)")
    parts = [header, "", *out, "", selection.explanation]
    if work is not None:
        parts += ["", *format_work(work)]
    if estimate is not None:
        parts += ["", *format_estimate(estimate)]
    if notes:
        parts += ["", *(f"note: {n}" for n in notes)]
    return "\n".join(parts)


def plot_plan(
    offers: Sequence[ServerOffer],
    selection: Selection,
    path: str | Path,
    *,
    costing: JobCosting | None = None,
) -> Path:
    """PNG scatter: job cost vs latency, coloured by hardware score; front and pick marked."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    from plugins.selectors.objectives import default_costing

    costing = default_costing(costing, None)
    pts = list(offers)
    if len(pts) > _PLOT_MAX_POINTS:
        keep = set(selection.pareto_ids) | {selection.chosen.id}
        rng = np.random.default_rng(0)
        sample = rng.choice(len(pts), _PLOT_MAX_POINTS, replace=False)
        pts = [pts[i] for i in sorted(sample)] + [o for o in pts if o.id in keep]
    if not any(o.id == selection.chosen.id for o in pts):
        pts.append(selection.chosen)
    ids = [o.id for o in pts]
    cols = costing.columns(pts)
    h = cols.hardware
    cost = cols.total_usd
    lat = np.array([o.latency_ms for o in pts], dtype=float)
    removed = {i for lst in selection.removed.values() for i in lst}
    gone = np.array([i in removed for i in ids])
    front = np.array([i in set(selection.pareto_ids) for i in ids])
    pick = ids.index(selection.chosen.id)

    fig = Figure(figsize=(8, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if gone.any():
        ax.scatter(cost[gone], lat[gone], marker="x", c="0.7", s=18,
                   label="removed by constraints")
    ok = ~gone
    sc = ax.scatter(cost[ok], lat[ok], c=h[ok], cmap="viridis", s=26, alpha=0.85,
                    norm=LogNorm(vmin=max(h.min(), 1e-3), vmax=max(h.max(), 1e-2)),
                    label="candidates")
    fig.colorbar(sc, ax=ax, label="training TFLOP/s the job gets (H)")
    if front.any():
        order = np.argsort(cost[front])
        ax.scatter(cost[front][order], lat[front][order], facecolors="none", edgecolors="k",
                   s=90, linewidths=1.2, label="Pareto-optimal")
        for j, i in enumerate(np.flatnonzero(front)[:25]):  # stagger labels of close points
            ax.annotate(ids[i], (cost[i], lat[i]), fontsize=6, xytext=(6, 4 + 9 * (j % 4)),
                        textcoords="offset points", arrowprops={"arrowstyle": "-", "lw": 0.4})
    ax.scatter([cost[pick]], [lat[pick]], marker="*", s=320, c="red", edgecolors="k",
               label=f"pick: {selection.chosen.id}", zorder=5)
    if cost.min() > 0 and cost.max() / cost.min() > 20:
        ax.set_xscale("log")
    ax.set_xlabel("estimated job cost, $ (cost model: every phase on that server)")
    ax.set_ylabel("latency, ms")
    ax.set_title(f"Server plan ({selection.selector}): {len(pts)} servers")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
