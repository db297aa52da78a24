"""Time and $ of a job on each server: work ÷ (measured speed × learned efficiency) + fixed.

Per phase, on one server (speeds per device from `capacity.offer_speed`, work from
`work.estimate_work`, efficiency = PRIOR_MFU x the learned correction of `learn`):

    train      FLOPs = T x (6P + 6 L h s)          full SFT, GRPO's training part
               FLOPs = T x (4P + 6 P_lora + 6 L h s)   LoRA (no weight gradients for frozen P)
               T counts GRPO's SFT warm start too (its tokens train the same weights, LoRA or
               full, on rows of the same length)
               seconds = FLOPs / (TFLOP/s x 1e12 x ranks x scaling efficiency(ranks) x MFU)
               + optimizer steps x TRAIN_STEP_OVERHEAD_S (framework, optimizer and small-op
               costs no FLOP count sees: most of a tiny student's step on CPU; the warm
               start's steps included)
               + GRPO rollouts (decode, below) + a child's start-up and checkpoint uploads
    decode     per step: max(weight bytes / memory bandwidth, 2P x batch / FLOP/s) / MFU_DECODE
               + L x DECODE_LAYER_S + DECODE_STEP_S (generate()'s own per-token cost: eager
               generation runs a dozen small ops per layer for each new token, which outweigh
               a tiny model's FLOPs on CPU), steps = new tokens per sequence x batches
    synthesis  local teacher: decode with the teacher's size; remote API: tokens ÷ the teacher's
               probe-measured tokens/s (else API_TOKENS_PER_S) ÷ concurrency
    evaluate   decode of the test prompts (before and after training)
    probe, prescreen, deploy: start-up + a few generations, learned per server class
    fixed      STARTUP_S per step child (imports, model load) + bytes ÷ disk/upload rates

Ranks: the devices the trainer launches ranks on (JobWork.devices, capped by the server's);
scaling efficiency = N ranks' throughput / (N x one rank's): a prior per device kind and rank
count (bench/bench_scaling.py), corrected by what past runs with that many ranks measured
(`learn` record `...scaling{N}`), never a fixed exponent.

T: training tokens; P: parameters; L, h: layers, width; s: tokens per sequence (the attention
term, causal: half of the 12 L h s of a full matrix). The whole job's time is the sum of the
phases it will still run; $ = seconds x $/h of the server + per-token $ of an API teacher.
Every number is an `Estimate` whose interval comes from the learned spread (`learn`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np
from numpy.typing import NDArray

from schemas.costs import PHASES, Estimate, EstimateSource, JobEstimate, JobWork, PhaseCost
from schemas.specs import ServerOffer
from stratosd.costmodel.capacity import Speed, job_threads, offer_speed
from stratosd.costmodel.learn import PRIOR, Correction, EfficiencyBook, key
from stratosd.offers import OfferTable, hardware_kind

FloatArray = NDArray[np.float64]

TINY_PARAMS = 50_000_000  # plugins.trainers.hparams.TINY_MAX_PARAMS: 1 CPU thread by default
# CPU priors: bench/bench_mfu.py fits step seconds = overhead + FLOPs / (matmul rate x MFU)
# over four students of 0.14M-3.8M parameters (full SFT, 1 thread, the demo's rows): MFU 0.60,
# overhead 47 ms per optimizer step, residuals within 5%. GPU values are typical bf16 figures
# (not measured here), lower for small models that cannot fill the device.
PRIOR_MFU_CPU = 0.6
TRAIN_STEP_OVERHEAD_S = {"cpu": 0.047, "gpu": 0.03}
PRIOR_MFU_GPU = {"<10M": 0.02, "10M-100M": 0.08, "100M-1B": 0.25, "1B-10B": 0.35,
                 ">10B": 0.4}
# Decode on CPU: bench/bench_mfu.py --part decode (4 students of 2-6 layers, batches 8-20, 1
# thread), the mean of two runs on an idle 2-core VM: 0.66 and 0.50 ms per layer, MFU 0.155
# and 0.139, residuals within -16..+41%. GPU: stated priors, not measured (no GPU lent yet).
MFU_DECODE = {"cpu": 0.147, "gpu": 0.5}
DECODE_LAYER_S = {"cpu": 0.00058, "gpu": 0.0}
DECODE_STEP_S = {"cpu": 0.0, "gpu": 0.02}
# A step child's start-up and model load: CPU measured by bench/bench_mfu.py --part startup
# (median 4.63 s over 4 students x 3 runs, 4.30-5.32 s); GPU a stated prior, not measured.
STARTUP_S = {"cpu": 4.6, "gpu": 25.0}
API_TOKENS_PER_S = 40.0  # one request's output speed when the probe measured none
API_CONCURRENCY = 8
PROBE_GENERATIONS = 16
PRESCREEN_STEPS = 20
DEPLOY_REQUESTS = 8
DEPLOY_TOKENS = 32
EVAL_BATCH = 16
# Scaling efficiency priors by device kind and rank count: N ranks' tokens/s / (N x 1 rank's).
# CPU: bench_scaling.py, 2 ranks x 1 thread on a 2-core dev VM (loaded: see the bench's note);
# GPU: typical data-parallel figures for one server (NVLink/PCIe all-reduce), until measured.
# A rank count missing from a table takes its largest entry's per-doubling loss further.
PRIOR_SCALING: dict[str, dict[int, float]] = {
    "cpu": {1: 1.0, 2: 0.8},
    "gpu": {1: 1.0, 2: 0.93, 4: 0.9, 8: 0.85},
}
# A training time the user gives (est_train_hours) covers the training alone: provisioning,
# image and model download and loading come on top, and no hardware speeds them up.
GIVEN_SETUP_S = 900.0


@dataclass(frozen=True)
class Phase:
    """One phase's prior seconds on one server, and how it was computed."""

    name: str
    seconds: float
    basis: str


