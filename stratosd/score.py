"""The multi-objective deployment score (PAPER.md) and the same-fleet comparison it scores.

For the candidates compared on the same fleet, each metric is min-max normalised over those
candidates into a "goodness" in [0, 1], 1 = best::

    accuracy (higher is better):  n_acc(i) = (acc(i) - min acc) / (max acc - min acc)
    latency, train_time, cost     n_m(i)   = (max m - m(i)) / (max m - min m)
    (lower is better):

    score(i) = (w_acc * n_acc(i) + w_lat * n_lat(i) + w_time * n_time(i) + w_cost * n_cost(i))
               / (w_acc + w_lat + w_time + w_cost)

so score(i) is in [0, 1]. Weights come from the job (`RunSpec.score`), 1.0 each by default.

Degenerate case: when every candidate has the same value of a metric (max = min, e.g. the
same student accuracy everywhere, or $0/h on every local host), nothing separates them on it
and the term counts as 1 for all of them; the weight stays in the denominator, so such a metric
lifts every score by the same amount and never changes the ranking.

A metric no candidate has a value for (e.g. no serving latency because deployment was
skipped) is left out: its weight leaves the sum, and the result says so in `dropped`.
Infeasible candidates (e.g. the student does not fit the server) get no score and do not take
part in the normalisation; with no metric left to compare, no candidate gets a score.

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
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import numpy as np
import structlog

from schemas.costs import PHASES, Estimate, JobEstimate, JobWork
from schemas.specs import ServerOffer
from stratosd.costmodel.costs import STAGE_PHASE, CostModel
from stratosd.costmodel.model import JobCosting
from stratosd.errors import ConfigError, StratosError
from stratosd.planning import error_words

if TYPE_CHECKING:
    from schemas.commands import RunInfo
    from stratosd.plugins import Plugins

log = structlog.stdlib.get_logger(__name__)
T = TypeVar("T")

METRICS: tuple[str, ...] = ("accuracy", "latency", "train_time", "cost")
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True, "latency": False, "train_time": False, "cost": False,
}
UNITS: dict[str, str] = {
    "accuracy": "fraction", "latency": "ms", "train_time": "s", "cost": "USD",
}
BASELINE_SELECTORS: tuple[str, ...] = (
    "hardware-first", "cost-first", "latency-first", "random", "weighted-sum",
)
FIT_HEADROOM = 0.9  # same usable share of memory as plugins.students.candidates.fit
GPU_RUNTIME_MIB = 600.0  # CUDA context, as in plugins.students.candidates
DEGENERATE_TERM = 1.0
FORMULA = (
    "score = sum_m w_m * n_m / sum_m w_m over m in {accuracy, latency, train_time, cost}; "
    "n_accuracy = (a - min a) / (max a - min a); "
    "n_m = (max m - m) / (max m - min m) for latency, train_time, cost "
    "(min/max over the feasible candidates; n_m = 1 for all when max m = min m)"
)


@dataclass(frozen=True)
class Candidate:
    """One option compared by the score: raw metric values (None = unknown)."""

    name: str
    accuracy: float | None = None
    latency: float | None = None  # ms
    train_time: float | None = None  # s
    cost: float | None = None  # USD
    feasible: bool = True
    note: str = ""

    def value(self, metric: str) -> float | None:
        """The raw value of one metric."""
        v = getattr(self, metric)
        return None if v is None else float(v)


@dataclass(frozen=True)
class ScoredCandidate:
    """A candidate with its normalised terms and score (None when infeasible)."""

    candidate: Candidate
    terms: dict[str, float]
    score: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        c = self.candidate
        return {
            "name": c.name, "feasible": c.feasible, "note": c.note,
            "raw": {m: c.value(m) for m in METRICS},
            "terms": dict(self.terms), "score": self.score,
        }


@dataclass(frozen=True)
class ScoreTable:
    """The result: scored candidates, the weights used and the formula as text."""

    rows: list[ScoredCandidate]
    weights: dict[str, float]
    ranges: dict[str, tuple[float, float]]
    degenerate: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    formula: str = FORMULA

    def by_name(self, name: str) -> ScoredCandidate:
        """The row of one candidate."""
        for row in self.rows:
            if row.candidate.name == name:
                return row
        raise KeyError(name)

    def best(self, exclude: Sequence[str] = ()) -> ScoredCandidate | None:
        """The highest-scoring feasible row (first wins ties), ignoring names in exclude."""
        scored = [r for r in self.rows
                  if r.score is not None and r.candidate.name not in exclude]
        return max(scored, key=lambda r: r.score or 0.0) if scored else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: everything needed to recompute each score by hand."""
        return {
            "formula": self.formula,
            "weights": dict(self.weights),
            "metrics": {m: {"higher_is_better": HIGHER_IS_BETTER[m], "unit": UNITS[m]}
                        for m in METRICS},
            "ranges": {m: {"min": lo, "max": hi} for m, (lo, hi) in self.ranges.items()},
            "degenerate": list(self.degenerate),
            "degenerate_rule": f"all candidates equal on a metric: its term is "
                               f"{DEGENERATE_TERM:g} for all of them",
            "dropped": list(self.dropped),
            "rows": [r.to_dict() for r in self.rows],
        }


