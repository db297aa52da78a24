"""Learned efficiency: how far each kind of job is from the model, corrected after every run.

One record per key (hardware class, model-size bucket, trainer, phase) holds the running mean
and spread of x = log(measured seconds / prior seconds). The prior says x ~ N(0, PRIOR_SD^2)
(the model alone is right within about x3 either way, 90% of the time); each finished phase
is one observation with noise sd OBS_SD (or the observed spread, once there are three), and
the posterior of the correction is the conjugate normal update. The predictive interval of
the next run's time adds the observation noise back. Records live in the KV bucket
`stratos_costmodel`, so they survive daemon restarts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec
import structlog

from schemas import subjects

log = structlog.stdlib.get_logger(__name__)

PRIOR_SD = math.log(3.0)  # ~90% of first runs within x/÷ 6 of the prior (±1.645 sd)
OBS_SD = 0.15  # run-to-run noise of one phase on one server class (shared machines: ±15%)
Z90 = 1.645
MIN_SD = 0.05


class Record(msgspec.Struct, kw_only=True):
    """Running statistics of log(measured / prior) for one key."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations (Welford)
    last: float = 0.0

    def add(self, x: float) -> None:
        """Welford update with one observation."""
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)
        self.last = x

    @property
    def spread(self) -> float:
        """The observed sd (OBS_SD until there are three runs)."""
        if self.n < 3:
            return OBS_SD
        return max(math.sqrt(self.m2 / (self.n - 1)), MIN_SD)


@dataclass(frozen=True)
class Correction:
    """Multiply a prior time by `factor`; the 90% interval is [factor/ratio, factor*ratio]."""

    factor: float
    sd: float  # predictive sd on the log scale
    n: int

    @property
    def ratio(self) -> float:
        """exp(1.645 sd): the 90% interval's multiplicative half-width."""
        return math.exp(Z90 * self.sd)

    @property
    def pct(self) -> float:
        """The interval's half-width in % (of the upper side)."""
        return (self.ratio - 1.0) * 100.0


PRIOR = Correction(factor=1.0, sd=math.hypot(PRIOR_SD, OBS_SD), n=0)


def posterior(rec: Record | None) -> Correction:
    """The conjugate normal update of the prior N(0, PRIOR_SD^2) with rec's observations."""
    if rec is None or rec.n == 0:
        return PRIOR
    noise = rec.spread
    precision = 1.0 / PRIOR_SD**2 + rec.n / noise**2
    mean = (rec.n / noise**2) * rec.mean / precision
    return Correction(factor=math.exp(mean), sd=math.sqrt(1.0 / precision + noise**2), n=rec.n)


def size_bucket(params: float) -> str:
    """'<10M', '10M-100M', '100M-1B', '1B-10B', '>10B'."""
    for limit, name in ((1e7, "<10M"), (1e8, "10M-100M"), (1e9, "100M-1B"), (1e10, "1B-10B")):
        if params < limit:
            return name
    return ">10B"


def key(hw_class: str, params: float, trainer: str, phase: str) -> str:
    """The record key; also a valid KV key (no spaces or '<')."""
    bucket = size_bucket(params).replace("<", "lt").replace(">", "gt")
    return f"{hw_class}.{bucket}.{trainer}.{phase}".replace(" ", "_")


class EfficiencyBook:
    """The records, in memory; `load`/`save` keep them in KV."""

    def __init__(self, records: dict[str, Record] | None = None) -> None:
        self.records: dict[str, Record] = dict(records or {})

    def correction(self, k: str) -> Correction:
        """The posterior correction for a key (the prior when it has no history)."""
        return posterior(self.records.get(k))

    def observe(self, k: str, prior_s: float, measured_s: float) -> Record | None:
        """Add one finished phase; ignores non-positive or non-finite times."""
        if not (prior_s > 0 and measured_s > 0 and math.isfinite(prior_s * measured_s)):
            return None
        rec = self.records.setdefault(k, Record())
        rec.add(math.log(measured_s / prior_s))
        log.info("efficiency_learned", key=k, n=rec.n, ratio=round(measured_s / prior_s, 4),
                 factor=round(posterior(rec).factor, 4))
        return rec

    def keys(self) -> Iterable[str]:
        """Keys with history."""
        return self.records.keys()

    async def load(self, bus: object) -> None:
        """Read every record from KV (an empty or missing bucket leaves the book empty)."""
        kv = await bus.kv(subjects.COSTMODEL_BUCKET)  # type: ignore[attr-defined]
        try:
            names = await kv.keys()
        except Exception:  # noqa: BLE001 - nats raises NoKeysError on an empty bucket
            return
        for name in names:
            entry = await kv.get(name)
            try:
                self.records[name] = msgspec.json.decode(entry.value, type=Record)
            except msgspec.DecodeError:
                log.warning("efficiency_record_unreadable", key=name)

    async def save(self, bus: object, k: str) -> None:
        """Write one record to KV."""
        rec = self.records.get(k)
        if rec is None:
            return
        kv = await bus.kv(subjects.COSTMODEL_BUCKET)  # type: ignore[attr-defined]
        await kv.put(k, msgspec.json.encode(rec))
