"""Server plans for `stratosctl plan`: a table of the Pareto candidates, and a plot.

Nothing heavy at import time: numpy comes with the selector objectives (imported inside the
functions, so the CLI pays for them only when it plans) and matplotlib only inside plot_plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from schemas.specs import Constraints, Selection, ServerOffer

DEFAULT_EST_TRAIN_HOURS = 0.5
_PLOT_MAX_POINTS = 20_000  # a denser scatter adds nothing but seconds

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (row key, header, format)
    ("id", "server", "{}"),
    ("gpu", "hardware", "{}"),
    ("price_usd_per_hour", "$/h", "{:.2f}"),
    ("est_hours", "est h", "{:.2f}"),
    ("est_job_usd", "job $", "{:.2f}"),
    ("latency_ms", "latency ms", "{:.0f}"),
    ("hardware_score", "H", "{:.0f}"),
    ("pareto", "pareto", "{}"),
    ("chosen", "chosen", "{}"),
)


def _est_hours(selection: Selection, est_train_hours: float | None) -> float:
    if est_train_hours is not None:
        return est_train_hours
    return float(selection.details.get("est_train_hours", DEFAULT_EST_TRAIN_HOURS))


def _gpu_label(o: ServerOffer) -> str:
    if o.gpu_count == 0:
        return f"CPU {o.cpu_count} cores"
    from plugins.selectors.objectives import gpu_spec

    name = gpu_spec(o.gpu_model)[0] or o.gpu_model or "GPU"
    mem = f" {o.gpu_mem_mib / 1024:.0f}G" if o.gpu_mem_mib else ""
    return f"{o.gpu_count}x {name}{mem}"


def plan_rows(
    selection: Selection,
    offers: Sequence[ServerOffer],
    constraints: Constraints,
    est_train_hours: float,
) -> list[dict[str, Any]]:
    """One row per Pareto-optimal candidate plus the pick, cheapest job first."""
    from plugins.selectors.objectives import hardware_scores, train_hours

    wanted = set(selection.pareto_ids) | {selection.chosen.id}
    picked = {o.id: o for o in offers if o.id in wanted}
    picked.setdefault(selection.chosen.id, selection.chosen)
    chosen_rows = list(picked.values())
    scores = hardware_scores(chosen_rows)
    hours = train_hours(scores, est_train_hours)
    pareto = set(selection.pareto_ids)
    rows: list[dict[str, Any]] = []
    for o, h, hr in zip(chosen_rows, scores, hours, strict=True):
        job = o.price_usd_per_hour * float(hr)
        row: dict[str, Any] = {
            "id": o.id,
            "gpu": _gpu_label(o),
            "region": o.region,
            "price_usd_per_hour": o.price_usd_per_hour,
            "est_hours": float(hr),
            "est_job_usd": job,
            "latency_ms": o.latency_ms,
            "hardware_score": float(h),
            "pareto": o.id in pareto,
            "chosen": o.id == selection.chosen.id,
        }
        if constraints.budget_usd is not None:
            row["budget_left_usd"] = constraints.budget_usd - job
        rows.append(row)
    rows.sort(key=lambda r: (r["est_job_usd"], r["id"]))
    return rows


def format_plan(selection: Selection, rows: Sequence[dict[str, Any]]) -> str:
    """An aligned text table (the pick marked with *) followed by the explanation."""

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key, "")
        if isinstance(value, bool):
            return "yes" if value else ""
        return fmt.format(value)

    table = [[h for _k, h, _f in COLUMNS]]
    table += [[cell(r, k, f) for k, _h, f in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    numeric = {"price_usd_per_hour", "est_hours", "est_job_usd", "latency_ms", "hardware_score"}
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
    return "\n".join([header, "", *out, "", selection.explanation])


def plot_plan(
    offers: Sequence[ServerOffer],
    selection: Selection,
    path: str | Path,
    *,
    est_train_hours: float | None = None,
) -> Path:
    """PNG scatter: job cost vs latency, coloured by hardware score; front and pick marked."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    from plugins.selectors.objectives import hardware_scores, train_hours

    hours_ref = _est_hours(selection, est_train_hours)
    pts = list(offers)
    if len(pts) > _PLOT_MAX_POINTS:
        keep = set(selection.pareto_ids) | {selection.chosen.id}
        rng = np.random.default_rng(0)
        sample = rng.choice(len(pts), _PLOT_MAX_POINTS, replace=False)
        pts = [pts[i] for i in sorted(sample)] + [o for o in pts if o.id in keep]
    if not any(o.id == selection.chosen.id for o in pts):
        pts.append(selection.chosen)
    ids = [o.id for o in pts]
    h = hardware_scores(pts)
    cost = np.array([o.price_usd_per_hour for o in pts]) * train_hours(h, hours_ref)
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
    fig.colorbar(sc, ax=ax, label="hardware score H (bf16 TFLOP/s-equivalent)")
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
    ax.set_xlabel(f"estimated job cost, $ ({hours_ref:g} h on 1x A100 80GB)")
    ax.set_ylabel("latency, ms")
    ax.set_title(f"Server plan ({selection.selector}): {len(pts)} servers")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
