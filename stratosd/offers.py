"""Offers in columnar form: what selection reads, built once per fleet or catalog change.

Selection over 100k-1M offers is numpy work on a few columns, but reading those columns out of
1M `ServerOffer` structs in Python costs ~10x the decision itself. The fleet and the catalogs
keep an `OfferTable` instead: one array per field selection uses, and the offers grouped into
hardware *kinds* (same GPU model and count, CPU count, measured capacity): the cost model
prices each kind once and broadcasts, because big fleets repeat a few hundred kinds at most.

An OfferTable is a read-only sequence of ServerOffer, so every caller that iterates offers
keeps working; selectors that know it read the columns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from schemas.specs import ServerOffer

if TYPE_CHECKING:
    from numpy.typing import NDArray

FloatArray = Any  # NDArray[np.float64]
IntArray = Any  # NDArray[np.int64]


def hardware_kind(o: ServerOffer) -> tuple[object, ...]:
    """What the cost model's speed depends on: offers with the same kind train alike."""
    cap = o.capacity
    return (o.gpu_model, o.gpu_count, o.cpu_count, id(cap) if cap is not None else None,
            o.hardware_score, len(o.members))


@dataclass(frozen=True, eq=False)
class OfferTable(Sequence[ServerOffer]):
    """Columns of many offers (row i is offers[i])."""

    offers: Sequence[ServerOffer]
    ids: NDArray[np.object_]
    gpu_count: FloatArray
    gpu_mem_mib: FloatArray
    cpu_count: FloatArray
    price: FloatArray
    latency_ms: FloatArray
    latency_known: NDArray[np.bool_]
    up: NDArray[np.bool_]
    busy: NDArray[np.bool_]
    region: IntArray  # index into regions
    regions: tuple[str, ...]
    kind: IntArray  # index into kinds
    kinds: tuple[ServerOffer, ...]  # one representative offer per hardware kind

    @classmethod
    def from_offers(cls, offers: Sequence[ServerOffer]) -> OfferTable:
        """The one pass over the structs (done when the fleet or a catalog changes)."""
        if isinstance(offers, OfferTable):
            return offers
        n = len(offers)
        kinds: dict[tuple[object, ...], int] = {}
        regions: dict[str, int] = {}
        kind = np.fromiter((kinds.setdefault(hardware_kind(o), len(kinds)) for o in offers),
                           np.int64, n)
        _ids, first = np.unique(kind, return_index=True)  # kinds are numbered 0.. in order
        reps = [offers[int(i)] for i in first]
        region = np.fromiter((regions.setdefault(o.region, len(regions)) for o in offers),
                             np.int64, n)

        def col(name: str) -> FloatArray:
            return np.fromiter(map(attrgetter(name), offers), np.float64, n)

        return cls(offers=offers, ids=np.fromiter(map(attrgetter("id"), offers), object, n),
                   gpu_count=col("gpu_count"), gpu_mem_mib=col("gpu_mem_mib"),
                   cpu_count=col("cpu_count"), price=col("price_usd_per_hour"),
                   latency_ms=col("latency_ms"), latency_known=col("latency_known") > 0,
                   up=np.fromiter(map("up".__eq__, map(attrgetter("status"), offers)), bool, n),
                   busy=col("busy") > 0, region=region, regions=tuple(regions), kind=kind,
                   kinds=tuple(reps))

    def __len__(self) -> int:
        return len(self.offers)

    @overload
    def __getitem__(self, i: int) -> ServerOffer: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[ServerOffer]: ...

    def __getitem__(self, i: int | slice) -> ServerOffer | Sequence[ServerOffer]:
        return self.offers[i]

    def __iter__(self) -> Iterator[ServerOffer]:
        return iter(self.offers)

    def region_mask(self, wanted: str) -> NDArray[np.bool_]:
        """Rows whose region matches `wanted` (`eu` matches `eu-west`), one test per region."""
        w = wanted.lower()
        ok = np.array([r.lower() == w or r.lower().startswith(w + "-") for r in self.regions]
                      + [False], dtype=bool)
        out: NDArray[np.bool_] = ok[self.region]
        return out

    @classmethod
    def concat(cls, *tables: OfferTable) -> OfferTable:
        """Tables one after another (the live fleet, then catalogs), without a pass over the
        offers in Python: kinds and regions are renumbered."""
        if len(tables) == 1:
            return tables[0]
        regions: dict[str, int] = {}
        region_cols: list[IntArray] = []
        kind_cols: list[IntArray] = []
        kinds: list[ServerOffer] = []
        offers: list[ServerOffer] = []
        for t in tables:
            remap = np.array([regions.setdefault(r, len(regions)) for r in t.regions] + [0],
                             dtype=np.int64)
            region_cols.append(remap[t.region])
            kind_cols.append(t.kind + len(kinds))
            kinds.extend(t.kinds)
            offers.extend(t.offers)

        def cat(name: str) -> Any:
            return np.concatenate([getattr(t, name) for t in tables])

        return cls(offers=offers, ids=cat("ids"), gpu_count=cat("gpu_count"),
                   gpu_mem_mib=cat("gpu_mem_mib"), cpu_count=cat("cpu_count"),
                   price=cat("price"), latency_ms=cat("latency_ms"),
                   latency_known=cat("latency_known"), up=cat("up"), busy=cat("busy"),
                   region=np.concatenate(region_cols), regions=tuple(regions),
                   kind=np.concatenate(kind_cols), kinds=tuple(kinds))
