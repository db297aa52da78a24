"""Synthesis step: one teacher, one mode, every train example → `dataset.jsonl`.

Resumable: each finished example is appended (fsync'd) to a journal in `ctx.state_dir`
before anything else happens, and a restarted step skips what the journal holds, so no
teacher call is paid twice (examples whose every call errored are retried unless
`retry_failed` is false). A journal written under different arguments is set aside.
Rows with the same question and target are kept once.

Result: `rows` examples processed, `kept` rows in the dataset, `dropped` examples without a
row (`failed`: only errors; `duplicates`: same row as another), `by_mode`, `by_teacher`,
`verified`, `tries_total` (teacher calls), `cost_usd`, `rows_per_s` (this session).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec
import structlog

from agents.stepctx import StepContext
from schemas.specs import TaskSpec, TeacherSpec
from stratosd.api import (
    DataRow,
    Example,
    Generation,
    SynthesisContext,
    TeacherBackend,
    TeacherRequest,
)
from stratosd.errors import ConfigError, JobFailed
from stratosd.plugins import lookup

log = structlog.stdlib.get_logger(__name__)

JOURNAL = "synth-journal.jsonl"
FINGERPRINT = "synth-fingerprint.json"


class SynthArgs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The synthesis step's arguments."""

    task: TaskSpec
    teacher: TeacherSpec
    mode: str = "injection"
    use_reference: bool = True
    tries: int = 4
    temperature: float = 0.7
    max_new_tokens: int = 256
    concurrency: int = 8
    seed: int = 0
    limit: int | None = None
    retry_failed: bool = True

    def fingerprint(self) -> str:
        """What makes two journals interchangeable (limit and concurrency do not)."""
        keep = msgspec.to_builtins(self)
        for k in ("limit", "concurrency", "retry_failed"):
            keep.pop(k)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class Entry(msgspec.Struct, kw_only=True):
    """One journal line: the outcome of one example and what it cost."""

    example_id: str
    status: Literal["kept", "dropped", "duplicate", "failed"]
    row: DataRow | None = None
    calls: int = 0
    errors: int = 0
    cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class _Metered(TeacherBackend):
    """Wraps a teacher for one example: counts calls, errors, tokens and cost."""

    name: ClassVar[str] = "metered"

    def __init__(self, inner: TeacherBackend) -> None:
        super().__init__(inner.spec, inner.task)
        self.inner = inner
        self.calls = 0
        self.errors = 0
        self.cost_usd = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.last_error: str | None = None

    async def generate(
        self, requests: Sequence[TeacherRequest], *, max_new_tokens: int = 256,
        temperature: float = 0.0, seed: int | None = None,
    ) -> list[Generation]:
        gens = await self.inner.generate(requests, max_new_tokens=max_new_tokens,
                                         temperature=temperature, seed=seed)
        for g in gens:
            self.calls += 1
            self.errors += g.error is not None
            self.last_error = g.error or self.last_error
            self.cost_usd += g.cost_usd
            self.prompt_tokens += g.prompt_tokens
            self.completion_tokens += g.completion_tokens
        return gens