def _decode_s(params: float, weight_bytes: float, layers: int, sequences: float,
              new_tokens: float, batch: int, sp: Speed, kind: str) -> float:
    """Seconds to generate new_tokens per sequence for `sequences` prompts, batch at a time."""
    if sequences <= 0 or new_tokens <= 0:
        return 0.0
    steps = math.ceil(sequences / max(batch, 1)) * new_tokens
    bound = decode_bound_s(params, weight_bytes, min(batch, sequences), sp.tflops,
                           sp.mem_bw_gbps)
    return steps * (bound / MFU_DECODE[kind] + layers * DECODE_LAYER_S[kind]
                    + DECODE_STEP_S[kind])


def decode_bound_s(params: float, weight_bytes: float, batch: float, tflops: float,
                   mem_bw_gbps: float) -> float:
    """One decode step's roofline: reading the weights once, or 2 FLOPs per parameter for each
    sequence of the batch, whichever takes longer (bench/bench_mfu.py fits MFU against it)."""
    return max(weight_bytes / (mem_bw_gbps * 1e9), 2 * params * batch / (tflops * 1e12))


def train_flops(w: JobWork) -> float:
    """FLOPs of training, GRPO's SFT warm start included (see the module docstring)."""
    attention = 6.0 * w.layers * w.hidden * w.seq_tokens
    lora = w.trainable_params < w.params
    dense = (4.0 * w.params + 6.0 * w.trainable_params) if lora else 6.0 * w.params
    return (w.train_tokens + w.warm_start_tokens) * (dense + attention)


def train_steps(w: JobWork) -> int:
    """Optimizer steps that pay the per-step overhead: the warm start's and training's."""
    return w.train_steps + w.warm_start_steps


def ranks_used(w: JobWork, sp: Speed) -> int:
    """Ranks the trainer launches there: the job's, capped by the server's devices."""
    return max(1, min(w.devices, sp.devices))


