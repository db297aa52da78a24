"""The paper's selector comparison as a study: every selector, hundreds of scenarios, one score.

Each scenario is a job (largest candidate student 0.5B-14B, 1e6-1e9 training tokens, LoRA or
full SFT), a user region and optional budget / latency / region constraints, on the shipped
catalog or a generated fleet (50 .. 10,000 offers). Every selector picks a server from the same
offers under the same constraints with the same `JobCosting`; the pick then trains the largest
candidate student that fits its memory, and gets (accuracy, latency, training time, cost).
The picks of one scenario are scored together with `stratosd.score.score_candidates` (the
paper's four metrics, min-max normalised over the picks, equal weights by default).
Everything the outcome rests on is a stated model, printed with the results; no number here
was measured on a server (the measured mini-study runs with the demo, see the last line).

    .venv/bin/python bench/bench_study.py [--scenarios 240] [--seed 0]
        [--fleet-sizes 50,1000,10000] [--weights accuracy=2,cost=1] [--synthetic-book]
        [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

from plugins.catalogs.static import REGIONS, region_latency_ms  # noqa: E402
from plugins.selectors.objectives import filter_offers  # noqa: E402
from plugins.students.candidates import GPU_RUNTIME_MIB, dims_from_count, estimate_memory  # noqa: E402
from schemas.costs import JobWork  # noqa: E402
from schemas.specs import Constraints, ServerOffer  # noqa: E402
from stratosd.costmodel import JobCosting  # noqa: E402
from stratosd.costmodel.capacity import GPU_TABLE, offer_speed  # noqa: E402
from stratosd.costmodel.learn import EfficiencyBook, Record, key  # noqa: E402
from stratosd.errors import StratosError  # noqa: E402
from stratosd.plugins import Plugins  # noqa: E402
from stratosd.score import Candidate, improvement_pct, score_candidates  # noqa: E402

# --- stated models ------------------------------------------------------------------------

STUDENTS_B = (0.5, 1.5, 3.0, 7.0, 14.0)  # the candidate family (Qwen2.5 sizes)
ACC_LO, ACC_HI, ACC_HALF_B, ACC_SLOPE = 0.08, 0.82, 2.5, 2.2
ACC_FORMULA = (f"accuracy(P) = {ACC_LO} + {ACC_HI - ACC_LO:.2f} / (1 + (P / {ACC_HALF_B}B)^-"
               f"{ACC_SLOPE}): saturating in log-size, steepest near the paper's ~3B capacity "
               "threshold, ~0.8 at 14B (the paper's accuracy-first accuracy)")
SEQ_LEN, BATCH, LORA_R, CHECKPOINTING = 512, 8, 16, True
HEADROOM = 0.9  # plugins.students.candidates.fit's usable share of memory
ANSWER_TOKENS = 32
DECODE_EFF = 0.5  # stratosd.costmodel.model.MFU_DECODE["gpu"] (the study's fleets are GPUs)
STUDY_PHASES = ("train", "evaluate", "deploy")
EVAL_PROMPTS, EVAL_NEW_TOKENS = 100, 128
# $/h per GPU (late-2025 on-demand/marketplace levels), MiB per GPU, share of a fleet's offers
MARKET: dict[str, tuple[float, int, float]] = {
    "B200": (5.5, 183359, 2), "MI300X": (3.0, 196608, 2), "H200": (3.6, 143771, 4),
    "H100 PCIe": (2.4, 81559, 5), "H100": (2.8, 81559, 12), "A100": (1.5, 81920, 12),
    "RTX 6000 Ada": (1.0, 49140, 4), "L40S": (1.0, 46068, 6), "L40": (0.9, 46068, 3),
    "L4": (0.7, 23034, 6), "RTX A6000": (0.8, 49140, 5), "A40": (0.6, 46068, 4),
    "A10G": (1.0, 23028, 4), "A10": (0.75, 24564, 4), "V100": (0.9, 32768, 3),
    "T4": (0.45, 15360, 6), "RTX 4090": (0.5, 24564, 12), "RTX 3090": (0.3, 24576, 6),
}
PRICE_SIGMA, CPU_SHARE, DOWN_SHARE, CPU_USD_PER_CORE_H = 0.25, 0.03, 0.02, 0.045
COUNTS, COUNT_P = (1, 2, 4, 8), (0.55, 0.2, 0.15, 0.1)
REGION_W = {"us-east": 5, "us-central": 3, "us-west": 4, "ca-central": 1, "sa-east": 1,
            "eu-west": 3, "eu-central": 3, "eu-north": 2, "me-central": 1, "ap-south": 1,
            "ap-southeast": 2, "ap-northeast": 2, "au-east": 1}
USER_REGIONS = ("us-east", "us-west", "eu-west", "eu-central", "ap-northeast", "ap-southeast")
P_BUDGET, P_LATENCY, P_REGION, P_FULL = 0.35, 0.35, 0.25, 0.4
PAPER_SET = ("pfg", "accuracy-first", "cost-first", "random")  # the paper's comparison
SINGLE_OBJECTIVE = ("hardware-first", "accuracy-first", "cost-first", "latency-first", "random")
PAPER = {"stratos": 0.55, "accuracy-first": 0.25, "cost-first": 0.37, "random": 0.34,
         "at_least_pct": 22.0}
BOOT = 2000


def accuracy(params_b: float) -> float:
    """The stated accuracy curve (ACC_FORMULA)."""
    return float(ACC_LO + (ACC_HI - ACC_LO) / (1.0 + (params_b / ACC_HALF_B) ** -ACC_SLOPE))


def need_mib(params_b: float, trainer: str, gpu: bool) -> float:
    """Memory to train and serve a student (plugins.students.candidates.estimate_memory)."""
    m = estimate_memory(int(params_b * 1e9), trainer=trainer, seq_len=SEQ_LEN,
                        batch_size=BATCH, lora_r=LORA_R, dtype_bytes=2 if gpu else 4,
                        gradient_checkpointing=CHECKPOINTING,
                        runtime_mib=GPU_RUNTIME_MIB if gpu else 0.0)
    return max(m["train_mib"], m["serve_mib"])


NEED = {(p, t, g): need_mib(p, t, g) for p in STUDENTS_B for t in ("lora-sft", "full-sft")
        for g in (True, False)}


def job_work(params_b: float, trainer: str, tokens: float) -> JobWork:
    """The job's work for one student, given directly (no task data)."""
    p = params_b * 1e9
    d = dims_from_count(int(p))
    lora = trainer == "lora-sft"
    return JobWork(
        student=f"study-{params_b:g}b", params=p,
        trainable_params=float(d.lora_params(LORA_R)) if lora else p,
        weight_bytes=p * 4, hidden=d.hidden, layers=d.layers, seq_tokens=SEQ_LEN,
        trainer=trainer, train_tokens=tokens,
        train_steps=max(1, int(tokens / (BATCH * SEQ_LEN))),
        teacher="api-teacher", teacher_local=False, eval_prompts=2 * EVAL_PROMPTS,
        eval_new_tokens=2.0 * EVAL_PROMPTS * EVAL_NEW_TOKENS,
        artifact_bytes=p * 4 * (1 if lora else 3))


