"""What every server selector shares: the three objectives, hard constraints, normalisation
and a vectorised Pareto front.

The objectives come from the core cost model (`stratosd.costmodel`), the same numbers the
daemon's budget, `stratosctl plan` and the report use:

- Hardware capability H (bigger is better): the training TFLOP/s the job gets there, per device
  in the training dtype (bf16 on GPUs, fp32 on CPUs) x the devices the trainer uses (one today:
  a multi-GPU box is not credited for GPUs the trainer leaves idle). Measured by the server's
  agent when it has calibrated, else the documented table (`stratosd.costmodel.capacity`).
  `offer.hardware_score`, when set, replaces it.
- Job cost C (smaller is better): the whole job's $ there: every remaining phase's time (work
  estimated from the job ÷ speed x learned efficiency, plus start-up and transfers) x $/h, plus
  an API teacher's per-token $. `budget_usd` limits this same number.
- Latency L (smaller is better): `offer.latency_ms`, the user-facing latency the agent
  measured (catalogs: estimated from the region). An offer whose latency nothing measured
  (`latency_known = False`) is removed by `max_latency_ms` with that reason, and without a
  latency bound it counts as the worst known latency among the candidates, never as 0.

Hard constraints come first: each active constraint removes the offers that break it (an
offer is charged to the first constraint it breaks, in `CONSTRAINT_ORDER`), and when nothing
is left, `Infeasible` names the binding constraint and the nearest option. A server busy with
another run's training (`offer.busy`) is removed by `busy`. `deadline_hours` removes the offers
whose estimated time for the job (the same hours as C) is longer; the planner adds groups of
agents to the offers when no single server is fast enough (`stratosd.groups.plan_select`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from schemas.specs import Constraints, ServerOffer
from stratosd.costmodel.capacity import gpu_entry
from stratosd.errors import Infeasible
from stratosd.offers import OfferTable

if TYPE_CHECKING:
    from stratosd.costmodel import JobCosting

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]

CONSTRAINT_ORDER = (
    "status", "busy", "region", "min_gpu_mem_mib", "max_price_usd_per_hour", "latency_known",
    "max_latency_ms", "deadline_hours", "budget_usd",
)
_PRUNE_GRID = 32  # bands per axis of the pruning grid (independent of PFG's K)
_PRUNE_MIN = 2048  # below this many rows the exact sweep alone is faster
_FINE = 1 << 16  # uniform bins per column behind the equal-count pruning bands
_BASE_BLOCK = 16  # CDQ levels below this block size run as one brute-force pass
_CATEGORICAL_GAP = 1e6  # ranks a wrong region/status behind any numeric shortfall


def gpu_spec(model: str) -> tuple[str, float]:
    """Canonical name and dense bf16 TFLOP/s of a GPU model string ('' and a default)."""
    name, bf16, _fp32, _bw = gpu_entry(model)
    return name, bf16


def default_costing(costing: JobCosting | None, est_train_hours: float | None) -> JobCosting:
    """The costing a selector uses: the daemon's, else one from est_train_hours (tests,
    benches and third-party callers that only know a training time on 1x A100 80GB)."""
    if costing is not None:
        return costing
    from stratosd.costmodel import JobCosting

    return JobCosting.reference_hours(0.5 if est_train_hours is None else est_train_hours)


def hardware_scores(offers: Sequence[ServerOffer], costing: JobCosting | None = None
                    ) -> FloatArray:
    """H of many offers (see the module docstring)."""
    return default_costing(costing, None).columns(offers).hardware


def hardware_score(offer: ServerOffer, costing: JobCosting | None = None) -> float:
    """H of one offer."""
    return float(hardware_scores([offer], costing)[0])


def region_matches(region: str, wanted: str) -> bool:
    """`eu` matches `eu-west` and `eu`; `eu-west` matches only itself (case-insensitive)."""
    region, wanted = region.lower(), wanted.lower()
    return region == wanted or region.startswith(wanted + "-")


@dataclass(frozen=True)
class Candidates:
    """The offers left after the hard constraints, with their objectives as arrays."""

    source: Sequence[ServerOffer]
    index: IntArray  # positions in source of the feasible offers
    hardware: FloatArray
    price: FloatArray
    hours: FloatArray
    job_usd: FloatArray
    latency_ms: FloatArray
    removed: dict[str, list[str]]
    total: int
    costing: JobCosting
    measured: BoolArray  # the offer's speed was measured by its agent (else the table)

    def __len__(self) -> int:
        return len(self.index)

    def offer(self, i: int) -> ServerOffer:
        """The i-th feasible offer."""
        return self.source[int(self.index[i])]

    def minimised(self) -> FloatArray:
        """(n, 3) raw objectives, all to be minimised: -H, job $, latency ms."""
        return np.column_stack((-self.hardware, self.job_usd, self.latency_ms))

    def normalised(self) -> FloatArray:
        """(n, 3) objectives scaled to [0, 1] over the candidates, 0 = best (the ideal point).

        Columns: hardware shortfall (max H - H) / range, cost, latency; a column whose
        candidates all agree is 0.
        """
        return normalise(self.minimised())


def normalise(points: FloatArray, reference: FloatArray | None = None) -> FloatArray:
    """Min-max scale each column to [0, 1] (0 = best) using the ranges of `reference` rows
    (default: all rows), clipping values outside; constant columns become 0."""
    ref = points if reference is None else reference
    lo = ref.min(axis=0)
    span = ref.max(axis=0) - lo
    safe = np.where(span > 0, span, 1.0)
    out: FloatArray = np.clip((points - lo) / safe, 0.0, 1.0)
    return out


def filter_offers(
    offers: Sequence[ServerOffer], constraints: Constraints, costing: JobCosting | float | None
) -> Candidates:
    """Apply the hard constraints; raise Infeasible naming the binding one when none is left.

    costing: the job's `JobCosting`; a number is a training time in hours on 1x A100 80GB.
    """
    if isinstance(costing, int | float):
        if costing < 0 or not math.isfinite(costing):
            raise Infeasible(f"est_train_hours must be a finite number >= 0, got {costing}",
                             hint="fix est_train_hours in the job", field="est_train_hours")
        costing = default_costing(None, float(costing))
    costing = default_costing(costing, None)
    if not offers:
        raise Infeasible(
            "no servers to choose from: no agent is connected and no offer catalog has offers",
            hint="start stratos-agent on a host, or add a catalog with STRATOS_OFFER_CATALOGS",
        )
    table = OfferTable.from_offers(offers)
    costs = costing.columns(table)
    hardware = np.maximum(costs.hardware, 1e-6)
    hours = costs.seconds / 3600.0
    price, known = table.price, table.latency_known
    latency = table.latency_ms
    job = costs.total_usd
    checks = _checks(table, constraints, job, hours)
    left = np.ones(len(table), dtype=bool)
    removed: dict[str, list[str]] = {}
    for name, ok, _gap in checks:
        gone = left & ~ok
        removed[name] = table.ids[gone].tolist()
        left &= ok
    if not left.any():
        raise _infeasible(table, constraints, checks, job, hardware, latency, hours)
    idx = np.flatnonzero(left).astype(np.int64)
    lat = latency[idx]
    unknown = ~known[idx]
    if unknown.any():  # never 0 (the best): the worst latency any candidate is known to have
        lat = np.where(unknown, lat[~unknown].max() if (~unknown).any() else 0.0, lat)
    return Candidates(
        source=table, index=idx, hardware=hardware[idx], price=price[idx], hours=hours[idx],
        job_usd=job[idx], latency_ms=lat, removed=removed, total=len(offers),
        costing=costing, measured=costs.measured[idx],
    )


def _checks(
    t: OfferTable, c: Constraints, job: FloatArray, hours: FloatArray
) -> list[tuple[str, BoolArray, FloatArray]]:
    """(constraint, passes, relative shortfall) for each active constraint, in order."""
    out: list[tuple[str, BoolArray, FloatArray]] = []
    cat = np.full(len(t), _CATEGORICAL_GAP)
    finite = np.isfinite(job) & np.isfinite(t.latency_ms)
    out.append(("status", t.up & finite, cat))
    out.append(("busy", ~t.busy, cat))
    if c.region:
        out.append(("region", t.region_mask(c.region), cat))

    def numeric(name: str, value: FloatArray, limit: float, upper: bool) -> None:
        excess = (value - limit) if upper else (limit - value)
        out.append((name, excess <= 1e-12 * max(limit, 1.0), excess / max(limit, 1e-9)))

    if c.min_gpu_mem_mib > 0:
        mem = np.where(t.gpu_count > 0, t.gpu_mem_mib, 0.0)
        numeric("min_gpu_mem_mib", mem, float(c.min_gpu_mem_mib), upper=False)
    if c.max_price_usd_per_hour is not None:
        numeric("max_price_usd_per_hour", t.price, c.max_price_usd_per_hour, upper=True)
    if c.max_latency_ms is not None:
        out.append(("latency_known", t.latency_known, cat))
        numeric("max_latency_ms", t.latency_ms, c.max_latency_ms, upper=True)
    if c.deadline_hours is not None:
        numeric("deadline_hours", hours, c.deadline_hours, upper=True)
    if c.budget_usd is not None:
        numeric("budget_usd", job, c.budget_usd, upper=True)
    return out


def _infeasible(
    offers: OfferTable,
    c: Constraints,
    checks: list[tuple[str, BoolArray, FloatArray]],
    job: FloatArray,
    hardware: FloatArray,
    latency: FloatArray,
    hours: FloatArray,
) -> Infeasible:
    """The nearest option breaks the fewest constraints, then by the smallest shortfall."""
    fails = np.column_stack([~ok for _n, ok, _g in checks])
    gaps = np.column_stack([np.where(~ok, g, 0.0) for _n, ok, g in checks])
    nfail = fails.sum(axis=1)
    ids = offers.ids
    safe_job = np.where(np.isfinite(job), job, np.inf)
    order = np.lexsort((ids, safe_job, gaps.sum(axis=1), nfail))
    best = int(order[0])
    offer = offers[best]
    names = [checks[j][0] for j in np.flatnonzero(fails[best])]
    what = {
        "budget_usd": f"${job[best]:.2f} for this job",
        "max_latency_ms": f"{latency[best]:.0f} ms latency",
        "deadline_hours": f"{hours[best]:.3g} h for this job",
        "max_price_usd_per_hour": f"${offer.price_usd_per_hour:.2f}/h",
        "min_gpu_mem_mib": f"{offer.gpu_mem_mib if offer.gpu_count else 0} MiB per GPU",
        "region": f"region {offer.region or '?'}",
        "status": "status down",
        "busy": "busy with another run's training",
        "latency_known": "latency never measured",
    }
    if len(names) == 1:
        name = names[0]
        message, hint = _single_message(name, c, offer, float(job[best]), float(latency[best]),
                                        float(hours[best]))
    else:
        listed = " and ".join(names)
        needs = ", ".join(f"{n}: {what[n]}" for n in names)
        message = (
            f"no server meets {listed} together: the nearest option is {offer.id} ({needs})"
        )
        hint = f"relax one of {', '.join(names)}, or add servers"
        name = names[0]
    return Infeasible(message, hint=hint, field=f"constraints.{name}")


def _single_message(
    name: str, c: Constraints, offer: ServerOffer, job: float, latency: float, hours: float
) -> tuple[str, str]:
    oid = offer.id
    if name == "deadline_hours":
        what = f"group {oid}" if len(offer.members) > 1 else oid
        return (
            f"deadline {c.deadline_hours:g} h too short: the fastest option meeting the other "
            f"constraints takes {hours:.3g} h for this job ({what})",
            f"raise deadline_hours to at least {math.ceil(hours * 100) / 100:g}, start more "
            "agents in one region (the planner considers groups of same-region agents), or "
            "make the job smaller; `stratosctl plan` shows each option's time",
        )
    if name == "budget_usd":
        return (
            f"budget ${c.budget_usd:.2f} too low: the cheapest server meeting the other "
            f"constraints costs ${job:.2f} for this job ({oid})",
            f"raise budget_usd to at least ${job:.2f}, or make the job smaller (fewer "
            "train.max_steps or rows, a smaller student); `stratosctl plan` shows each phase",
        )
    if name == "max_latency_ms":
        return (
            f"max latency {c.max_latency_ms:g} ms too low: the fastest server meeting the other "
            f"constraints answers in {latency:.0f} ms ({oid}, {offer.region or 'unknown region'})",
            f"raise max_latency_ms to at least {math.ceil(latency)}, or add servers nearer to "
            "your users",
        )
    if name == "max_price_usd_per_hour":
        return (
            f"max price ${c.max_price_usd_per_hour:.2f}/h too low: the cheapest server meeting "
            f"the other constraints costs ${offer.price_usd_per_hour:.2f}/h ({oid})",
            f"raise max_price_usd_per_hour to at least ${offer.price_usd_per_hour:.2f}",
        )
    if name == "min_gpu_mem_mib":
        mem = offer.gpu_mem_mib if offer.gpu_count else 0
        return (
            f"min GPU memory {c.min_gpu_mem_mib} MiB too high: the largest GPU meeting the "
            f"other constraints has {mem} MiB ({oid})",
            f"lower min_gpu_mem_mib to {mem}, or add servers with larger GPUs",
        )
    if name == "region":
        return (
            f"no server in region {c.region!r} meets the other constraints: the nearest "
            f"option is {oid} in {offer.region or 'an unknown region'}",
            f"drop or change `region` (e.g. region = {offer.region!r})",
        )
    if name == "busy":
        return (
            f"every server meeting the other constraints is busy training another run: the "
            f"nearest is {oid}",
            "the run waits for a free server; or start another stratos-agent",
        )
    if name == "latency_known":
        return (
            f"no server meeting the other constraints has a measured latency (nearest: {oid}), "
            f"so max_latency_ms {c.max_latency_ms:g} cannot be checked",
            "start agents with --probe-url LABEL=URL (a URL near your users), or drop "
            "max_latency_ms",
        )
    return (
        f"every server meeting the other constraints is down: the nearest is {oid}",
        "start stratos-agent on that host again, or wait for its heartbeat",
    )


# --- Pareto front -----------------------------------------------------------------------


def pareto_mask(points: FloatArray, *, prune_grid: int | None = None) -> BoolArray:
    """Non-dominated rows of an (n, 3) array where every column is minimised.

    A row is dominated when another row is <= on every column and < on one; identical rows
    never dominate each other, so all copies of a non-dominated triplet are kept.
    Steps: (1) drop rows whose grid cell is strictly dominated by an occupied cell (every
    point there is dominated; `prune_grid` bands per axis, 32 by default above 2048 rows; up
    to three rounds, each re-banding the survivors);
    (2) dedupe triplets; (3) an exact O(m log m) sweep on the rest (`_dominated_sorted`).
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"expected an (n, 3) array, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("objectives must be finite")
    n = len(pts)
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    grid = prune_grid if prune_grid is not None else (_PRUNE_GRID if n > _PRUNE_MIN else 0)
    idx = np.arange(n)
    for _round in range(3 if grid >= 2 else 0):  # survivors get finer bands next round
        keep = ~_cell_dominated(pts[idx], grid)
        idx = idx[keep]
        if keep.mean() > 0.8 or (prune_grid is None and len(idx) <= _PRUNE_MIN):
            break
    sub = pts[idx]
    order = np.lexsort((sub[:, 2], sub[:, 1], sub[:, 0]))
    srt = sub[order]
    first = np.ones(len(srt), dtype=bool)
    first[1:] = np.any(srt[1:] != srt[:-1], axis=1)
    group = np.cumsum(first) - 1
    dominated = _dominated_sorted(srt[first])
    mask[idx[order]] = ~dominated[group]
    return mask