def prior_scaling(kind: str, ranks: int) -> float:
    """The prior scaling efficiency of `ranks` ranks on a device kind (1.0 for one rank)."""
    table = PRIOR_SCALING[kind]
    if ranks in table:
        return float(table[ranks])
    below = max(n for n in table if n <= ranks)
    top = max(table)
    per_doubling = table[top] ** (1.0 / max(math.log2(top), 1.0)) if top > 1 else 1.0
    return float(table[below] * per_doubling ** math.log2(ranks / below))


def scaling_key(sp: Speed, w: JobWork, ranks: int) -> str:
    """The learned record of the scaling efficiency of `ranks` ranks for this kind of job."""
    return key(sp.hw_class, w.params, w.trainer, f"scaling{ranks}")


def scaling(sp: Speed, w: JobWork, book: EfficiencyBook | None = None
            ) -> tuple[int, float, str]:
    """(ranks, scaling efficiency, its source): the prior, corrected by past runs' record."""
    ranks = ranks_used(w, sp)
    kind = "cpu" if sp.hw_class.startswith("cpu") else "gpu"
    eff = prior_scaling(kind, ranks)
    if ranks == 1 or book is None:
        return ranks, eff, "prior"
    corr = book.correction(scaling_key(sp, w, ranks))
    if not corr.n:
        return ranks, eff, "prior"
    return ranks, min(eff / corr.factor, 1.0), f"learned from {corr.n} run(s)"


def prior_phases(w: JobWork, offer: ServerOffer,
                 book: EfficiencyBook | None = None) -> tuple[Speed, list[Phase]]:
    """Prior seconds of every phase of the job on one server (efficiency = the priors; the
    scaling efficiency of several ranks is the book's when it has a record)."""
    tiny = w.params < TINY_PARAMS
    sp = offer_speed(offer, job_threads(offer, tiny) if offer.gpu_count == 0 else None)
    kind = "gpu" if offer.gpu_count > 0 else "cpu"
    from stratosd.costmodel.learn import size_bucket

    mfu = PRIOR_MFU_CPU if kind == "cpu" else PRIOR_MFU_GPU[size_bucket(w.params)]
    devices, eff, eff_source = scaling(sp, w, book)
    start = STARTUP_S[kind] + w.weight_bytes / (sp.disk_mbps * 1e6)
    upload = w.artifact_bytes / (sp.upload_mbps * 1e6)
    flops = train_flops(w)
    train_s = flops / (sp.tflops * 1e12 * devices * eff * mfu) \
        + train_steps(w) * TRAIN_STEP_OVERHEAD_S[kind]
    rollout = rollout_s(w, sp, kind)
    eval_s = _decode_s(w.params, w.weight_bytes, w.layers, w.eval_prompts,
                       w.eval_new_tokens / max(w.eval_prompts, 1), EVAL_BATCH, sp, kind)
    if w.teacher_local:
        tbytes = w.teacher_params * 4
        synth = _decode_s(w.teacher_params, tbytes, w.teacher_layers, w.synth_rows,
                          w.synth_new_tokens / max(w.synth_rows, 1), 8, sp, kind)
        synth_basis = (f"{w.synth_rows} generations by {w.teacher} on the server (decode: "
                       f"{w.synth_new_tokens:.3g} tokens)")
    else:
        tps = w.teacher_tokens_per_s or API_TOKENS_PER_S
        synth = w.synth_new_tokens / (tps * API_CONCURRENCY)
        src = "probe-measured" if w.teacher_tokens_per_s else "assumed"
        synth_basis = (f"{w.synth_new_tokens:.3g} tokens from API teacher {w.teacher} at "
                       f"{tps:.0f} tokens/s ({src}) x {API_CONCURRENCY} concurrent")
    probe = _decode_s(w.params, w.weight_bytes, w.layers, PROBE_GENERATIONS, 64, 8, sp, kind)
    prescreen = PRESCREEN_STEPS * (8 * w.seq_tokens * 6 * w.params / (sp.tflops * 1e12 * mfu)
                                   + TRAIN_STEP_OVERHEAD_S[kind])
    deploy = _decode_s(w.params, w.weight_bytes, w.layers, DEPLOY_REQUESTS, DEPLOY_TOKENS, 1,
                       sp, kind)
    phases = [
        Phase("probe", start + probe, "start-up + the teachers' probe generations"),
        Phase("prescreen", start + prescreen, f"start-up + {PRESCREEN_STEPS} pre-screen steps"),
        Phase("synthesis", start + synth, synth_basis),
        Phase("train", start + train_s + rollout + upload,
              f"{flops:.3g} FLOPs ({w.train_tokens + w.warm_start_tokens:.3g} tokens"
              + (f" incl. {w.warm_start_tokens:.3g} of the SFT warm start"
                 if w.warm_start_tokens else "")
              + f", {w.params / 1e6:.3g}M params, "
              f"{w.trainer}) at {sp.describe()} x {devices} rank(s)"
              + (f" x scaling efficiency {eff:.2f} ({eff_source})" if devices > 1 else "")
              + f" x MFU {mfu:g} + {train_steps(w)} steps x "
              f"{TRAIN_STEP_OVERHEAD_S[kind] * 1e3:.0f} ms overhead"
              + (f" + rollouts {rollout:.0f} s" if rollout else "")
              + f" + start-up {start:.0f} s + uploads {upload:.1f} s"),
        Phase("evaluate", 2 * start + eval_s,
              f"2 x start-up + decode of {w.eval_new_tokens:.3g} tokens over "
              f"{w.eval_prompts} prompts"),
        Phase("deploy", start + deploy, f"start-up + {DEPLOY_REQUESTS} probe requests"),
    ]
    return sp, phases