def synthetic_book() -> EfficiencyBook:
    """A few SYNTHETIC records (not measurements): shows 'calibrated' estimates at work."""
    recs = {}
    for hw, ratio in (("gpu-h100", 1.3), ("gpu-a100", 1.15), ("gpu-rtx-4090", 0.9),
                      ("gpu-l4", 1.4)):
        for b in STUDENTS_B:
            r = Record()
            for x in (0.95, 1.0, 1.05):
                r.add(math.log(ratio * x))
            recs[key(hw, b * 1e9, "lora-sft", "train")] = r
    return EfficiencyBook(recs)


# --- fleets -------------------------------------------------------------------------------


@dataclass
class Fleet:
    """Offers for one user region plus per-offer arrays the study reads."""

    name: str
    offers: list[ServerOffer]
    cap_mib: np.ndarray  # memory one training process can use (one GPU, or RAM)
    gpu: np.ndarray
    count: np.ndarray
    bw_gbps: np.ndarray
    latency: np.ndarray
    up: np.ndarray
    region: list[str]
    pos: dict[str, int]


def generate(n: int, seed: int) -> list[ServerOffer]:
    """n offers: MARKET models x 1/2/4/8 GPUs, lognormal price noise, weighted regions."""
    rng = np.random.default_rng([seed, n])
    names = [g[0] for g in GPU_TABLE if g[0] in MARKET]
    w = np.array([MARKET[m][2] for m in names], float)
    model = rng.choice(len(names), size=n, p=w / w.sum())
    count = rng.choice(COUNTS, size=n, p=COUNT_P)
    regions = list(REGION_W)
    rw = np.array(list(REGION_W.values()), float)
    region = rng.choice(len(regions), size=n, p=rw / rw.sum())
    noise = rng.lognormal(0.0, PRICE_SIGMA, size=n)
    jitter = np.round(rng.exponential(3.0, size=n), 1)
    cpu = rng.random(n) < CPU_SHARE
    down = rng.random(n) < DOWN_SHARE
    cores = rng.choice((16, 32, 64), size=n)
    out = []
    for i in range(n):
        st: Literal["up", "down"] = "down" if down[i] else "up"
        lat = float(jitter[i])  # + the region's round trip, added per user region
        if cpu[i]:
            c = int(cores[i])
            out.append(ServerOffer(
                id=f"gen{n}-{i}", source="study", cpu_count=c, ram_mib=c * 4096,
                price_usd_per_hour=round(c * CPU_USD_PER_CORE_H * noise[i], 2),
                latency_ms=lat, region=regions[region[i]], status=st))
            continue
        m, k = names[model[i]], int(count[i])
        price, mem, _w = MARKET[m]
        out.append(ServerOffer(
            id=f"gen{n}-{i}", source="study", gpu_model=m, gpu_count=k, gpu_mem_mib=mem,
            cpu_count=16 * k, ram_mib=k * 131072,
            price_usd_per_hour=round(price * k * noise[i], 2), latency_ms=lat,
            region=regions[region[i]], status=st))
    return out


