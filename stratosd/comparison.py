"""The same-fleet comparison the report scores (the formula is in `stratosd.score`).

The comparison (`compare_selectors`): the run's own pick and each built-in baseline selector's
pick from the same offers under the same constraints, every selector run with the same
`JobCosting` (the work select_server stored). Numbers come from one place, the core cost model
(`stratosd.costmodel`), never a second formula here:

- the run's own server is **measured**: training time = train.train_time_s; cost = each
  phase's measured $ (its `cost`), the estimate for a phase that stored none;
- another server is **estimated** by the cost model for the work the run did (chosen student,
  rows kept): training time = the training-loop estimate, cost = the whole job's $ (with the
  API teacher's $ as the run measured it: it does not depend on the server); each row carries
  the estimate's interval and source (prior, or calibrated from N runs);
- a server the model sees exactly like the run's (same learned keys, same predicted time)
  takes the run's measurements at its own $/h, marked "same class";
- latency = the server's user-facing network latency (`offer.latency_ms`, the L the selectors
  use); the cost model has no serving-latency estimate, so the run's measured serving latency
  is reported but does not enter the cross-server score;
- accuracy: the same student on the same data reaches the same accuracy wherever it fits, so
  it does not separate servers here (its term is equal for every feasible pick); a server
  where select_student's memory estimate does not fit is infeasible.

When every selector picks the same server, or the picks are equal on every metric, there is
nothing to compare: `improvement_pct` is None and `agreement` says so in a sentence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from schemas.costs import PHASES, Estimate, JobEstimate, StageCost
from schemas.specs import ServerOffer
from schemas.stages import (
    DeployResult,
    EvaluateResult,
    SelectServerResult,
    SelectStudentResult,
    SynthesizeResult,
    TrainResult,
)
from stratosd.costmodel.costs import STAGE_PHASE, CostModel
from stratosd.costmodel.model import JobCosting
from stratosd.errors import ConfigError, StratosError
from stratosd.planning import error_words
from stratosd.results import stage_result
from stratosd.score import (
    BASELINE_SELECTORS,
    FIT_HEADROOM,
    GPU_RUNTIME_MIB,
    Candidate,
    finite,
    improvement_pct,
    score_candidates,
)

if TYPE_CHECKING:
    from schemas.commands import RunInfo
    from stratosd.plugins import Plugins

log = structlog.stdlib.get_logger(__name__)

def stage_costs(run: RunInfo) -> dict[str, StageCost]:
    """Each finished phase's estimate vs measurement, by phase, in pipeline order."""
    from schemas.stages import STAGE_RESULTS

    out = {}
    for stage, phase in STAGE_PHASE.items():
        got = stage_result(run, STAGE_RESULTS[stage])
        if got is not None and got.cost is not None:
            out[phase] = got.cost
    return out


def _api_paid(run: RunInfo) -> float | None:
    syn = stage_result(run, SynthesizeResult)
    return None if syn is None else finite(syn.cost_usd)


def measured_metrics(run: RunInfo) -> dict[str, Any]:
    """The run's own measurements, each with where it came from."""
    ev = stage_result(run, EvaluateResult)
    tr = stage_result(run, TrainResult)
    dep = stage_result(run, DeployResult)
    p50, p50_src = (finite(dep.metrics.get("latency_ms_p50")) if dep else None,
                    "deploy: endpoint p50")
    if p50 is None and ev is not None:
        p50 = finite(ev.after.latency_ms_mean)
        p50_src = "evaluate: mean latency after training"
    paid = {p: finite(c.measured_usd) for p, c in stage_costs(run).items()}
    known = {p: v for p, v in paid.items() if v is not None}
    return {
        "accuracy": finite(ev.after.accuracy) if ev else None,
        "train_time_s": finite(tr.train_time_s) if tr else None,
        "serve_latency_ms": p50,
        "serve_latency_source": p50_src if p50 is not None else "missing",
        "synthesis_cost_usd": _api_paid(run) or 0.0,
        "total_usd": sum(known.values()) if known else None,
        "phases_measured": list(known),
    }


