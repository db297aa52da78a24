"""A tenant's `budget_usd`, checked with the core cost model before any training.

The work of one tenant is a set of agent steps, each a child process: the probe (already run
when the check happens: counted as spent), then per round one `tenant_train` per track (two
with the alone baseline) and one `tenant_apply`, then one `tenant_evaluate` per track. Each is
priced by `stratosd.costmodel` on the tenant's agent offer (`Fleet.offer`): a `JobWork` built
from the candidate's shape (`costmodel.work.model_shape`) and the tenant's signature (rows and
mean lengths: aggregates, never the data), priced by `JobCosting.estimate(offer)` with the
learned efficiencies of the daemon's `CostModel`. A candidate whose estimate is over the
budget is not picked (like a size limit); when none fits, the tenant is refused with the
numbers.

During the rounds the spend is *measured*: each tenant step's seconds on its agent (from its
acceptance to its outcome) x the agent's price at its end, as the core cost model meters a
stage (`CostModel.stage_cost`: measured_s / 3600 x price_usd_per_hour). At every round
boundary `next_round` compares measured spend + the next round + the evaluation with the
budget; a tenant that would exceed it stops its rounds there (`tenant_budget_stopped`), keeps
what it trained, and is evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas.costs import JobEstimate, JobWork
from schemas.specs import ServerOffer
from schemas.tenants import TenantBudget, TenantJob, TenantSignature
from stratosd.costmodel.learn import EfficiencyBook
from stratosd.costmodel.model import JobCosting
from stratosd.costmodel.work import BPE_TOKENS_PER_CHAR, BYTES, Shape, model_shape
from stratosd.errors import ConfigError

BATCH = 8  # the lora-sft trainer's default per-device batch (plugins.trainers.hparams)
PROMPT_CHARS = 32  # the jsonl-qa prompt template and "Answer: " around question and answer
EVAL_NEW_TOKENS = 12  # tenant_evaluate's max_new_tokens


@dataclass(frozen=True)
class Priced:
    """Central, low and high USD of some steps, and how they were counted."""

    usd: float
    low: float
    high: float
    basis: str

    def __add__(self, other: Priced) -> Priced:
        return Priced(self.usd + other.usd, self.low + other.low, self.high + other.high,
                      f"{self.basis}; {other.basis}" if self.basis else other.basis)


def shape_of(model: str, params: int = 0) -> Shape:
    """The model's shape from its ref; a ref only its agent can open (a local path there) is
    shaped from the parameter count the agent measured."""
    try:
        return model_shape(model)
    except ConfigError:
        if params <= 0:
            raise
        hidden = max(64, int(round((params / 12 / 24) ** 0.5 / 64)) * 64)
        layers = max(2, int(params / (12 * hidden * hidden)))
        return Shape(float(params), hidden, layers, 32_000, BPE_TOKENS_PER_CHAR,
                     f"{params} parameters counted on the agent (shape guessed)")


def _work(student: str, *, params: int, steps: int, lora_r: int, row_tokens: float,
          eval_prompts: int, trainer: str) -> JobWork:
    shape = shape_of(student, params)
    trainable = float(lora_r * shape.layers * 12 * shape.hidden)
    return JobWork(
        student=student, params=shape.params, trainable_params=trainable,
        weight_bytes=shape.params * BYTES["fp32"], hidden=shape.hidden, layers=shape.layers,
        seq_tokens=row_tokens, trainer=trainer, train_tokens=float(steps * BATCH * row_tokens),
        train_steps=steps, eval_prompts=eval_prompts,
        eval_new_tokens=float(eval_prompts * EVAL_NEW_TOKENS),
        artifact_bytes=trainable * BYTES["fp32"])


def _price(est: JobEstimate, times: int, what: str) -> Priced:
    u, secs = est.usd, est.seconds
    if u is None or secs is None:  # the cost model always fills both; never 0 by accident
        raise ConfigError(f"the cost model gave no estimate for {what} on {est.server}",
                          hint="report this as a bug")
    return Priced(u.value * times, u.low * times, u.high * times,
                  f"{times} x {what} ${u.value:.4g} ({secs.value:.0f} s, {u.source})")


def row_tokens(student: str, sig: TenantSignature | None, params: int = 0) -> float:
    """Tokens per training row, from the signature's mean lengths (aggregates)."""
    chars = PROMPT_CHARS + (sig.mean_question_chars + sig.mean_answer_chars if sig else 64.0)
    return chars * shape_of(student, params).tokens_per_char + 2


def probe_cost(spec: TenantJob, sig: TenantSignature | None, offer: ServerOffer,
               book: EfficiencyBook, params: Mapping[str, int]) -> Priced:
    """The probe step on this tenant: a short fit and an evaluation per measured candidate."""
    st = spec.students
    total = Priced(0.0, 0.0, 0.0, "")
    for model in st.measure or st.candidates:
        n = params.get(model, 0)
        w = _work(model, params=n, steps=st.fit_steps, lora_r=spec.aggregation.lora_r,
                  row_tokens=row_tokens(model, sig, n), eval_prompts=st.probe_size,
                  trainer=spec.trainer)
        phases = ("train", "evaluate") if st.fit_steps else ("evaluate",)
        total = total + _price(JobCosting(w, book, phases=phases).estimate(offer), 1,
                               f"probe of {model}")
    return total