def for_user(name: str, base: list[ServerOffer], user: str, jitter: bool) -> Fleet:
    """The fleet seen from a user region: round trip from the region table (+ jitter)."""
    offers = [msgspec.structs.replace(
        o, latency_ms=round(region_latency_ms(user, o.region) + (o.latency_ms if jitter else 0.0),
                            1)) if o.region in REGIONS else o for o in base]
    speeds = {}
    for o in offers:
        k = (o.gpu_model, o.gpu_count, o.cpu_count)
        if k not in speeds:
            speeds[k] = offer_speed(o).mem_bw_gbps
    return Fleet(
        name=name, offers=offers,
        cap_mib=np.array([o.gpu_mem_mib if o.gpu_count else o.ram_mib for o in offers], float),
        gpu=np.array([o.gpu_count > 0 for o in offers]),
        count=np.array([o.gpu_count for o in offers]),
        bw_gbps=np.array([speeds[(o.gpu_model, o.gpu_count, o.cpu_count)] for o in offers]),
        latency=np.array([o.latency_ms for o in offers]),
        up=np.array([o.status == "up" for o in offers]),
        region=[o.region for o in offers], pos={o.id: i for i, o in enumerate(offers)})


# --- one scenario -------------------------------------------------------------------------


@dataclass
class Scenario:
    """A job, a user and constraints on one fleet."""

    fleet: str
    user: str
    student_b: float
    trainer: str
    tokens: float
    constraints: Constraints


def largest_fit(fl: Fleet, s: Scenario) -> np.ndarray:
    """Per offer: index into STUDENTS_B of the largest candidate that fits (-1: none)."""
    out = np.full(len(fl.offers), -1)
    for j, b in enumerate(STUDENTS_B):
        if b > s.student_b:
            break
        need = np.where(fl.gpu, NEED[(b, s.trainer, True)], NEED[(b, s.trainer, False)])
        out = np.where(need <= HEADROOM * fl.cap_mib, j, out)
    return out


