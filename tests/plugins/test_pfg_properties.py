"""Property tests: the vectorised Pareto front against an O(n^2) reference, and PFG's pick."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.selectors.objectives import pareto_mask, pareto_mask_bruteforce
from plugins.selectors.pfg import ParetoFrontGrid, grid_pick
from schemas.specs import Constraints, ServerOffer

# Few distinct values per axis -> many ties and duplicate triplets; floats -> general position.
small_ints = st.integers(min_value=0, max_value=3).map(float)
floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
triplet = st.one_of(
    st.tuples(small_ints, small_ints, small_ints), st.tuples(floats, floats, floats)
)


@st.composite
def point_sets(draw: st.DrawFn) -> np.ndarray:
    """Point sets with ties, exact duplicates and sometimes a single distinct value."""
    pts = draw(st.lists(triplet, min_size=1, max_size=80))
    if draw(st.booleans()):
        pts += draw(st.lists(st.sampled_from(pts), max_size=10))  # exact duplicates
    return np.array(pts, dtype=np.float64)


def check_front(pts: np.ndarray, mask: np.ndarray, ref: np.ndarray | None = None) -> None:
    """No member is dominated, and every non-dominated point is a member."""
    ref = pareto_mask_bruteforce(pts) if ref is None else ref
    members = pts[mask]
    le = (pts[None, :, :] <= members[:, None, :]).all(axis=2)  # le[a, j]: j <= member a
    lt = (pts[None, :, :] < members[:, None, :]).any(axis=2)
    dominated = (le & lt).any(axis=1)
    assert not dominated.any(), f"members dominated: {members[dominated]}"
    missing = np.flatnonzero(ref & ~mask)
    assert not len(missing), f"non-dominated points missing: {pts[missing]}"
    assert (mask == ref).all()


@settings(max_examples=200, deadline=None)
@given(point_sets(), st.sampled_from([None, 0, 2, 3, 5, 32]))
def test_pareto_mask_matches_bruteforce(pts: np.ndarray, grid: int | None) -> None:
    check_front(pts, pareto_mask(pts, prune_grid=grid))


@settings(max_examples=5, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1), st.sampled_from([3, 5, 40]))
def test_pareto_mask_large_sets_with_pruning(seed: int, levels: int) -> None:
    """Sizes past the pruning threshold and the brute-force base blocks, with heavy ties."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2049, 2400))
    pts = rng.integers(0, levels, size=(n, 3)).astype(np.float64)
    pts[: n // 3, 2] = levels - pts[: n // 3, 0] - pts[: n // 3, 1]  # a plane: many members
    ref = pareto_mask_bruteforce(pts)
    check_front(pts, pareto_mask(pts), ref)
    check_front(pts, pareto_mask(pts, prune_grid=0), ref)  # the exact sweep alone


def test_pareto_mask_edge_cases() -> None:
    assert pareto_mask(np.zeros((0, 3))).tolist() == []
    assert pareto_mask(np.ones((5, 3))).all()  # equal triplets never dominate each other
    with pytest.raises(ValueError, match="finite"):
        pareto_mask(np.array([[0.0, np.nan, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        pareto_mask(np.zeros((3, 2)))


offer_rows = st.lists(
    st.tuples(
        st.sampled_from([0.5, 1.0, 2.0, 3.0]),  # $/h
        st.sampled_from([5.0, 20.0, 80.0]),  # latency
        st.sampled_from([("NVIDIA L4", 23034), ("NVIDIA H100", 81559), ("Tesla T4", 15360)]),
        st.integers(min_value=1, max_value=4),  # gpu count
    ),
    min_size=1,
    max_size=40,
)


def _fleet(rows: list[tuple[float, float, tuple[str, int], int]]) -> list[ServerOffer]:
    return [
        ServerOffer(id=f"s{i:03d}", gpu_model=g, gpu_mem_mib=m, gpu_count=n,
                    price_usd_per_hour=p, latency_ms=lat)
        for i, (p, lat, (g, m), n) in enumerate(rows)
    ]


@settings(max_examples=60, deadline=None)
@given(offer_rows, st.integers(min_value=1, max_value=8),
       st.sampled_from(["pareto", "candidates"]))
def test_pfg_pick_is_pareto_and_in_lowest_cost_cell(
    rows: list[tuple[float, float, tuple[str, int], int]], k: int, basis: str
) -> None:
    offers = _fleet(rows)
    sel = ParetoFrontGrid(k=k, normalise=basis).select(offers, Constraints())
    assert sel.chosen.id in sel.pareto_ids
    cells = sel.details["pareto_cells"]
    assert sel.details["cell"] in cells
    assert sel.details["cell"][1] == min(c[1] for c in cells)  # lowest cost index
    # the answer does not depend on the order the offers come in
    again = ParetoFrontGrid(k=k, normalise=basis).select(offers[::-1], Constraints())
    assert again.chosen.id == sel.chosen.id
    assert sorted(again.pareto_ids) == sorted(sel.pareto_ids)


def test_grid_pick_closest_to_ideal_within_cell() -> None:
    # (-H, C, L): A, B, C are Pareto-optimal, D is dominated by A
    pts = np.array([[-10.0, 1.0, 9.0], [-9.0, 1.1, 1.0], [-1.0, 10.0, 0.5], [-10.0, 10.0, 10.0]])
    one = grid_pick(pts, k=1, basis="candidates")  # one cell: the nearest to the ideal wins
    assert one.pareto.tolist() == [True, True, True, False]
    assert sorted(one.members.tolist()) == [0, 1, 2]
    assert int(one.members[np.argmin(one.distance[one.members])]) == 1
    two = grid_pick(pts, k=2, basis="candidates")
    # A sits in (0, 0, 1), B in (0, 0, 0): tied on cost, B's cell is nearer the ideal corner
    assert two.cell == (0, 0, 0)
    assert two.members.tolist() == [1]