def _bands(col: FloatArray, grid: int) -> IntArray:
    """Equal-count bands 0..grid-1 of one column, monotone in the value.

    Values go to `_FINE` uniform bins first (arithmetic, no sort); a histogram of those bins
    then gives each bin the band of its cumulative count. Skewed or clustered columns (a few
    8-GPU boxes, prices rounded to the cent) still spread over the grid.
    """
    lo = col.min()
    span = col.max() - lo
    if not span > 0:
        return np.zeros(len(col), dtype=np.int64)
    fine = ((col - lo) / span * (_FINE - 1)).astype(np.int64)  # values >= 0: trunc = floor
    np.minimum(fine, _FINE - 1, out=fine)
    counts = np.bincount(fine, minlength=_FINE)
    table = (np.cumsum(counts) - counts) * grid // len(col)
    out: IntArray = table[fine]
    return out


def _cell_dominated(pts: FloatArray, grid: int) -> BoolArray:
    """Rows whose cell (grid bands per axis) has an occupied cell strictly below it on every
    axis. Bands are monotone in each value, so a strictly lower band holds only strictly
    smaller values: every point of a strictly dominated cell is dominated.
    """
    flat = np.zeros(len(pts), dtype=np.int64)
    for axis in range(3):
        flat = flat * grid + _bands(np.ascontiguousarray(pts[:, axis]), grid)
    occupied = (np.bincount(flat, minlength=grid**3) > 0).reshape(grid, grid, grid)
    reach = occupied
    for axis in range(3):  # reach[i,j,k]: some occupied cell <= (i,j,k) on every axis
        reach = np.logical_or.accumulate(reach, axis=axis)
    dom = np.zeros_like(occupied)
    dom[1:, 1:, 1:] = reach[:-1, :-1, :-1]
    out: BoolArray = dom.reshape(-1)[flat]
    return out