def make_constraints(rng: np.random.Generator, fl: Fleet, user: str, job_usd: np.ndarray
                     ) -> Constraints:
    """Region, then latency, then budget, each a quantile of what is left: always feasible."""
    ok = fl.up & np.isfinite(job_usd)
    region = None
    if rng.random() < P_REGION:
        prefix = user.split("-")[0]
        m = ok & np.array([r.startswith(prefix + "-") for r in fl.region])
        if m.any():
            region, ok = prefix, m
    lat = None
    if rng.random() < P_LATENCY:
        lat = float(math.ceil(np.quantile(fl.latency[ok], rng.uniform(0.2, 0.7),
                                          method="higher")))
        ok &= fl.latency <= lat
    budget = None
    if rng.random() < P_BUDGET:
        q = np.quantile(job_usd[ok], rng.uniform(0.1, 0.6), method="higher")
        budget = math.ceil(q * 100 * 1.0001) / 100
    return Constraints(region=region, max_latency_ms=lat, budget_usd=budget)


def accuracy_first(fl: Fleet, s: Scenario, costing: JobCosting) -> ServerOffer:
    """Largest student that fits, then the strongest hardware (H, then most GPUs); no price."""
    c = filter_offers(fl.offers, s.constraints, costing)
    fit = largest_fit(fl, s)[c.index]
    ids = np.array([fl.offers[i].id for i in c.index])
    order = np.lexsort((ids, -fl.count[c.index], -c.hardware, -fit))
    return c.offer(int(order[0]))


def outcome(fl: Fleet, s: Scenario, offer: ServerOffer, fit: np.ndarray, book: EfficiencyBook,
            cache: dict[float, tuple[JobCosting, JobCosting]]) -> Candidate | None:
    """(accuracy, latency, train time, $) of a pick; None when no candidate student fits."""
    i = fl.pos[offer.id]
    if fit[i] < 0:
        return None
    b = STUDENTS_B[int(fit[i])]
    if b not in cache:
        w = job_work(b, s.trainer, s.tokens)
        cache[b] = (JobCosting(w, book, phases=STUDY_PHASES),
                    JobCosting(w, book, phases=("train",)))
    whole, train = cache[b]
    usd = float(whole.columns([offer]).total_usd[0])
    train_s = float(train.columns([offer]).seconds[0])
    per_token_s = b * 1e9 * (2 if fl.gpu[i] else 4) / (fl.bw_gbps[i] * 1e9 * DECODE_EFF)
    lat = float(fl.latency[i]) + ANSWER_TOKENS * per_token_s * 1e3
    calibrated = any(c.n for _p, _k, c in train.phase_seconds(offer))
    return Candidate(name="", accuracy=accuracy(b), latency=lat, train_time=train_s, cost=usd,
                     note="calibrated" if calibrated else "prior")