def weights_dict(weights: Mapping[str, float] | Any | None) -> dict[str, float]:
    """Weights from a mapping or a ScoreWeights struct; missing ones are 1.0."""
    if weights is None:
        return dict.fromkeys(METRICS, 1.0)
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(METRICS)
        if unknown:
            raise ConfigError(f"unknown score weight(s): {', '.join(sorted(unknown))}",
                              hint=f"weights are {', '.join(METRICS)}", field="score")
        raw = {m: weights.get(m, 1.0) for m in METRICS}
    else:
        raw = {m: getattr(weights, m, 1.0) for m in METRICS}
    out = {}
    for m, w in raw.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"score weight {m} must be a finite number >= 0, got {w!r}",
                              hint="e.g. [score] accuracy = 2.0", field=f"score.{m}")
        out[m] = float(w)
    return out


def normalised_terms(values: Sequence[float], higher_is_better: bool) -> tuple[np.ndarray, bool]:
    """Min-max goodness in [0, 1] (1 = best) and whether the metric was degenerate."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:  # exact: min-max of values that differ at all is well defined
        return np.full(len(v), DEGENERATE_TERM), True
    n = (v - lo) / (hi - lo) if higher_is_better else (hi - v) / (hi - lo)
    return np.clip(n, 0.0, 1.0), False


def score_candidates(
    candidates: Sequence[Candidate], weights: Mapping[str, float] | Any | None = None
) -> ScoreTable:
    """Score the candidates against each other (see the module docstring for the formula)."""
    w = weights_dict(weights)
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    feasible = [c for c in candidates if c.feasible]
    used, dropped, degenerate = [], [], []
    ranges: dict[str, tuple[float, float]] = {}
    columns: dict[str, np.ndarray] = {}
    for m in METRICS:
        vals = [c.value(m) for c in feasible]
        known = [v for v in vals if v is not None and math.isfinite(v)]
        if not feasible or len(known) < len(vals):
            if feasible:
                dropped.append(m)  # a term some candidate lacks cannot be compared fairly
            continue
        col, flat = normalised_terms(known, HIGHER_IS_BETTER[m])
        columns[m] = col
        ranges[m] = (min(known), max(known))
        used.append(m)
        if flat:
            degenerate.append(m)
    total = sum(w[m] for m in used)
    if used and total <= 0:
        raise ConfigError(
            "the score weights of the metrics that can be compared sum to 0 "
            f"(weights {w}, metrics {used})",
            hint="give at least one of accuracy, latency, train_time, cost a weight > 0",
            field="score",
        )
    rows: list[ScoredCandidate] = []
    j = 0
    for c in candidates:
        if not c.feasible:
            rows.append(ScoredCandidate(candidate=c, terms={}, score=None))
            continue
        terms = {m: float(columns[m][j]) for m in used}
        s = sum(w[m] * terms[m] for m in used) / total if used else None
        rows.append(ScoredCandidate(candidate=c, terms=terms,
                                    score=None if s is None else float(min(max(s, 0.0), 1.0))))
        j += 1
    return ScoreTable(rows=rows, weights=w, ranges=ranges, degenerate=degenerate,
                      dropped=dropped)


def improvement_pct(score: float | None, baseline: float | None) -> float | None:
    """Relative gain of score over baseline in %; None when either is unknown or baseline is 0."""
    if score is None or baseline is None or baseline <= 0:
        return None
    return (score - baseline) / baseline * 100.0


# --- the same-fleet comparison ------------------------------------------------------------


def stage_result(run: RunInfo, stage: str) -> dict[str, Any]:
    """A stage's result as a dict ({} when missing or malformed)."""
    value = run.results.get(stage)
    return dict(value) if isinstance(value, dict) else {}


