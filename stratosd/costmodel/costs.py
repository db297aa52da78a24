"""The daemon's cost model: one object that plan, submit, the stages, the budget and the report
share. It keeps the learned efficiencies (KV), estimates a run's work from its spec and what
earlier stages found, and records each finished phase's estimate next to its measurement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import structlog

from schemas.costs import PHASES, Estimate, JobEstimate, JobWork, StageCost
from schemas.specs import RunSpec, ServerOffer
from schemas.stages import (
    STAGE_RESULTS,
    ProbeTeachersResult,
    SelectStudentResult,
    StageResult,
    SynthesizeResult,
)
from stratosd.costmodel.learn import EfficiencyBook
from stratosd.costmodel.model import JobCosting, observe_scaling, train_loop_prior_s
from stratosd.costmodel.work import TaskSample, estimate_work, task_sample
from stratosd.errors import ConfigError
from stratosd.results import stage_result

if TYPE_CHECKING:
    from schemas.commands import RunInfo
    from stratosd.plugins import Plugins

log = structlog.stdlib.get_logger(__name__)

STAGE_PHASE: dict[str, str] = {
    "probe_teachers": "probe", "select_student": "prescreen", "synthesize": "synthesis",
    "train": "train", "evaluate": "evaluate", "deploy": "deploy",
}
R = TypeVar("R", bound=StageResult)
GIVEN_MAX_RATIO = 10.0  # est_train_hours further than this from the model needs --force


def _res(run: RunInfo | None, cls: type[R]) -> R | None:
    return None if run is None else stage_result(run, cls)


class CostModel:
    """Estimates with provenance for every phase of a run, learned from every finished one."""

    def __init__(self, plugins: Plugins, book: EfficiencyBook | None = None) -> None:
        self.plugins = plugins
        self.book = book or EfficiencyBook()
        self._samples: dict[bytes, TaskSample] = {}
        self._learned: set[str] = set()  # keys observed beyond the ones callers name in save

    def sample(self, spec: RunSpec) -> TaskSample:
        """Sizes of the job's task data (computed once per task and params)."""
        k = msgspec.json.encode(spec.task)
        got = self._samples.get(k)
        if got is None:
            got = self._samples[k] = task_sample(spec, self.plugins)
        return got

    # --- estimates -----------------------------------------------------------------------

    def work(self, spec: RunSpec, run: RunInfo | None = None) -> JobWork:
        """The run's work: from the spec, refined by what its finished stages found."""
        stu = _res(run, SelectStudentResult)
        syn = _res(run, SynthesizeResult)
        sample = self.sample(spec)
        target = None if syn is None else syn.mean_target_chars
        chars = None if target is None else sample.prompt_chars + target
        return estimate_work(
            spec, self.plugins, student=None if stu is None else stu.chosen,
            rows=None if syn is None else syn.kept, row_chars=chars,
            probe=_res(run, ProbeTeachersResult), sample=sample)

    def costing(self, spec: RunSpec, run: RunInfo | None = None, *,
                phases: Sequence[str] = PHASES, work: JobWork | None = None) -> JobCosting:
        """The job's costing over any server (the selectors' input); a job that deploys
        nothing has no deploy phase."""
        if not spec.deploy:
            phases = [p for p in phases if p != "deploy"]
        return JobCosting(work or self.work(spec, run), self.book, phases=phases,
                          given_train_hours=spec.est_train_hours)

    def check_given(self, spec: RunSpec, offers: Sequence[ServerOffer], *,
                    force: bool = False) -> None:
        """Refuse an est_train_hours that disagrees with the model by > x10 (unless forced)."""
        if spec.est_train_hours is None or force:
            return
        work = self.work(spec)
        model = JobCosting(work, self.book, phases=("train",))
        ref = JobCosting.REFERENCE
        predicted_h = model.columns([ref]).seconds[0] / 3600.0
        given = spec.est_train_hours
        ratio = max(given, 1e-9) / max(predicted_h, 1e-9)
        if ratio > GIVEN_MAX_RATIO or ratio < 1 / GIVEN_MAX_RATIO:
            raise ConfigError(
                f"est_train_hours = {given:g} h disagrees with the cost model, which estimates "
                f"{predicted_h:.3g} h on 1x A100 80GB for this job ({work.train_tokens:.3g} "
                f"tokens on {work.params / 1e6:.3g}M params): {ratio:.3g}x",
                hint="remove est_train_hours to use the model, or pass --force to keep yours",
                field="est_train_hours")

    # --- measurements ----------------------------------------------------------------------

    def stage_cost(self, run: RunInfo, stage: str, offer: ServerOffer, measured_s: float,
                   result: Mapping[str, Any], *, before: Any = None) -> StageCost | None:
        """Estimate (made before the stage ran: `before`, a JobEstimate as plain data) vs
        measurement of a finished stage; learns from it (in memory: `save` persists)."""
        phase = STAGE_PHASE.get(stage)
        if phase is None or not (measured_s > 0 and math.isfinite(measured_s)):
            return None
        if result.get("skipped"):  # nothing was deployed: nothing to learn or bill
            return None
        costing = self.costing(run.spec, run, phases=(phase,))
        rows = costing.phase_seconds(offer)
        if not rows:
            return None
        prior, k, _corr = rows[0]
        est_s = est_usd = None
        try:
            est = msgspec.convert(before, JobEstimate) if before else None
        except msgspec.ValidationError:
            est = None
        if est is not None and est.phases:
            est_s = est.phases[0].seconds
            est_usd = est.usd
        usd = measured_s / 3600.0 * offer.price_usd_per_hour
        if phase == "synthesis":
            usd += float(result.get("cost_usd") or 0.0)
        if k:  # empty for a training time the user gave (nothing to learn)
            self.book.observe(k, prior.seconds, measured_s)
        if phase == "train" and k:
            loop = result.get("train_time_s")
            warm = result.get("warm_start")  # GRPO: its SFT warm start is timed on its own
            if isinstance(loop, int | float) and isinstance(warm, dict) and \
                    not warm.get("reused") and isinstance(warm.get("train_time_s"), int | float):
                loop = float(loop) + float(warm["train_time_s"])  # the loop estimate has both
            ranks = result.get("ranks")
            if isinstance(loop, int | float) and loop > 0 and isinstance(ranks, int) \
                    and ranks > 1:  # what N ranks achieved: the scaling record, not one rank's
                got = observe_scaling(self.book, costing.work, offer, ranks, float(loop))
                self._learned.update([got] if got else [])
            elif isinstance(loop, int | float) and loop > 0:
                self.book.observe(k + ".loop", train_loop_prior_s(costing.work, offer),
                                  float(loop))
        return StageCost(phase=phase, server=offer.id, estimated_s=est_s,
                         measured_s=round(measured_s, 3), estimated_usd=est_usd,
                         measured_usd=round(usd, 6), key=k)

    def loop_estimate(self, work: JobWork, offer: ServerOffer, given: float | None) -> Estimate:
        """The training loop's time alone (comparable with train_time_s)."""
        c = JobCosting(work, self.book, given_train_hours=given)
        sp, _ = c._priors(offer)
        k, _corr = c.correction(sp, "train")
        corr = self.book.correction(k + ".loop") if k else c.correction(sp, "train")[1]
        v = train_loop_prior_s(work, offer) * corr.factor
        return Estimate(value=v, low=v / corr.ratio, high=v * corr.ratio,
                        source="calibrated" if corr.n else "prior", n=corr.n, unit="s")

    async def save(self, bus: Any, keys: Sequence[str]) -> None:
        """Persist the named records in KV (and any other record learned since the last save)."""
        learned, self._learned = self._learned, set()
        for k in dict.fromkeys([*keys, *sorted(learned)]):
            try:
                await self.book.save(bus, k)
            except Exception:  # noqa: BLE001 - learning must never fail a run
                log.warning("efficiency_not_saved", key=k, exc_info=True)

    # --- budget ----------------------------------------------------------------------------

    def spent_usd(self, run: RunInfo) -> float:
        """$ measured so far: each finished stage's server time and API $."""
        total = 0.0
        for stage in STAGE_PHASE:
            got = _res(run, STAGE_RESULTS[stage])
            if got is not None and got.cost is not None and got.cost.measured_usd is not None:
                total += got.cost.measured_usd
        return total

    def remaining(self, run: RunInfo, from_stage: str, offer: ServerOffer) -> Estimate | None:
        """$ of the phases from `from_stage` on (inclusive), on the run's server."""
        from stratosd.pipeline import STAGES

        if from_stage not in STAGES:
            return None
        rest = [STAGE_PHASE[s] for s in STAGES[STAGES.index(from_stage):] if s in STAGE_PHASE
                and s not in run.results]
        if not rest:
            return None
        est = self.costing(run.spec, run, phases=rest).estimate(offer)
        return est.usd