def student_fit(run: RunInfo, trained_on: ServerOffer, offer: ServerOffer) -> tuple[bool, str]:
    """Whether the chosen student trains and serves on offer, from select_student's estimates."""
    from plugins.students.candidates import capacity_mib

    stu = stage_result(run, SelectStudentResult)
    cand = None if stu is None else next(
        (c for c in stu.candidates if c.model == stu.chosen), None)
    if cand is None:
        return True, "no memory estimate for the student: assumed to fit"
    need = max(finite(cand.est_train_mem_mib) or 0.0, finite(cand.est_serve_mem_mib) or 0.0)
    src_gpu, dst_gpu = trained_on.gpu_count > 0, offer.gpu_count > 0
    # the estimate was made for the run's server: bf16 + CUDA runtime on GPUs, fp32 on CPU
    if src_gpu and not dst_gpu:
        need = max(need - GPU_RUNTIME_MIB, 0.0) * 2
    elif dst_gpu and not src_gpu:
        need = need / 2 + GPU_RUNTIME_MIB
    cap, what = capacity_mib(offer)
    if need > cap * FIT_HEADROOM:
        return False, (f"student needs ~{need:,.0f} MiB, server has {cap:,.0f} MiB {what} "
                       f"({FIT_HEADROOM:.0%} usable)")
    return True, f"student fits: ~{need:,.0f} MiB of {cap:,.0f} MiB {what}"


@dataclass(frozen=True)
class RunCosting:
    """The cost model as the comparison uses it for one run."""

    model: CostModel
    select: JobCosting | None  # the work stored at server selection: what the selectors saw
    job: JobCosting | None  # the work the run did (chosen student, rows kept): time and $
    learned: bool  # the daemon's learned efficiencies, else the model's priors
    notes: list[str] = field(default_factory=list)


def run_costing(run: RunInfo, plugins: Plugins, costs: CostModel | None = None) -> RunCosting:
    """The run's costings: select_server's stored work, and the work as the run did it."""
    model = costs if costs is not None else CostModel(plugins)
    notes = []
    sel = stage_result(run, SelectServerResult)
    stored = None if sel is None else sel.work
    try:
        done = model.work(run.spec, run)
    except Exception as exc:  # noqa: BLE001 - a missing estimate must not lose the report
        log.warning("report_work_failed", run_id=run.run_id, exc_info=True)
        done = None
        notes.append(f"the run's work could not be re-estimated ({exc}): estimates use the "
                     "work stored at server selection")
    if stored is None and done is None:
        notes.append("no work estimate: the baselines' training time and $ are unknown")
    phases = PHASES if run.spec.deploy else tuple(p for p in PHASES if p != "deploy")
    select = job = None
    if stored is not None or done is not None:
        select = model.costing(run.spec, None, work=stored or done)
        job = model.costing(run.spec, None, phases=phases, work=done or stored)
    if costs is None:
        notes.append("estimates are the cost model's priors: the report was written without "
                     "the daemon's learned efficiencies")
    return RunCosting(model=model, select=select, job=job, learned=costs is not None,
                      notes=notes)


def same_class(a: JobEstimate | None, b: JobEstimate | None) -> bool:
    """Whether the cost model sees two servers alike: same learned keys and the same time."""
    if a is None or b is None or a.seconds is None or b.seconds is None:
        return False
    keys_a = [p.key for p in a.phases if p.billed_on == "server"]
    return (any(keys_a) and keys_a == [p.key for p in b.phases if p.billed_on == "server"]
            and math.isclose(a.seconds.value, b.seconds.value, rel_tol=1e-6))


def job_cost(costs: Mapping[str, StageCost], est: JobEstimate | None, price: float,
             run_price: float) -> tuple[float | None, list[str]]:
    """$ of the whole job on a server the run's measurements stand for (its own, or one the
    model sees alike): each measured phase's $ at this server's $/h, the estimate for the
    phases not measured; (None, ...) when a phase has neither. Returns the estimated phases."""
    by_phase = {p.phase: p for p in est.phases} if est is not None else {}
    wanted = [p for p in PHASES if p in by_phase or p in costs]
    total, estimated = 0.0, []
    for phase in wanted:
        cost = costs.get(phase)
        usd = None if cost is None else finite(cost.measured_usd)
        secs = None if cost is None else finite(cost.measured_s)
        if usd is not None and secs is not None:
            total += usd + secs / 3600.0 * (price - run_price)  # the API $ stays as measured
            continue
        if phase not in by_phase:
            return None, [phase]
        total += by_phase[phase].usd.value
        api = by_phase.get("synthesis-api")
        if phase == "synthesis" and api is not None:
            total += api.usd.value
        estimated.append(phase)
    return (total if wanted else None), estimated