def _dominated_sorted(u: FloatArray) -> BoolArray:
    """Dominated rows of distinct rows sorted lexicographically (column 0 first).

    Row i is dominated iff some earlier row j (so x_j <= x_i) has y_j <= y_i and z_j <= z_i.
    Divide and conquer over positions (CDQ) answers min{z_j : j < i, y_j <= y_i} for every
    i: at block size 2s the left half of each block feeds its right half through a
    cumulative minimum in (block, y) order, with an offset per block so minima never leak
    across blocks. Levels run top-down: one stable sort by y serves the top level, and each
    level's order is split into the next level's (left halves, then right halves) by a
    stable partition built from cumulative counts, in O(m). Blocks below `_BASE_BLOCK` are
    checked by brute force. O(m log m) overall; every pair (j, i) is seen exactly once.
    """
    m = len(u)
    if m <= 1:
        return np.zeros(m, dtype=bool)
    yr = np.unique(u[:, 1], return_inverse=True)[1].astype(np.int64).reshape(-1)
    zr = np.unique(u[:, 2], return_inverse=True)[1].astype(np.int64).reshape(-1)
    none = int(zr.max()) + 1  # "no left point yet"
    offset = none + 1
    best = np.full(m, none, dtype=np.int64)
    best[_dominated_in_blocks(yr, zr, _BASE_BLOCK)] = -1
    perm = np.argsort(yr, kind="stable")  # (y, position) order within the one top block
    t = np.arange(m, dtype=np.int64)
    level = (m - 1).bit_length() - 1  # s = 2**level, the largest power of two below m
    while (1 << level) >= _BASE_BLOCK:
        s = 1 << level
        # perm is sorted by (position // 2s, y, position); blocks are contiguous, 2s long,
        # so the block of perm[t] is t // 2s
        block = t >> (level + 1)
        right = ((perm >> level) & 1).astype(bool)
        shift = block * offset
        vals = np.where(right, none, zr[perm]) - shift
        running = np.minimum.accumulate(vals) + shift
        target = perm[right]
        best[target] = np.minimum(best[target], running[right])
        if s == _BASE_BLOCK:
            break
        start = block << (level + 1)
        rights = np.concatenate(([0], np.cumsum(right)))
        right_rank = rights[:-1] - rights[start]  # right-half rows before t in its block
        n_left = np.minimum(s, m - start)
        new = start + np.where(right, n_left + right_rank, (t - start) - right_rank)
        nxt = np.empty_like(perm)
        nxt[new] = perm
        perm = nxt
        level -= 1
    out: BoolArray = best <= zr
    return out