class Journal:
    """Append-only, fsync'd JSON lines; a torn last line (killed mid-write) is cut off."""

    def __init__(self, state_dir: Path, fingerprint: str) -> None:
        self.path = state_dir / JOURNAL
        fp_path = state_dir / FINGERPRINT
        if self.path.exists():
            old = fp_path.read_text().strip() if fp_path.exists() else ""
            if old != fingerprint:
                stale = self.path.with_name(f"{JOURNAL}.stale-{int(time.time())}")
                self.path.rename(stale)
                log.warning("synth_journal_set_aside", path=str(stale), reason="args changed")
        fp_path.write_text(fingerprint + "\n")
        # Calls and cost of entries superseded by a retry (failed, then redone): still paid.
        self.superseded_calls = 0
        self.superseded_cost_usd = 0.0
        self.entries: dict[str, Entry] = {}
        self._load()
        self._fh = open(self.path, "ab")  # closed in close()

    def _put(self, entry: Entry) -> None:
        old = self.entries.get(entry.example_id)
        if old is not None:
            self.superseded_calls += old.calls
            self.superseded_cost_usd += old.cost_usd
        self.entries[entry.example_id] = entry

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # torn tail from a kill: drop it so the next append is clean
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
        dec = msgspec.json.Decoder(Entry)
        for line in data[:end].splitlines():
            if line.strip():
                self._put(dec.decode(line))

    def append(self, entry: Entry) -> None:
        """Write one entry durably before it counts as done."""
        self._fh.write(msgspec.json.encode(entry) + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._put(entry)

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


def parse_args(raw: dict[str, Any]) -> SynthArgs:
    """Validate the step arguments; ConfigError names the field."""
    try:
        args = msgspec.convert(raw, SynthArgs)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"bad synthesis arguments: {exc}",
                          hint="fix the named field in the step arguments") from None
    for name, value, low in (("tries", args.tries, 1), ("concurrency", args.concurrency, 1),
                             ("max_new_tokens", args.max_new_tokens, 1)):
        if value < low:
            raise ConfigError(f"{name}={value} must be >= {low}", hint=f"set {name} >= {low}",
                              field=name)
    return args


def run(ctx: StepContext) -> dict[str, Any]:
    """Synthesise the dataset for ctx.args (see module docstring)."""
    args = parse_args(ctx.args)
    return asyncio.run(_run(ctx, args))