def rollout_s(w: JobWork, sp: Speed, kind: str) -> float:
    """Prior seconds of GRPO's generation: each step's completions decoded together (its
    per-device batch), every one to max_completion_length (an upper bound: some stop early)."""
    if not w.rollout_tokens:
        return 0.0
    length = float(max(w.rollout_length, 1))
    return _decode_s(w.params, w.weight_bytes, w.layers, w.rollout_tokens / length, length,
                     max(w.rollout_batch, 1), sp, kind)


def train_loop_prior_s(w: JobWork, offer: ServerOffer,
                       book: EfficiencyBook | None = None) -> float:
    """Prior seconds of the training loop alone (what train_time_s measures: GRPO's
    rollouts included)."""
    tiny = w.params < TINY_PARAMS
    sp = offer_speed(offer, job_threads(offer, tiny) if offer.gpu_count == 0 else None)
    kind = "gpu" if offer.gpu_count > 0 else "cpu"
    from stratosd.costmodel.learn import size_bucket

    mfu = PRIOR_MFU_CPU if kind == "cpu" else PRIOR_MFU_GPU[size_bucket(w.params)]
    devices, eff, _src = scaling(sp, w, book)
    # GRPO's loop generates its rollouts inside the steps train_time_s times
    return train_flops(w) / (sp.tflops * 1e12 * devices * eff * mfu) \
        + train_steps(w) * TRAIN_STEP_OVERHEAD_S[kind] + rollout_s(w, sp, kind)


def observe_scaling(book: EfficiencyBook, w: JobWork, offer: ServerOffer, ranks: int,
                    loop_s: float) -> str | None:
    """Learn the scaling efficiency of `ranks` ranks from a finished training loop: measured
    seconds against the loop's prior with the prior scaling, corrected by the one-rank loop
    record (so the record holds what the ranks cost, not the model's single-device error).
    Returns the key it updated (None for one rank)."""
    if ranks <= 1:
        return None
    w = msgspec.structs.replace(w, devices=ranks)
    tiny = w.params < TINY_PARAMS
    sp = offer_speed(offer, job_threads(offer, tiny) if offer.gpu_count == 0 else None)
    if ranks_used(w, sp) != ranks:  # more ranks than the server has devices: CPU ranks
        return None
    one = key(sp.hw_class, w.params, w.trainer, "train") + ".loop"
    predicted = train_loop_prior_s(w, offer) * book.correction(one).factor
    k = scaling_key(sp, w, ranks)
    return k if book.observe(k, predicted, loop_s) is not None else None