def _dominated_in_blocks(yr: IntArray, zr: IntArray, size: int) -> BoolArray:
    """CDQ's first levels by brute force: dominated by an earlier row of the same block."""
    m = len(yr)
    pad = -m % size
    y = np.concatenate((yr, np.full(pad, np.iinfo(np.int64).max))).reshape(-1, size)
    z = np.concatenate((zr, np.full(pad, np.iinfo(np.int64).max))).reshape(-1, size)
    earlier = np.tri(size, size, -1, dtype=bool).T  # earlier[j, i]: j < i
    hit = (y[:, :, None] <= y[:, None, :]) & (z[:, :, None] <= z[:, None, :]) & earlier
    out: BoolArray = hit.any(axis=1).reshape(-1)[:m]
    return out


def pareto_mask_bruteforce(points: FloatArray) -> BoolArray:
    """O(n^2) reference for tests: not dominated by any other row."""
    p = np.asarray(points, dtype=np.float64)
    le = (p[:, None, :] <= p[None, :, :]).all(axis=2)  # le[j, i]: j <= i everywhere
    lt = (p[:, None, :] < p[None, :, :]).any(axis=2)
    out: BoolArray = np.logical_not((le & lt).any(axis=0))
    return out


def describe_removed(removed: dict[str, list[str]], limit: int = 4) -> str:
    """'max_latency_ms removed 2 (a, b), budget_usd removed none' in plain words."""
    parts = []
    for name, ids in removed.items():
        if name in ("status", "busy") and not ids:
            continue
        if not ids:
            parts.append(f"{name} removed none")
            continue
        more = f", +{len(ids) - limit} more" if len(ids) > limit else ""
        shown = ", ".join(ids[:limit]) + more
        parts.append(f"{name} removed {len(ids)} ({shown})")
    return "; ".join(parts) if parts else "no constraint removed anything"


