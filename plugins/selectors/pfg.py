"""Pareto Front Grid (PFG): the Stratos paper's server selection, step by step.

1. Hard constraints remove offers (`objectives.filter_offers`); none left -> `Infeasible`.
2. Each candidate is a triplet (H, C, L): hardware score, job cost, latency
   (`objectives` documents all three). Each is min-max normalised into a "badness" in [0, 1]
   with 0 the best value: (max H - H) / range, (C - min C) / range, (L - min L) / range.
   The ideal point is (0, 0, 0). The ranges are those of the Pareto servers (step 4) by
   default (`normalise = "pareto"`): the best value of each objective always belongs to a
   Pareto server, so only the worst end differs from the candidates' range, and a dominated
   outlier (a CPU host whose job costs $150) can no longer squeeze every real choice into the
   first cost band. `normalise = "candidates"` uses the range over all feasible candidates,
   the literal reading of the paper. Dominated servers may fall outside [0, 1]: clipped.
3. The unit cube is cut into K x K x K grid cells (K = 4 by default, `k` param): a candidate
   with badness v on an axis sits in cell min(floor(v * K), K - 1) of that axis.
4. The Pareto servers are those no other candidate beats: at least as good on all three
   objectives and better on one (computed on the raw objectives, so normalisation cannot
   merge values). Equal triplets are all kept.
5. A "Pareto grid cell" is a cell holding at least one Pareto server. The pick comes from the
   lowest-cost one: the smallest cost index; cells tied on cost go to the one nearest the
   ideal corner (smallest sum of indices), then the better hardware index, then latency.
6. Within that cell, the Pareto server closest to the ideal point (Euclidean distance of its
   normalised triplet) wins; ties go to the lower $/h, then the smaller id.

The paper states steps 2-6 in one sentence; the tie-breaks and the reading of "Pareto grid
cell" (step 5) are ours, chosen so the pick is always a Pareto server and always deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from schemas.specs import Constraints, Selection, ServerOffer
from stratosd import hookimpl
from stratosd.api import ServerSelector
from stratosd.errors import ConfigError

if TYPE_CHECKING:
    from plugins.selectors.objectives import BoolArray, Candidates, FloatArray, IntArray
    from stratosd.costmodel import JobCosting

# numpy and the objectives load on first use: the daemon and CLI import every plugin module
# at start and must not pay for numpy unless they select a server.

DEFAULT_K = 4
NORMALISE = ("pareto", "candidates")
AXES = ("hardware", "cost", "latency")


@dataclass(frozen=True)
class GridPick:
    """The PFG decision on raw objective arrays (before tie-breaks that need ids).

    Grid quantities exist only for the Pareto servers, the only ones PFG can pick.
    """

    pareto: BoolArray  # (n,) Pareto-optimal candidates
    front: IntArray  # (m,) their indices
    norm: FloatArray  # (m, 3) badness in [0, 1]
    cells: IntArray  # (m, 3) grid cell of each
    distance: FloatArray  # (m,) distance of the normalised triplet to the ideal point
    cell: tuple[int, int, int]  # the lowest-cost Pareto grid cell
    members: IntArray  # positions in `front` of the Pareto servers in that cell
    pareto_cells: list[tuple[int, int, int]]


def grid_pick(minimised: FloatArray, k: int = DEFAULT_K, basis: str = "pareto") -> GridPick:
    """Steps 2-5 on an (n, 3) array of objectives to minimise (-H, C, L)."""
    import numpy as np

    from plugins.selectors.objectives import normalise, pareto_mask

    pareto = pareto_mask(minimised)
    front = np.flatnonzero(pareto)
    pts = minimised[front]
    norm = normalise(pts, pts if basis == "pareto" else minimised)
    cells = np.minimum((norm * k).astype(np.int64), k - 1)
    distance = np.sqrt((norm**2).sum(axis=1))
    pc = np.unique(cells, axis=0)
    h, c, lat = pc[:, 0], pc[:, 1], pc[:, 2]
    best = pc[np.lexsort((lat, h, h + c + lat, c))[0]]
    members = np.flatnonzero((cells == best).all(axis=1))
    return GridPick(
        pareto=pareto, front=front, norm=norm, cells=cells, distance=distance,
        cell=(int(best[0]), int(best[1]), int(best[2])), members=members,
        pareto_cells=[(int(a), int(b), int(d)) for a, b, d in pc],
    )


def _parse(params: Mapping[str, Any] | None, **given: Any) -> tuple[int, str]:
    merged = {**dict(params or {}), **{n: v for n, v in given.items() if v is not None}}
    unknown = set(merged) - {"k", "normalise"}
    if unknown:
        raise ConfigError(f"unknown pfg parameter(s): {', '.join(sorted(unknown))}",
                          hint="pfg takes `k` (grid cells per axis) and `normalise`",
                          field="selector")
    k = merged.get("k", DEFAULT_K)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64:
        raise ConfigError(f"pfg `k` must be an integer from 1 to 64, got {k!r}",
                          hint="use e.g. k = 4", field="selector.k")
    basis = merged.get("normalise", "pareto")
    if basis not in NORMALISE:
        raise ConfigError(f"pfg `normalise` must be one of {NORMALISE}, got {basis!r}",
                          hint='use normalise = "pareto"', field="selector.normalise")
    return k, basis


class ParetoFrontGrid(ServerSelector):
    """Pareto Front Grid: the server closest to the ideal point in the cheapest Pareto cell."""

    name: ClassVar[str] = "pfg"
    description: ClassVar[str] = (
        "Pareto Front Grid (paper): normalise (H, C, L), K^3 grid, pick the server closest to "
        "the ideal point in the lowest-cost Pareto cell"
    )

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        *,
        k: int | None = None,
        normalise: str | None = None,
    ) -> None:
        self.k, self.normalise = _parse(params, k=k, normalise=normalise)

    def select(
        self,
        offers: Sequence[ServerOffer],
        constraints: Constraints,
        *,
        costing: JobCosting | None = None,
        est_train_hours: float | None = None,
        seed: int = 0,
    ) -> Selection:
        """Filter, build the grid, pick; the explanation walks through each step."""
        from plugins.selectors.objectives import filter_offers, offer_summary

        cands = filter_offers(offers, constraints,
                             costing if costing is not None else est_train_hours)
        g = grid_pick(cands.minimised(), self.k, self.normalise)
        # positions in g.front, best first: distance, then $/h, then id
        ranked = sorted(
            (int(j) for j in g.members),
            key=lambda j: (round(float(g.distance[j]), 12), float(cands.price[g.front[j]]),
                           cands.offer(int(g.front[j])).id),
        )
        best = ranked[0]
        chosen = int(g.front[best])
        details: dict[str, Any] = {
            "k": self.k,
            "normalise": self.normalise,
            "est_train_hours": est_train_hours,
            "cost_model": cands.costing.describe(),
            "cell": list(g.cell),
            "cell_axes": list(AXES),
            "pareto_cells": [list(c) for c in g.pareto_cells],
            "normalised": dict(zip(AXES, (round(float(v), 4) for v in g.norm[best]),
                                   strict=True)),
            "distance": round(float(g.distance[best]), 4),
            "chosen": offer_summary(cands, chosen),
            "cell_members": [cands.offer(int(g.front[j])).id for j in ranked],
        }
        return Selection(
            selector=self.name,
            chosen=cands.offer(chosen),
            pareto_ids=[cands.offer(int(i)).id for i in g.front],
            explanation=self._explain(cands, g, ranked),
            removed=cands.removed,
            candidates=cands.total,
            details=details,
        )

    def _explain(self, cands: Candidates, g: GridPick, ranked: list[int]) -> str:
        from plugins.selectors.objectives import (
            describe_cost_model,
            describe_offer,
            describe_removed,
        )

        n_pareto = len(g.front)
        first = ranked[0]  # positions in g.front; candidate index = g.front[position]
        chosen = int(g.front[first])
        oid = cands.offer(chosen).id
        h, c, lat = g.cell
        k = self.k
        scope = "Pareto server" if self.normalise == "pareto" else "candidate"
        lines = [
            f"Pareto Front Grid over {cands.total} servers. Hard constraints first: "
            f"{describe_removed(cands.removed)}; {len(cands)} candidates remain.",
            f"{n_pareto} of them are Pareto-optimal: no other candidate is at least as capable, "
            "as cheap for this job and as close, and better on one of the three.",
            f"Each objective is scaled to 0 (best) .. 1 (worst {scope}) and cut into {k} "
            f"bands, giving {k}x{k}x{k} cells; the Pareto servers occupy {len(g.pareto_cells)} "
            "of them.",
            f"The lowest-cost Pareto cell is (hardware {h}, cost {c}, latency {lat}) with "
            f"{len(ranked)} Pareto server(s) (band 0 = the best {100 / k:g}% of each range): "
            "PFG takes the cheapest band of the front, then balances the three objectives "
            "inside it.",
        ]
        why = f"{oid} wins that cell: closest to the ideal point (distance " \
              f"{g.distance[first]:.3f})"
        if len(ranked) > 1:
            second = ranked[1]
            other = int(g.front[second])
            rival = cands.offer(other).id
            if round(float(g.distance[first]), 12) < round(float(g.distance[second]), 12):
                why += f" ahead of {rival} ({g.distance[second]:.3f})"
            elif cands.price[chosen] < cands.price[other]:
                why += (f", tied with {rival} and cheaper per hour (${cands.price[chosen]:.2f} "
                        f"vs ${cands.price[other]:.2f})")
            else:
                why += f", tied with {rival} on distance and $/h; the smaller id goes first"
        lines.append(why + ".")
        lines.append(f"It offers {describe_offer(cands, chosen)}.")
        lines.append(describe_cost_model(cands))
        return "\n".join(lines)


@hookimpl
def stratos_server_selectors() -> list[type[ServerSelector]]:
    """Register the PFG selector."""
    return [ParetoFrontGrid]
