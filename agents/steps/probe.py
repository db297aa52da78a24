"""Probe step: every candidate teacher answers the same seeded sample of the train split.

Each teacher gets the forward prompt only (no answer), greedy; its accuracy, cost, latency
and output tokens become a TeacherScore. `best` is the most accurate teacher whose
projected synthesis cost fits `budget_usd` (ties → cheaper, then faster); a teacher that
errors on every question gets a score with `error` set and ranks last.

Projected synthesis cost = mean cost per probe call × train examples × expected calls per
example, where a teacher with accuracy p and `tries` samples needs sum_{i<tries} (1-p)^i.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import msgspec
import structlog

from agents.stepctx import StepContext
from schemas.specs import TaskSpec, TeacherScore, TeacherSpec
from stratosd.api import Example, Generation, TaskPack, TeacherRequest
from stratosd.errors import ConfigError, Infeasible
from stratosd.plugins import lookup

log = structlog.stdlib.get_logger(__name__)


class ProbeArgs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The probe step's arguments."""

    task: TaskSpec
    teachers: list[TeacherSpec]
    probe_size: int | None = None
    seed: int = 0
    max_new_tokens: int = 256
    budget_usd: float | None = None
    tries: int = 4
    concurrency: int = 16


def run(ctx: StepContext) -> dict[str, Any]:
    """Score every teacher; return {"scores": [...], "best": name, "projected_cost_usd": {}}."""
    try:
        args = msgspec.convert(ctx.args, ProbeArgs)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"bad probe arguments: {exc}",
                          hint="fix the named field in the step arguments") from None
    if not args.teachers:
        raise ConfigError("no teachers to probe", hint="list at least one teacher",
                          field="teachers")
    return asyncio.run(_run(ctx, args))


def probe_sample(task: TaskPack, size: int, seed: int) -> tuple[list[Example], int]:
    """The seeded probe sample of the train split, and the split's size."""
    train = task.examples("train")
    if not train:
        raise ConfigError("the task's train split is empty", hint="check the task's data",
                          field="task")
    rng = random.Random(seed)
    return rng.sample(train, min(size, len(train))), len(train)


def expected_calls(accuracy: float, tries: int) -> float:
    """Expected teacher calls per example with rejection sampling up to `tries`."""
    return sum((1.0 - accuracy) ** i for i in range(max(1, tries)))


async def _run(ctx: StepContext, args: ProbeArgs) -> dict[str, Any]:
    plugins = ctx.plugins
    task = plugins.task(args.task.name, args.task.params)
    size = args.probe_size or args.task.probe_size
    sample, n_train = probe_sample(task, size, args.seed)
    scores: list[TeacherScore] = []
    projected: dict[str, float] = {}
    for i, spec in enumerate(args.teachers):
        field = f"teachers[{i}].backend"
        teacher = lookup(plugins.teachers, spec.backend, field)(spec, task)
        try:
            score = await _score(ctx, task, teacher, spec, sample, args)
        finally:
            await teacher.aclose()
        per_call = score.cost_usd / max(1, score.n)
        projected[score.name] = per_call * n_train * expected_calls(score.accuracy, args.tries)
        scores.append(score)
        log.info("teacher_probed", teacher=score.name, accuracy=score.accuracy, n=score.n,
                 cost_usd=score.cost_usd, error=score.error)
    best = choose_best(scores, projected, args.budget_usd)
    return {
        "scores": [msgspec.to_builtins(s) for s in scores],
        "best": best,
        "projected_cost_usd": projected,
        "probe_size": len(sample),
        "train_size": n_train,
    }


async def _score(ctx: StepContext, task: TaskPack, teacher: Any, spec: TeacherSpec,
                 sample: list[Example], args: ProbeArgs) -> TeacherScore:
    label = spec.label
    sem = asyncio.Semaphore(args.concurrency)
    done = 0

    async def one(ex: Example) -> tuple[Example, Generation]:
        nonlocal done
        req = TeacherRequest(prompt=task.prompt(ex.question), question=ex.question)
        async with sem:
            start = time.perf_counter()
            try:
                [gen] = await teacher.generate([req], max_new_tokens=args.max_new_tokens,
                                               temperature=0.0, seed=args.seed)
            except Exception as exc:  # noqa: BLE001 - a broken backend is a score, not a crash
                gen = Generation(text="", error=f"{type(exc).__name__}: {exc}")
            if not gen.latency_ms and gen.error is None:
                gen = msgspec.structs.replace(gen,
                                              latency_ms=(time.perf_counter() - start) * 1000)
        done += 1
        ctx.progress(done, len(sample), unit="examples", message=f"probing {label}")
        return ex, gen

    results = await asyncio.gather(*(one(ex) for ex in sample))
    correct = 0
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    cost = 0.0
    tokens_out = 0
    for ex, gen in results:
        cost += gen.cost_usd
        tokens_out += gen.completion_tokens
        if gen.error is not None:
            errors[gen.error] += 1
            continue
        latencies.append(gen.latency_ms)
        try:
            correct += task.score(task.extract(gen.text), ex.answer) >= 1.0
        except Exception as exc:  # noqa: BLE001 - a task bug on odd output counts as wrong
            log.warning("probe_score_failed", teacher=label, example_id=ex.id, error=repr(exc))
    n = len(results)
    error = None
    if errors and len(latencies) == 0:
        msg, _ = errors.most_common(1)[0]
        error = f"all {n} probe requests failed: {msg}"
    elif errors:
        error = None  # partial failures count as wrong answers; reported in the log
        log.warning("probe_partial_errors", teacher=label, errors=sum(errors.values()), n=n)
    return TeacherScore(
        name=label, backend=spec.backend, model=spec.model,
        accuracy=correct / n if n else 0.0, n=n, correct=correct, cost_usd=cost,
        latency_ms_mean=sum(latencies) / len(latencies) if latencies else 0.0,
        tokens_out=tokens_out, error=error,
    )


def choose_best(scores: list[TeacherScore], projected: dict[str, float],
                budget_usd: float | None) -> str:
    """Most accurate teacher within budget; ties → cheaper, then faster; errored ones last."""
    fits = [s for s in scores if budget_usd is None or projected[s.name] <= budget_usd]
    if not fits:
        cheapest = min(scores, key=lambda s: projected[s.name])
        raise Infeasible(
            f"no teacher's projected synthesis cost fits budget_usd={budget_usd}: the cheapest "
            f"is {cheapest.name} at ${projected[cheapest.name]:.2f}",
            hint="raise the budget, shrink the train split, or add a cheaper teacher",
            field="constraints.budget_usd",
        )
    ranked = sorted(fits, key=lambda s: (s.error is not None, -s.accuracy, projected[s.name],
                                         s.latency_ms_mean))
    return ranked[0].name