def describe_cost_model(c: Candidates) -> str:
    """One sentence on how job cost is estimated."""
    return c.costing.describe()


def offer_summary(c: Candidates, i: int) -> dict[str, Any]:
    """Objectives of the i-th candidate, for Selection.details."""
    return {
        "id": c.offer(i).id,
        "hardware_score": round(float(c.hardware[i]), 3),
        "price_usd_per_hour": round(float(c.price[i]), 4),
        "est_hours": round(float(c.hours[i]), 4),
        "est_job_usd": round(float(c.job_usd[i]), 4),
        "latency_ms": round(float(c.latency_ms[i]), 2),
        "latency_known": bool(c.offer(i).latency_known),
        "capacity": "measured" if bool(c.measured[i]) else "estimated",
    }


def describe_offer(c: Candidates, i: int) -> str:
    """'1x A100 (H=312), $1.29/h, ~$0.65 for this job (0.50 h), 12 ms' for a candidate."""
    o = c.offer(i)
    hw = f"{o.gpu_count}x {o.gpu_model}" if o.gpu_count else f"CPU-only, {o.cpu_count} cores"
    src = "measured" if bool(c.measured[i]) else "estimated"
    lat = f"{c.latency_ms[i]:.0f} ms" if o.latency_known else "latency unknown"
    return (
        f"{hw} (H={c.hardware[i]:.3g} TFLOP/s, {src}), ${c.price[i]:.2f}/h, about "
        f"${c.job_usd[i]:.4g} for this job ({c.hours[i] * 3600:.0f} s), {lat}"
    )