# --- the study ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score every selector on every scenario; return the summary."""
    t0 = time.perf_counter()
    plugins = Plugins()
    registered = sorted(plugins.selectors.names())
    selectors = {n: plugins.selectors.get(n)() for n in registered}
    names = ["pfg", *[n for n in registered if n != "pfg"], "accuracy-first"]
    book = synthetic_book() if args.synthetic_book else EfficiencyBook()
    bases: dict[str, tuple[list[ServerOffer], bool]] = {
        "catalog": (plugins.catalog_offers(), False)}
    for n in args.fleet_sizes:
        bases[f"gen-{n}"] = (generate(n, args.seed), True)
    fleets: dict[tuple[str, str], Fleet] = {}
    n, k = args.scenarios, len(names)
    score = np.zeros((n, k))
    paper_score = np.zeros((n, len(PAPER_SET)))
    metrics = np.full((n, k, 4), np.nan)  # accuracy, latency ms, train s, $
    no_fit = np.zeros(k, int)
    grid: Counter[str] = Counter()
    scen: list[Scenario] = []
    calibrated = 0
    for row in range(n):
        rng = np.random.default_rng([args.seed, row])
        fname = list(bases)[row % len(bases)]
        user = USER_REGIONS[int(rng.integers(len(USER_REGIONS)))]
        if (fname, user) not in fleets:
            base, jitter = bases[fname]
            fleets[(fname, user)] = for_user(fname, base, user, jitter)
        fl = fleets[(fname, user)]
        trainer = "full-sft" if rng.random() < P_FULL else "lora-sft"
        sb = float(STUDENTS_B[int(rng.integers(len(STUDENTS_B)))])
        tokens = float(10 ** rng.uniform(6, 9))
        costing = JobCosting(job_work(sb, trainer, tokens), book, phases=STUDY_PHASES)
        job = costing.columns(fl.offers).total_usd
        s = Scenario(fname, user, sb, trainer, tokens, make_constraints(rng, fl, user, job))
        scen.append(s)
        fit = largest_fit(fl, s)
        cache: dict[float, tuple[JobCosting, JobCosting]] = {}
        cands: list[Candidate] = []
        for j, name in enumerate(names):
            try:
                pick = (accuracy_first(fl, s, costing) if name == "accuracy-first" else
                        selectors[name].select(fl.offers, s.constraints, costing=costing,
                                               seed=args.seed * 100_003 + row).chosen)
                got = outcome(fl, s, pick, fit, book, cache)
            except StratosError:
                got = None
            if got is None:
                no_fit[j] += 1
                cands.append(Candidate(name=name, feasible=False))
                continue
            cands.append(Candidate(name=name, accuracy=got.accuracy, latency=got.latency,
                                   train_time=got.train_time, cost=got.cost))
            metrics[row, j] = (got.accuracy, got.latency, got.train_time, got.cost)
            calibrated += got.note == "calibrated"
        table = score_candidates(cands, args.weights)
        score[row] = [r.score or 0.0 for r in table.rows]
        paper = score_candidates([cands[names.index(x)] for x in PAPER_SET], args.weights)
        paper_score[row] = [r.score or 0.0 for r in paper.rows]
        c = s.constraints
        grid.update([f"fleet {fname}", f"student {sb:g}B", f"trainer {trainer}",
                     f"user {user}", "budget_usd" if c.budget_usd is not None else "",
                     "max_latency_ms" if c.max_latency_ms is not None else "",
                     "region" if c.region else ""])
    res = summarise(args, names, score, paper_score, metrics, no_fit, grid, scen, bases, book,
                    time.perf_counter() - t0)
    res["calibrated_picks"] = [calibrated, int((~np.isnan(metrics[:, :, 0])).sum())]
    return res


def boot_stats(score: np.ndarray, names: list[str], seed: int, rival: Sequence[str]
               ) -> dict[str, Any]:
    """Mean, percentile-bootstrap 95% CI and win rate per column; PFG's gain over the best
    of `rival` (re-chosen in every resample for the CI)."""
    n, _k = score.shape
    rng = np.random.default_rng([seed, 99])
    boot = score[rng.integers(n, size=(BOOT, n))].mean(axis=1)  # (BOOT, k)
    mean = score.mean(axis=0)
    top = score.max(axis=1, keepdims=True)
    winners = np.isclose(score, top, rtol=0, atol=1e-12)
    wins = (winners / winners.sum(axis=1, keepdims=True)).mean(axis=0)
    out: dict[str, Any] = {"selectors": {}}
    for j, name in enumerate(names):
        lo, hi = np.percentile(boot[:, j], [2.5, 97.5])
        out["selectors"][name] = {"mean_score": float(mean[j]),
                                  "ci95": [float(min(lo, mean[j])), float(max(hi, mean[j]))],
                                  "win_rate": float(wins[j])}
    p = names.index("pfg")
    single = [names.index(x) for x in rival if x in names]
    best = max(single, key=lambda j: mean[j])
    imp = boot[:, p] / np.maximum(boot[:, single].max(axis=1), 1e-12) * 100 - 100
    out.update(
        pfg_improvement_pct=improvement_pct(float(mean[p]), float(mean[best])),
        pfg_improvement_ci95=[float(x) for x in np.percentile(imp, [2.5, 97.5])],
        best_single_objective=names[best],
        pfg_improvement_vs={names[j]: improvement_pct(float(mean[p]), float(mean[j]))
                            for j in single})
    return out