async def _run(ctx: StepContext, args: SynthArgs) -> dict[str, Any]:
    plugins = ctx.plugins
    task = plugins.task(args.task.name, args.task.params)
    mode = lookup(plugins.modes, args.mode, "mode")()
    teacher = lookup(plugins.teachers, args.teacher.backend, "teacher.backend")(
        args.teacher, task
    )
    reference: TeacherBackend | None = None
    if args.use_reference:
        reference = lookup(plugins.teachers, "reference", "use_reference")(
            TeacherSpec(backend="reference", model=task.name, name="reference"), task
        )
    examples = task.examples("train")
    if args.limit is not None:
        examples = examples[: args.limit]
    journal = Journal(ctx.state_dir, args.fingerprint())
    done_ids = {
        eid for eid, e in journal.entries.items()
        if not (e.status == "failed" and args.retry_failed)
    }
    todo = [ex for ex in examples if ex.id not in done_ids]
    total = len(examples)
    if len(todo) < total:
        ctx.log(f"resuming synthesis: {total - len(todo)} of {total} examples already done")
    seen = {_row_key(e.row) for e in journal.entries.values()
            if e.status == "kept" and e.row is not None}
    base = SynthesisContext(task=task, teacher=teacher, teacher_name=args.teacher.label,
                            reference=reference, tries=args.tries,
                            temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    queue: asyncio.Queue[Example] = asyncio.Queue()
    for ex in todo:
        queue.put_nowait(ex)
    start = time.monotonic()
    session_done = 0
    stopped = False

    def report() -> None:
        done = total - len(todo) + session_done
        elapsed = max(time.monotonic() - start, 1e-9)
        rate = session_done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        ctx.progress(done, total, unit="rows", rows_per_s=rate, eta_s=eta)

    async def worker() -> None:
        nonlocal session_done, stopped
        while not queue.empty():
            if ctx.should_stop():
                stopped = True
                return
            ex = queue.get_nowait()
            entry = await _one(ex, mode, base)
            if entry.status == "kept" and entry.row is not None:
                key = _row_key(entry.row)
                if key in seen:
                    entry.status = "duplicate"
                seen.add(key)
            journal.append(entry)
            session_done += 1
            report()

    try:
        await asyncio.gather(*(worker() for _ in range(min(args.concurrency, max(1, len(todo))))))
    finally:
        journal.close()
        await teacher.aclose()
        if reference is not None:
            await reference.aclose()
    elapsed = time.monotonic() - start
    if stopped:
        raise JobFailed(f"synthesis stopped at {total - len(todo) + session_done}/{total}",
                        hint="rerun the step: it resumes from its journal")
    summary = _write_dataset(ctx, examples, journal.entries)
    summary["tries_total"] += journal.superseded_calls
    summary["cost_usd"] = round(summary["cost_usd"] + journal.superseded_cost_usd, 6)
    summary["rows_per_s"] = session_done / elapsed if elapsed > 0 else 0.0
    summary["resumed"] = total - len(todo)
    summary["mode"] = args.mode
    summary["teacher"] = args.teacher.label
    log.info("synthesis_done", **{k: v for k, v in summary.items() if not isinstance(v, dict)})
    return summary


async def _one(ex: Example, mode: Any, base: SynthesisContext) -> Entry:
    metered = _Metered(base.teacher)
    ref = _Metered(base.reference) if base.reference is not None else None
    ctx = SynthesisContext(task=base.task, teacher=metered, teacher_name=base.teacher_name,
                           reference=ref, tries=base.tries, temperature=base.temperature,
                           max_new_tokens=base.max_new_tokens, seed=base.seed)
    error: str | None = None
    row: DataRow | None = None
    try:
        row = await mode.synthesize(ex, ctx)
    except Exception as exc:  # noqa: BLE001 - one bad example must not sink the dataset
        log.warning("synth_example_failed", example_id=ex.id, exc_info=True)
        error = f"{type(exc).__name__}: {exc}"
    calls = metered.calls + (ref.calls if ref else 0)
    errors = metered.errors + (ref.errors if ref else 0)
    if row is not None:
        status: Literal["kept", "dropped", "duplicate", "failed"] = "kept"
    elif error is not None or (metered.calls > 0 and metered.errors == metered.calls):
        status = "failed"
        error = error or metered.last_error
    else:
        status = "dropped"
    return Entry(
        example_id=ex.id, status=status, row=row, calls=calls, errors=errors,
        cost_usd=metered.cost_usd + (ref.cost_usd if ref else 0.0),
        prompt_tokens=metered.prompt_tokens + (ref.prompt_tokens if ref else 0),
        completion_tokens=metered.completion_tokens + (ref.completion_tokens if ref else 0),
        error=error,
    )


def _row_key(row: DataRow | None) -> tuple[str, str]:
    if row is None:  # only kept rows are keyed; a kept row always has its data
        raise TypeError("a kept synthesis row has no data")
    return (row.question.strip(), row.target.strip())


def _write_dataset(ctx: StepContext, examples: list[Example],
                   entries: dict[str, Entry]) -> dict[str, Any]:
    """dataset.jsonl in train-split order (atomic rename), plus the counts."""
    out = ctx.output("dataset.jsonl")
    tmp = out.with_suffix(".jsonl.tmp")
    counts: Counter[str] = Counter()
    by_mode: Counter[str] = Counter()
    by_teacher: Counter[str] = Counter()
    verified = tries_total = target_chars = 0
    cost = 0.0
    seen: set[tuple[str, str]] = set()
    with open(tmp, "wb") as fh:
        for ex in examples:
            e = entries.get(ex.id)
            if e is None:
                continue
            tries_total += e.calls
            cost += e.cost_usd
            status = e.status
            if status == "kept" and e.row is not None:
                key = _row_key(e.row)
                if key in seen:
                    status = "duplicate"
                else:
                    seen.add(key)
                    fh.write(msgspec.json.encode(e.row) + b"\n")
                    by_mode[e.row.mode] += 1
                    by_teacher[e.row.teacher] += 1
                    verified += e.row.verified is True
                    target_chars += len(e.row.target)
            counts[status] += 1
    os.replace(tmp, out)
    processed = sum(counts.values())
    return {
        "rows": processed,
        "kept": counts["kept"],
        "dropped": processed - counts["kept"],
        "failed": counts["failed"],
        "duplicates": counts["duplicate"],
        "by_mode": dict(by_mode),
        "by_teacher": dict(by_teacher),
        "verified": verified,
        "tries_total": tries_total,
        "cost_usd": round(cost, 6),
        # the cost model sizes training from it (rows x tokenised length)
        "mean_target_chars": round(target_chars / counts["kept"], 1) if counts["kept"] else None,
        "dataset": out.name,
    }