def sub_dict(data: dict[str, Any], key: str) -> dict[str, Any]:
    """data[key] when it is a dict, else {} (stage results are plain JSON data)."""
    value = data.get(key)
    return dict(value) if isinstance(value, dict) else {}


def finite(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def decode(value: Any, typ: type[T]) -> T | None:
    """A struct from plain stage data, or None when it is missing or does not decode."""
    if value is None:
        return None
    try:
        return msgspec.convert(value, typ)
    except (msgspec.ValidationError, TypeError):
        return None


def as_offer(value: Any) -> ServerOffer | None:
    """A ServerOffer from plain data, or None when it does not decode."""
    return decode(value, ServerOffer)


def stage_costs(run: RunInfo) -> dict[str, dict[str, Any]]:
    """Each finished phase's `cost` (a StageCost as plain data), by phase, in pipeline order."""
    out = {}
    for stage, phase in STAGE_PHASE.items():
        cost = sub_dict(stage_result(run, stage), "cost")
        if cost:
            out[phase] = cost
    return out


def measured_metrics(run: RunInfo) -> dict[str, Any]:
    """The run's own measurements, each with where it came from."""
    ev, tr, dep = (stage_result(run, s) for s in ("evaluate", "train", "deploy"))
    after = sub_dict(ev, "after")
    metrics = sub_dict(dep, "metrics")
    p50, p50_src = finite(metrics.get("latency_ms_p50")), "deploy: endpoint p50"
    if p50 is None:
        p50 = finite(after.get("latency_ms_mean"))
        p50_src = "evaluate: mean latency after training"
    paid = {p: finite(c.get("measured_usd")) for p, c in stage_costs(run).items()}
    known = {p: v for p, v in paid.items() if v is not None}
    return {
        "accuracy": finite(after.get("accuracy")),
        "train_time_s": finite(tr.get("train_time_s")),
        "serve_latency_ms": p50,
        "serve_latency_source": p50_src if p50 is not None else "missing",
        "synthesis_cost_usd": finite(stage_result(run, "synthesize").get("cost_usd")) or 0.0,
        "total_usd": sum(known.values()) if known else None,
        "phases_measured": list(known),
    }


def student_fit(run: RunInfo, trained_on: ServerOffer, offer: ServerOffer) -> tuple[bool, str]:
    """Whether the chosen student trains and serves on offer, from select_student's estimates."""
    from plugins.students.candidates import capacity_mib

    stu = stage_result(run, "select_student")
    chosen = stu.get("chosen")
    cand = next((c for c in stu.get("candidates", []) or []
                 if isinstance(c, dict) and c.get("model") == chosen), None)
    if cand is None:
        return True, "no memory estimate for the student: assumed to fit"
    need = max(finite(cand.get("est_train_mem_mib")) or 0.0,
               finite(cand.get("est_serve_mem_mib")) or 0.0)
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
    stored = decode(stage_result(run, "select_server").get("work"), JobWork)
    try:
        done: JobWork | None = model.work(run.spec, run)
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


def job_cost(costs: Mapping[str, Mapping[str, Any]], est: JobEstimate | None, price: float,
             run_price: float) -> tuple[float | None, list[str]]:
    """$ of the whole job on a server the run's measurements stand for (its own, or one the
    model sees alike): each measured phase's $ at this server's $/h, the estimate for the
    phases not measured; (None, ...) when a phase has neither. Returns the estimated phases."""
    by_phase = {p.phase: p for p in est.phases} if est is not None else {}
    wanted = [p for p in PHASES if p in by_phase or p in costs]
    total, estimated = 0.0, []
    for phase in wanted:
        cost = costs.get(phase, {})
        usd, secs = finite(cost.get("measured_usd")), finite(cost.get("measured_s"))
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
    usd = None if est is None else with_api_paid(est, finite(
        stage_result(run, "synthesize").get("cost_usd")))
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
    sel = stage_result(run, "select_server")
    offers = [o for o in (as_offer(x) for x in sel.get("offers", []) or []) if o is not None]
    selection = sub_dict(sel, "selection")
    chosen = as_offer(selection.get("chosen"))
    if chosen is None or not offers:
        return {"available": False, "reason": "select_server stored no offers or no pick"}
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
    picks = [(own, "stratos", trained_on, str(selection.get("explanation", ""))),
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