def summarise(args: argparse.Namespace, names: list[str], score: np.ndarray,
              paper_score: np.ndarray, metrics: np.ndarray, no_fit: np.ndarray,
              grid: Counter[str], scen: list[Scenario], bases: dict[str, Any],
              book: EfficiencyBook, elapsed: float) -> dict[str, Any]:
    """Means, bootstrap CIs, win rates, ratios vs PFG, PFG vs the best single objective."""
    out = boot_stats(score, names, args.seed, SINGLE_OBJECTIVE)
    p = names.index("pfg")
    for j, name in enumerate(names):
        both = ~np.isnan(metrics[:, j, 0]) & ~np.isnan(metrics[:, p, 0])
        ratio = [float(np.exp(np.mean(np.log(metrics[both, j, m] / metrics[both, p, m]))))
                 if both.any() else None for m in (0, 2, 3)]
        picked = ~np.isnan(metrics[:, j, 0])
        out["selectors"][name].update(
            no_pick=int(no_fit[j]),
            accuracy_mean=float(metrics[picked, j, 0].mean()) if picked.any() else None,
            train_hours_median=float(np.median(metrics[picked, j, 2]) / 3600)
            if picked.any() else None,
            usd_median=float(np.median(metrics[picked, j, 3])) if picked.any() else None,
            accuracy_ratio_vs_pfg=ratio[0], train_time_ratio_vs_pfg=ratio[1],
            usd_ratio_vs_pfg=ratio[2])
    out.update(
        paper_set=boot_stats(paper_score, list(PAPER_SET), args.seed, PAPER_SET[1:]),
        by_fleet={f: {nm: float(score[[s.fleet == f for s in scen], j].mean())
                      for j, nm in enumerate(names)} for f in bases
                  if any(s.fleet == f for s in scen)},
        scenarios=len(scen), seed=args.seed, elapsed_s=round(elapsed, 1), paper=PAPER,
        grid={g: c for g, c in sorted(grid.items()) if g},
        fleets={f: len(b[0]) for f, b in bases.items()},
        weights=score_candidates([Candidate(name="x")], args.weights).weights,
        book="synthetic" if args.synthetic_book else "empty (prior)",
        book_records=len(list(book.keys())))
    return out


# --- output -------------------------------------------------------------------------------