def pick_metrics(run: RunInfo, rc: RunCosting, measured: dict[str, Any],
                 trained_on: ServerOffer, offer: ServerOffer) -> dict[str, Any]:
    """Score metrics of one pick: measured on the run's server, else the cost model's."""
    fits, fit_note = student_fit(run, trained_on, offer)
    est = rc.job.estimate(offer) if rc.job is not None else None
    ref = rc.job.estimate(trained_on) if rc.job is not None else None
    usd = None if est is None else with_api_paid(est, _api_paid(run))
    loop = (rc.model.loop_estimate(rc.job.work, offer, run.spec.est_train_hours)
            if rc.job is not None else None)
    own = offer.id == trained_on.id
    alike = not own and same_class(est, ref)
    if own or alike:
        train_s = measured["train_time_s"]
        train_basis = "measured" if train_s is not None else "estimated"
        if train_s is None and loop is not None:
            train_s = loop.value
        cost, cost_est = job_cost(stage_costs(run), est, offer.price_usd_per_hour,
                                  trained_on.price_usd_per_hour)
        basis = "measured" if own else f"measured on {trained_on.id} (same class)"
    else:
        train_s, train_basis = (None if loop is None else loop.value), "estimated"
        cost = None if usd is None else usd.value
        cost_est = [] if est is None else [p.phase for p in est.phases
                                           if p.billed_on == "server"]
        basis = "estimated"
    if basis == "estimated":
        provenance = ("estimated: no work estimate" if est is None or est.seconds is None
                      else f"estimated {error_words(est.seconds)}")
    else:
        provenance = basis + (f"; $ of {', '.join(cost_est)} estimated" if cost_est else "")
        if train_basis == "estimated":
            provenance += "; training time estimated"
    return {
        "accuracy": measured["accuracy"],
        "train_time_s": train_s, "cost_usd": cost,
        "latency_ms": offer.latency_ms if offer.latency_known else None,
        "feasible": fits, "fit": fit_note, "measured": own or alike, "basis": basis,
        "provenance": provenance, "cost_phases_estimated": cost_est,
        "estimate": {"train_time_s": _plain(loop),
                     "cost_usd": _plain(usd),
                     "seconds": None if est is None else _plain(est.seconds)},
    }


def with_api_paid(est: JobEstimate, paid: float | None) -> Estimate | None:
    """The job's $ with the API teacher's $ as the run measured it (the same on any server)."""
    usd = est.usd
    if usd is None or paid is None:
        return usd
    api = [p.usd for p in est.phases if p.billed_on == "api"]
    return msgspec.structs.replace(
        usd, value=usd.value - sum(a.value for a in api) + paid,
        low=usd.low - sum(a.low for a in api) + paid,
        high=usd.high - sum(a.high for a in api) + paid)


def _plain(est: Estimate | None) -> dict[str, Any] | None:
    return None if est is None else dict(msgspec.to_builtins(est))


def baseline_picks(run: RunInfo, plugins: Plugins, offers: list[ServerOffer],
                   costing: JobCosting | None) -> list[tuple[str, str, ServerOffer | None, str]]:
    """Each built-in baseline selector's pick from the same offers with the same costing."""
    picks: list[tuple[str, str, ServerOffer | None, str]] = []
    for name in BASELINE_SELECTORS:
        if name == run.spec.selector or name not in plugins.selectors:
            continue
        try:
            got = plugins.selectors.get(name)().select(
                offers, run.spec.constraints, costing=costing, seed=run.spec.seed)
            picks.append((name, "baseline", got.chosen, got.explanation))
        except StratosError as exc:  # e.g. Infeasible: the baseline has no pick either
            picks.append((name, "baseline", None, f"no pick: {exc.message}"))
        except Exception as exc:  # noqa: BLE001 - a broken baseline must not lose the score
            log.warning("baseline_selector_failed", selector=name, exc_info=True)
            picks.append((name, "baseline", None, f"selector failed: {exc!r}"))
    return picks