@dataclass
class OfferCosts:
    """Per-offer columns the selectors use (n offers)."""

    seconds: FloatArray  # (n,) calibrated seconds of the remaining phases
    server_usd: FloatArray  # (n,) seconds x $/h
    total_usd: FloatArray  # (n,) server $ + API $
    hardware: FloatArray  # (n,) effective training TFLOP/s (devices the trainer uses)
    api_usd: float = 0.0
    measured: NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=bool))


class JobCosting:
    """One job's costs on any server: the interface the daemon, plan, report and selectors use.

    `phases` limits the estimate to the phases still to run (the budget check mid-run);
    `given_train_hours` is the user's est_train_hours override (training on 1x A100 80GB).
    """

    REFERENCE = ServerOffer(id="reference-a100", gpu_model="A100 80GB", gpu_count=1,
                            gpu_mem_mib=81920)

    def __init__(self, work: JobWork, book: EfficiencyBook | None = None, *,
                 phases: Sequence[str] = PHASES, given_train_hours: float | None = None) -> None:
        self.work = work
        self.book = book or EfficiencyBook()
        self.phases = tuple(p for p in PHASES if p in phases)
        self.given_train_hours = given_train_hours
        self._cache: dict[tuple[object, ...], tuple[Speed, list[Phase]]] = {}

    @classmethod
    def reference_hours(cls, hours: float) -> JobCosting:
        """A job known only by its training time on 1x A100 80GB (tests, benches, old plans)."""
        return cls(JobWork(params=1e9, trainable_params=1e9, trainer="given"),
                   phases=("train",), given_train_hours=hours)

    def _priors(self, offer: ServerOffer) -> tuple[Speed, list[Phase]]:
        ck = hardware_kind(offer)
        got = self._cache.get(ck)
        if got is None:
            got = self._cache[ck] = prior_phases(self.work, offer, self.book)
            if self.given_train_hours is not None:
                got = self._cache[ck] = self._given(offer, got)
        return got

    def _given(self, offer: ServerOffer, got: tuple[Speed, list[Phase]]) -> tuple[
            Speed, list[Phase]]:
        sp, phases = got
        ref = offer_speed(self.REFERENCE)
        ranks, eff, _src = scaling(sp, self.work, self.book)
        ratio = ref.tflops / max(sp.tflops * ranks * eff, 1e-9)
        secs = (self.given_train_hours or 0.0) * 3600.0 * ratio + GIVEN_SETUP_S
        out = [Phase("train", secs, f"est_train_hours {self.given_train_hours:g} h on 1x A100 "
                     f"80GB x {ratio:.3g} (reference speed / this server's) + "
                     f"{GIVEN_SETUP_S / 3600:g} h set-up")
               if p.name == "train" else p for p in phases]
        return sp, out

    def correction(self, sp: Speed, phase: str) -> tuple[str, Correction]:
        """The learned correction of a phase on a server class."""
        if self.given_train_hours is not None and phase == "train":
            return "", PRIOR
        k = key(sp.hw_class, self.work.params, self.work.trainer, phase)
        return k, self.book.correction(k)

    def phase_seconds(self, offer: ServerOffer) -> list[tuple[Phase, str, Correction]]:
        """(prior phase, key, correction) of the phases still to run on one offer."""
        sp, phases = self._priors(offer)
        return [(p, *self.correction(sp, p.name)) for p in phases if p.name in self.phases]

    def columns(self, offers: Sequence[ServerOffer]) -> OfferCosts:
        """Seconds, $ and effective hardware of every offer: priced once per hardware kind
        (fleets repeat a few kinds) and broadcast over the offers' columns."""
        table = OfferTable.from_offers(offers)
        per_kind = np.empty((3, len(table.kinds)))
        for j, o in enumerate(table.kinds):
            sp, _ = self._priors(o)
            per_kind[0, j] = sum(p.seconds * c.factor for p, _k, c in self.phase_seconds(o))
            ranks, eff, _src = scaling(sp, self.work, self.book)
            per_kind[1, j] = sp.tflops * ranks * eff
            per_kind[2, j] = sp.source == "measured"
        seconds, hardware, measured = (per_kind[:, table.kind] if len(table.kinds)
                                       else np.empty((3, 0)))
        server = seconds / 3600.0 * table.price
        api = self.api_usd()
        return OfferCosts(seconds=seconds, server_usd=server, total_usd=server + api,
                          hardware=hardware, api_usd=api, measured=measured > 0)

    def api_usd(self) -> float:
        """Per-token $ of a remote teacher for the synthesis (0 when it runs on the server)."""
        u = self.work.teacher_usd
        return u.value if u is not None and "synthesis" in self.phases else 0.0

    def estimate(self, offer: ServerOffer) -> JobEstimate:
        """The job on one server, phase by phase, each with its interval and source."""
        sp, _ = self._priors(offer)
        price = offer.price_usd_per_hour
        out: list[PhaseCost] = []
        lo = hi = val = 0.0
        for p, k, c in self.phase_seconds(offer):
            v = p.seconds * c.factor
            src: EstimateSource = "given" if (self.given_train_hours is not None
                                              and p.name == "train") \
                else ("calibrated" if c.n else "prior")
            secs = Estimate(value=v, low=v / c.ratio, high=v * c.ratio, source=src, n=c.n,
                            unit="s")
            usd = Estimate(value=v / 3600 * price, low=secs.low / 3600 * price,
                           high=secs.high / 3600 * price, source=src, n=c.n, unit="USD")
            out.append(PhaseCost(phase=p.name, seconds=secs, usd=usd, basis=p.basis, key=k))
            val, lo, hi = val + v, lo + secs.low, hi + secs.high
        api = self.work.teacher_usd if "synthesis" in self.phases else None
        if api is not None:
            out.append(PhaseCost(phase="synthesis-api", billed_on="api",
                                 seconds=Estimate(value=0, low=0, high=0, unit="s"),
                                 usd=api, basis=f"per-token price of {self.work.teacher}"))
        a_v, a_lo, a_hi = (api.value, api.low, api.high) if api else (0.0, 0.0, 0.0)
        n = min((c.n for _p, _k, c in self.phase_seconds(offer)), default=0)
        src_total: EstimateSource = "calibrated" if n else "prior"
        return JobEstimate(
            server=offer.id, phases=out,
            seconds=Estimate(value=val, low=lo, high=hi, source=src_total, n=n, unit="s"),
            usd=Estimate(value=val / 3600 * price + a_v, low=lo / 3600 * price + a_lo,
                         high=hi / 3600 * price + a_hi, source=src_total, n=n, unit="USD"),
            capacity_source="measured" if sp.source == "measured" else "estimated")

    def describe(self) -> str:
        """One sentence on how job cost is estimated, for selector explanations."""
        w = self.work
        if self.given_train_hours is not None and w.trainer == "given":
            return (f"Job cost = $/h x hours, hours = est_train_hours {self.given_train_hours:g}"
                    " h on 1x A100 80GB scaled by that server's training speed (given), plus "
                    f"{GIVEN_SETUP_S / 3600:g} h set-up.")
        return (f"Job cost = $/h x the time of phases {', '.join(self.phases)} on that server "
                f"(work from the job: {w.train_tokens + w.warm_start_tokens:.3g} training "
                "tokens on "
                f"{w.params / 1e6:.3g}M params with {w.trainer}; speed measured by the agent or "
                "from the capacity table; efficiency learned from past runs)"
                + (f" + ${self.api_usd():.4f} for the API teacher" if self.api_usd() else "")
                + ".")