def assumptions(res: dict[str, Any]) -> list[str]:
    """Every assumption the numbers rest on, as printable lines."""
    fleets = ", ".join(f"{f} ({c} offers)" for f, c in res["fleets"].items())
    lines = [
        "ASSUMPTIONS (nothing below was measured on a server)",
        f"  accuracy: {ACC_FORMULA}.",
        "  student: each pick trains the largest candidate that fits its memory (the student "
        "stage keeps the best pre-screen accuracy; the curve rises with size). Candidates: "
        + ", ".join(f"{b:g}B" for b in STUDENTS_B) + " up to the scenario's largest.",
        f"  memory: plugins.students.candidates.estimate_memory, seq {SEQ_LEN}, batch {BATCH}, "
        f"LoRA r={LORA_R}, gradient checkpointing {'on' if CHECKPOINTING else 'off'}, bf16 + "
        f"{GPU_RUNTIME_MIB:.0f} MiB runtime on one GPU (the trainer uses one), fp32 in RAM on "
        f"CPU hosts; fits when max(train, serve) <= {HEADROOM:.0%} of one GPU's memory / RAM.",
        "    size   acc    LoRA GPU   full GPU   LoRA CPU   full CPU   (MiB)",
    ]
    lines += [f"    {b:>4g}B  {accuracy(b):.3f} {NEED[(b, 'lora-sft', True)]:>9,.0f} "
              f"{NEED[(b, 'full-sft', True)]:>10,.0f} {NEED[(b, 'lora-sft', False)]:>10,.0f} "
              f"{NEED[(b, 'full-sft', False)]:>10,.0f}" for b in STUDENTS_B]
    lines += [
        f"  time and $: stratosd.costmodel JobCosting, phases {', '.join(STUDY_PHASES)} "
        "(synthesis/probe/pre-screen excluded: the same teacher calls whoever picks); train "
        "time = the train phase; $ = those phases x $/h. EfficiencyBook: "
        + ("SYNTHETIC records (made up, not measured: H100 x1.3, A100 x1.15, RTX 4090 x0.9, "
           "L4 x1.4 on LoRA training) so some estimates read 'calibrated'"
           if res["book"] == "synthetic" else "empty, every estimate is the prior")
        + f" ({res['calibrated_picks'][0]} of {res['calibrated_picks'][1]} picks had a "
        "calibrated train estimate). Outcomes use the same model the selectors see (no "
        "estimation error).",
        f"  latency (score): the offer's network round trip + {ANSWER_TOKENS} decoded tokens "
        f"of the chosen student (bf16 weights / memory bandwidth / {DECODE_EFF}). Selectors "
        "see only the round trip (their L).",
        "  job work: JobWork given directly: shape from dims_from_count, seq 512, LoRA r=16 "
        "adapter params, training tokens log-uniform 1e6..1e9, evaluation 2x100 prompts x 128 "
        "tokens.",
        f"  fleets: {fleets}. Generated: GPU models from capacity.GPU_TABLE as model $/GPU-h "
        "GiB/GPU (weight in the mix): " + ", ".join(
            f"{m} ${p:g} {mem / 1024:.0f} GiB ({w:g})" for m, (p, mem, w) in MARKET.items())
        + f"; GPUs per box {COUNTS} with p={COUNT_P}; price = $/GPU-h x GPUs x lognormal("
        f"0, {PRICE_SIGMA}) rounded to the cent; {CPU_SHARE:.0%} CPU hosts (16/32/64 cores, "
        f"${CPU_USD_PER_CORE_H}/core-h); {DOWN_SHARE:.0%} down; regions weighted {REGION_W}; "
        "latency = plugins.catalogs.static.region_latency_ms(user, region) + exponential(3 ms) "
        "jitter. The catalog's latency is re-estimated for each user region.",
        f"  scenario grid: fleet round-robin; user region uniform over {USER_REGIONS}; "
        f"largest student uniform over {STUDENTS_B}B; full SFT p={P_FULL} else LoRA; "
        f"region constraint (user's continent) p={P_REGION}, then max_latency_ms p={P_LATENCY} "
        f"(a 20-70% quantile of what is left), then budget_usd p={P_BUDGET} (a 10-60% quantile "
        "of the selectors' job $ over what is left): every scenario has a feasible server. "
        "Counts: " + ", ".join(f"{g} {c}" for g, c in res["grid"].items()) + ".",
        "  selectors: the registered ones (same Constraints, same JobCosting for the largest "
        "candidate student, as at select_server) + accuracy-first (this bench: largest student "
        "that fits, then the largest H, then the most GPUs; price never consulted).",
        f"  score: stratosd.score.score_candidates over the {len(res['selectors'])} picks of a "
        f"scenario, weights {res['weights']}; a pick where no student fits scores 0 (counted "
        "as no_pick). 95% CI: percentile bootstrap over scenarios, "
        f"{BOOT} resamples. Ratios vs PFG: geometric mean over scenarios where both picked.",
    ]
    return lines