def _unit_costs(spec: TenantJob, student: str, sig: TenantSignature | None,
                offer: ServerOffer, book: EfficiencyBook, params: int
                ) -> tuple[JobEstimate, JobEstimate, JobEstimate, int]:
    """One tenant_train, one tenant_apply, one tenant_evaluate on student, and n_test."""
    agg = spec.aggregation
    rt = row_tokens(student, sig, params)
    kw: dict[str, Any] = {"params": params, "lora_r": agg.lora_r, "row_tokens": rt,
                          "trainer": spec.trainer}
    train = _work(student, steps=agg.local_steps, eval_prompts=0, **kw)
    apply = _work(student, steps=0, eval_prompts=0, **kw)
    n_test = spec.eval_limit if sig is None else min(
        spec.eval_limit, max(1, round(sig.n_examples * 0.25)))
    ev = _work(student, steps=0, eval_prompts=n_test, **kw)
    return (JobCosting(train, book, phases=("train",)).estimate(offer),
            JobCosting(apply, book, phases=("train",)).estimate(offer),
            JobCosting(ev, book, phases=("evaluate",)).estimate(offer), n_test)


def tenant_cost(spec: TenantJob, student: str, sig: TenantSignature | None,
                offer: ServerOffer, book: EfficiencyBook, rounds_left: int,
                params: int = 0) -> Priced:
    """What is left for this tenant on student: rounds x tracks, applies, evaluations."""
    agg = spec.aggregation
    tracks = 2 if spec.alone_baseline else 1
    train, apply, ev, n_test = _unit_costs(spec, student, sig, offer, book, params)
    return (_price(train, rounds_left * tracks, f"tenant_train ({agg.local_steps} steps)")
            + _price(apply, rounds_left, "tenant_apply (start-up, merge)")
            + _price(ev, tracks, f"tenant_evaluate ({n_test} rows)"))


@dataclass(frozen=True)
class RoundCheck:
    """The check at a round boundary: measured spend + the next round + the evaluation."""

    fits: bool
    spent_usd: float
    next_round_usd: float
    eval_usd: float
    budget_usd: float
    reason: str

    @property
    def projected_usd(self) -> float:
        """What the tenant would have spent after the next round and its evaluation."""
        return self.spent_usd + self.next_round_usd + self.eval_usd


def next_round(spec: TenantJob, budget_usd: float, spent_usd: float, last_round_usd: float,
               student: str, sig: TenantSignature | None, offer: ServerOffer,
               book: EfficiencyBook, params: int = 0) -> RoundCheck:
    """May the tenant start one more round? Its measured spend, plus the next round (the
    larger of the cost model's estimate and what its last round measured), plus its
    evaluation (estimated: it runs after the last round) must stay within budget_usd."""
    tracks = 2 if spec.alone_baseline else 1
    train, apply, ev, n_test = _unit_costs(spec, student, sig, offer, book, params)
    est_round = (_price(train, tracks, "tenant_train") + _price(apply, 1, "tenant_apply")).usd
    nxt = max(est_round, last_round_usd)
    how = "as its last round measured" if last_round_usd >= est_round else "estimated"
    ev_usd = _price(ev, tracks, f"tenant_evaluate ({n_test} rows)").usd
    check = RoundCheck(fits=True, spent_usd=spent_usd, next_round_usd=nxt, eval_usd=ev_usd,
                       budget_usd=budget_usd, reason="")
    reason = (f"measured spend ${spent_usd:.4g} + next round ${nxt:.4g} ({how}) + evaluation "
              f"${ev_usd:.4g} (estimated) = ${check.projected_usd:.4g} "
              f"{'>' if check.projected_usd > budget_usd else '<='} budget_usd "
              f"${budget_usd:g} at ${offer.price_usd_per_hour:g}/h")
    return RoundCheck(fits=check.projected_usd <= budget_usd, spent_usd=spent_usd,
                      next_round_usd=nxt, eval_usd=ev_usd, budget_usd=budget_usd,
                      reason=reason)


def check(spec: TenantJob, budget_usd: float, candidates: Mapping[str, int],
          sig: TenantSignature | None, offer: ServerOffer, book: EfficiencyBook,
          rounds_left: int) -> dict[str, TenantBudget]:
    """Each candidate's verdict (candidates: model → parameters counted on the agent):
    the probe (spent) + what is left, against the budget."""
    spent = probe_cost(spec, sig, offer, book, candidates)
    out: dict[str, TenantBudget] = {}
    for model, params in candidates.items():
        total = spent + tenant_cost(spec, model, sig, offer, book, rounds_left, params)
        out[model] = TenantBudget(
            budget_usd=budget_usd, estimate_usd=round(total.usd, 6), low_usd=round(total.low, 6),
            high_usd=round(total.high, 6), probe_usd=round(spent.usd, 6),
            price_usd_per_hour=offer.price_usd_per_hour, student=model,
            basis=f"on {offer.id} at ${offer.price_usd_per_hour:g}/h: {total.basis}",
            fits=total.usd <= budget_usd)
    return out


def why_over(b: TenantBudget) -> str:
    """The refusal in numbers."""
    return (f"estimated ${b.estimate_usd:.4g} (range ${b.low_usd:.4g}-${b.high_usd:.4g}, of "
            f"which probe ${b.probe_usd:.4g} spent) > budget_usd ${b.budget_usd:g} at "
            f"${b.price_usd_per_hour:g}/h")