def agreement(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """A plain sentence when the selectors' picks leave nothing to compare, else None."""
    picked = [r for r in rows if r.get("server")]
    if len(picked) < 2:
        return None
    servers = sorted({str(r["server"]) for r in picked})
    none = [str(r["selector"]) for r in rows if not r.get("server")]
    tail = f" ({', '.join(none)} made no pick)" if none else ""
    if len(servers) == 1:
        return f"every selector picked {servers[0]}: nothing to compare on this fleet{tail}"
    keys = ("feasible", "accuracy", "latency_ms", "train_time_s", "cost_usd")
    if len(picked) == len(rows) and all(
            all(r.get(k) == picked[0].get(k) for k in keys) for r in picked):
        return (f"every selector's pick ({', '.join(servers)}) has the same numbers on every "
                "metric: nothing to compare on this fleet")
    return None


def off_interval(rc: RunCosting, measured: dict[str, Any], trained_on: ServerOffer,
                 given: float | None) -> list[str]:
    """A warning when the run's own training time fell outside the model's 90% interval."""
    secs = measured["train_time_s"]
    if rc.job is None or secs is None:
        return []
    est = rc.model.loop_estimate(rc.job.work, trained_on, given)
    if est.low <= secs <= est.high or est.value <= 0:
        return []
    return [f"on {trained_on.id} the training loop took {secs / est.value:.2g}x the cost "
            f"model's estimate ({est.describe()}), outside its 90% interval: the other "
            "servers' estimates may be off by as much"]


ACCURACY_NOTE = (
    "Accuracy does not separate the servers in this comparison: the same student trained on "
    "the same data reaches the same accuracy on any server where it fits, so every feasible "
    "pick gets the run's measured accuracy (its score term is the same for all). A server "
    "where the student does not fit (select_student's memory estimate) is infeasible.")


def compare_selectors(run: RunInfo, plugins: Plugins, costs: CostModel | None = None, *,
                      rc: RunCosting | None = None) -> dict[str, Any]:
    """The run's pick and each baseline's pick on the same fleet, scored together."""
    sel = stage_result(run, SelectServerResult)
    if sel is None or not sel.offers:
        return {"available": False, "reason": "select_server stored no offers or no pick"}
    offers, chosen = sel.offers, sel.selection.chosen
    rc = rc or run_costing(run, plugins, costs)
    trained_on, notes = chosen, list(rc.notes)
    agent = run.progress.get("agent_id")
    if agent and agent != chosen.agent_id:
        moved = next((o for o in offers if o.agent_id == agent), None)
        if moved is not None:
            trained_on = moved
            notes.append(f"the run moved from {chosen.id} to {moved.id} after a failure; "
                         "measurements are from the latter")
    own = run.spec.selector
    picks = [(own, "stratos", trained_on, sel.selection.explanation),
             *baseline_picks(run, plugins, offers, rc.select)]
    measured = measured_metrics(run)
    notes += off_interval(rc, measured, trained_on, run.spec.est_train_hours)
    servers = [o for _n, _r, o, _e in picks if o is not None]
    tflops: dict[str, float] = {}
    if rc.job is not None and servers:  # the training TFLOP/s the job gets there
        hw = rc.job.columns(servers).hardware
        tflops = {o.id: float(h) for o, h in zip(servers, hw, strict=True)}
    rows, cands = [], []
    for name, role, offer, why in picks:
        row: dict[str, Any] = {"selector": name, "role": role, "explanation": why}
        if offer is None:
            row.update(server=None, feasible=False, fit=why, basis="no pick", provenance=why)
            cands.append(Candidate(name=name, feasible=False, note=why))
            rows.append(row)
            continue
        d = pick_metrics(run, rc, measured, trained_on, offer)
        row.update(server=offer.id, gpu_model=offer.gpu_model, gpu_count=offer.gpu_count,
                   hardware_tflops=tflops.get(offer.id),
                   price_usd_per_hour=offer.price_usd_per_hour,
                   network_latency_ms=offer.latency_ms, **d)
        cands.append(Candidate(name=name, accuracy=d["accuracy"], latency=d["latency_ms"],
                               train_time=d["train_time_s"], cost=d["cost_usd"],
                               feasible=d["feasible"], note=d["fit"]))
        rows.append(row)
    try:
        table = score_candidates(cands, run.spec.score)
    except ConfigError as exc:
        notes.append(f"{exc.message}: equal weights used instead")
        table = score_candidates(cands, None)
    for row, scored in zip(rows, table.rows, strict=True):
        row["terms"], row["score"] = scored.terms, scored.score
    agree = agreement(rows)
    best = table.best(exclude=[own])
    mine = table.by_name(own).score
    return {
        "available": True, "selector": own, "trained_on": trained_on.id,
        "measured": measured, "rows": rows, "score": table.to_dict(), "stratos_score": mine,
        "best_baseline": None if best is None else best.candidate.name,
        "best_baseline_score": None if best is None else best.score,
        "improvement_pct": None if agree else improvement_pct(
            mine, None if best is None else best.score),
        "all_agree": agree is not None, "agreement": agree, "accuracy_note": ACCURACY_NOTE,
        "cost_model": {"learned": rc.learned,
                       "work_student": None if rc.job is None else rc.job.work.student},
        "notes": notes,
    }