def report(res: dict[str, Any]) -> None:
    """The human-readable output."""
    print(f"Stratos selector study: {res['scenarios']} scenarios, seed {res['seed']}, "
          f"{res['elapsed_s']} s")
    print("\n".join(assumptions(res)))
    print("\nRESULTS (score in [0, 1], higher is better)")
    print(f"  {'selector':<15}{'mean':>6} {'95% CI':>14} {'win':>6} {'no pick':>8} "
          f"{'acc':>6} {'train h':>8} {'$':>9}   {'acc/pfg':>7} {'h/pfg':>7} {'$/pfg':>7}")
    for name, r in sorted(res["selectors"].items(), key=lambda x: -x[1]["mean_score"]):
        lo, hi = r["ci95"]

        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        print(f"  {name:<15}{r['mean_score']:>6.3f} [{lo:.3f}, {hi:.3f}] "
              f"{r['win_rate']:>6.1%} {r['no_pick']:>8} {f(r['accuracy_mean'], '.3f'):>6} "
              f"{f(r['train_hours_median'], '.3g'):>8} {f(r['usd_median'], ',.2f'):>9}   "
              f"{f(r['accuracy_ratio_vs_pfg'], '.3f'):>7} "
              f"{f(r['train_time_ratio_vs_pfg'], '.3g'):>7} {f(r['usd_ratio_vs_pfg'], '.3g'):>7}")
    print("  (acc: mean; train h and $: medians; x/pfg: geometric-mean ratio to PFG's pick)")
    print("\n  mean score by fleet:")
    names = list(res["selectors"])
    print("    " + f"{'fleet':<12}" + "".join(f"{n[:14]:>15}" for n in names))
    for fl, row in res["by_fleet"].items():
        print("    " + f"{fl:<12}" + "".join(f"{row[n]:>15.3f}" for n in names))
    print()
    gain(res, f"all {len(names)} selectors scored together")
    ps = res["paper_set"]
    print("\nThe paper's comparison alone (" + ", ".join(PAPER_SET) + " scored together):")
    print("  " + ", ".join(f"{n} {r['mean_score']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
                           f" win {r['win_rate']:.0%}" for n, r in ps["selectors"].items()))
    gain(ps, "this set")
    pp = res["paper"]
    print(f"  paper: Stratos {pp['stratos']} vs accuracy-first {pp['accuracy-first']}, "
          f"cost-first {pp['cost-first']}, random {pp['random']} (smallest gain "
          f"{(pp['stratos'] / pp['cost-first'] - 1) * 100:+.0f}%); authors: \"at least "
          f"+{pp['at_least_pct']:g}%\" over single-objective selection. Formula and weights "
          "unpublished, so only the direction and rough size are comparable.")
    print("\nMeasured mini-study: not in this bench (it needs live agents). It runs with the "
          "demo (scripts/demo.sh -> stratosctl demo); its report scores the run's pick "
          "against each baseline's on measured numbers (stratosd.score.compare_selectors).")


def gain(res: dict[str, Any], scope: str) -> None:
    """PFG's gain over the best single-objective baseline, with its CI and each baseline's."""
    imp, (lo, hi) = res["pfg_improvement_pct"], res["pfg_improvement_ci95"]
    print(f"PFG vs the best single-objective baseline ({res['best_single_objective']}, {scope}):"
          + (" n/a" if imp is None else f" {imp:+.1f}%") + f" (95% CI {lo:+.1f}% .. {hi:+.1f}%)"
          "; vs each: " + ", ".join(f"{k} " + ("n/a" if v is None else f"{v:+.1f}%")
                                    for k, v in res["pfg_improvement_vs"].items()))


def parse_weights(text: str | None) -> dict[str, float] | None:
    """'accuracy=2,cost=1' -> {'accuracy': 2.0, 'cost': 1.0}."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        out[name.strip()] = float(value)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the study, print the report (or one JSON object)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", type=int, default=None, help="default 240 (--quick: 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fleet-sizes", default=None, help="default 50,1000,10000 (--quick: 50,1000)")
    ap.add_argument("--weights", default=None, help="e.g. accuracy=2,cost=1 (others 1.0)")
    ap.add_argument("--synthetic-book", action="store_true",
                    help="seed the EfficiencyBook with made-up records (shows 'calibrated')")
    ap.add_argument("--quick", action="store_true", help="a small version (under a minute)")
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    args = ap.parse_args(argv)
    args.scenarios = args.scenarios or (40 if args.quick else 240)
    sizes = args.fleet_sizes or ("50,1000" if args.quick else "50,1000,10000")
    args.fleet_sizes = [int(x) for x in sizes.split(",") if x.strip()]
    try:
        args.weights = parse_weights(args.weights)
        score_candidates([Candidate(name="x")], args.weights)
    except (ValueError, StratosError) as exc:
        ap.error(f"--weights: {exc}")
    res = run(args)
    if args.json:
        res["assumptions"] = assumptions(res)
        print(json.dumps(res))
    else:
        report(res)
    return res


if __name__ == "__main__":
    main()
