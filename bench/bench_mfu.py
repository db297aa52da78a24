"""CPU training and decode speed by student size: where the cost model's CPU priors come from.

For each student, one `train` job through the agent's child entry point (`python -m
agents.worker job.json`, exactly what an agent spawns) with the full-sft trainer on the demo's
rows (Mahjong level 1, `wins` reasoning), rendered in the student's own prompt format, with
the torch thread count a tiny-student job gets on an agent (1). It prints per student the
measured seconds per step, tokens/s and MFU (6 x params x tokens/s over this machine's fp32
matmul rate, measured by the agent's own calibration), then fits

    step seconds = step overhead + 6 x params x tokens per step / (matmul rate x MFU)

by least squares over the students: the per-step overhead (optimizer, framework, small-op
launch costs that a FLOP count never sees) and the MFU of the FLOP-bound part. The cost
model's CPU priors (`stratosd.costmodel.model.PRIOR_MFU_CPU` and
`TRAIN_STEP_OVERHEAD_S["cpu"]`) are these fitted values; rerun this elsewhere to check them.

Decode (`--part decode`): the same students answer the demo's test prompts through the
evaluate step's own generator (`plugins.models.evaluate.local_generator`: chat-rendered,
left-padded, greedy) at the batch sizes of the probe, GRPO's rollouts and evaluation. It prints
the seconds per decode step (one new token for the whole batch) and fits

    decode step seconds = layers x per-layer overhead
                          + max(weight bytes / memory bandwidth, 2 x params x batch / rate) / MFU

by least squares (both terms non-negative: no intercept), the form of
`stratosd.costmodel.model._decode_s`. Eager generate() runs a dozen small ops per layer for each
new token, whose launch costs outweigh the FLOPs of a tiny model. `DECODE_LAYER_S["cpu"]` and
`MFU_DECODE["cpu"]` are these fitted values.

Start-up (`--part startup`): the fixed cost of each step's child process (interpreter, torch and
transformers imports, the model load), the cost model's `STARTUP_S["cpu"]`: an `evaluate` job
of one prompt and one new token through the agent's child entry point, timed from spawn to
exit, several times per student (the first, which builds the `config:` model, left out).

Run: .venv/bin/python bench/bench_mfu.py [--part train|decode|startup|all] [--steps 120]
                                         [--students config:... ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.childjob import run_child_job  # noqa: E402

TASK = {"name": "mahjong-winning-tiles",
        "params": {"difficulty": 1, "n_train": 200, "n_test": 4, "derivation": "wins"}}
STUDENTS = ["config:qwen2-tiny?vocab_size=512", "config:qwen2-small?vocab_size=512",
            "config:qwen2-base?vocab_size=512", "config:base"]


def write_rows(tmp: Path) -> Path:
    """The demo task's training rows with their reference reasoning, as DataRow JSONL."""
    import msgspec

    from stratosd.api import DataRow
    from stratosd.plugins import get_plugins

    task = get_plugins().task(TASK["name"], TASK["params"])
    rows = []
    for ex in task.examples("train"):
        reasoning = task.reference_reasoning(ex.question, ex.answer) or ""
        rows.append(DataRow(example_id=ex.id, question=ex.question, answer=ex.answer,
                            reasoning=reasoning, target=task.format_target(reasoning, ex.answer),
                            teacher="reference", mode="injection", verified=True))
    path = tmp / "dataset.jsonl"
    path.write_bytes(b"\n".join(msgspec.json.encode(r) for r in rows) + b"\n")
    return path


def run_train(model: str, data: Path, opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One full-sft `train` job through the agent's child entry point; its result."""
    from plugins.models.hf import resolve_model

    params = {"max_steps": opts.steps, "learning_rate": 3e-3,
              "per_device_train_batch_size": opts.batch, "logging_steps": 10,
              "max_length": 512, "save_steps": 10 * opts.steps, "cpu_threads": opts.threads}
    args = {"model": resolve_model(model), "trainer": "full-sft", "task": TASK,
            "params": params, "seed": 0}
    result, _wall = run_child_job(work, "train", args, inputs={"dataset": str(data)},
                                  what=f"train job for {model}")
    return result


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares of seconds = a + b x flops over (flops per step, seconds per step)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else my / mx
    return my - b * mx, b


def time_child_startup(model: str, work: Path) -> float:
    """Seconds from spawn to exit of a one-prompt, one-token `evaluate` job in the agent's
    child entry point: start-up, model load and a negligible decode."""
    args = {"task": TASK, "model": model, "limit": 1, "max_new_tokens": 1, "batch_size": 1}
    _result, seconds = run_child_job(work, "evaluate", args, what=f"evaluate job for {model}")
    return seconds


def startup_part(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Per student: the child's start-up seconds (median of --startup-repeats)."""
    import statistics

    rows = []
    for i, model in enumerate(opts.students):
        time_child_startup(model, tmp / f"start-{i}-warm")  # builds and caches the model
        runs = [time_child_startup(model, tmp / f"start-{i}-{r}")
                for r in range(opts.startup_repeats)]
        rows.append({"student": model, "seconds": runs, "median_s": statistics.median(runs)})
        if not opts.json:
            print(f"{model:<36} child start-up {statistics.median(runs):5.2f} s (median of "
                  f"{len(runs)}: {', '.join(f'{x:.2f}' for x in runs)})", flush=True)
    return {"students": rows, "median_s": statistics.median(
        x for r in rows for x in r["seconds"])}


def measure_decode(model: str, loaded: tuple[Any, Any], prompts: list[str], batch: int,
                   new_tokens: int, repeats: int) -> tuple[float, int]:
    """(seconds, decode steps) of `repeats` batches through the evaluate step's generator over
    `loaded` (model's (model, tokenizer)); a batch takes as many steps as its longest answer
    (generate runs until all have stopped)."""
    from plugins.models.evaluate import local_generator

    generate = local_generator(model, max_new_tokens=new_tokens, loaded=loaded)
    generate(prompts[:batch])  # warm-up: first-call allocations and lazy imports
    seconds, steps = 0.0, 0
    for r in range(repeats):
        chunk = [prompts[(r * batch + i) % len(prompts)] for i in range(batch)]
        t0 = time.perf_counter()
        outs = generate(chunk)
        seconds += time.perf_counter() - t0
        steps += max(o.completion_tokens for o in outs)
    return seconds, steps


def decode_part(opts: argparse.Namespace, cap: Any) -> dict[str, Any]:
    """Per student and batch size: seconds per decode step; then the fit."""
    import torch

    from plugins.models.hf import load_model
    from stratosd.costmodel.model import decode_bound_s
    from stratosd.costmodel.work import model_shape
    from stratosd.plugins import get_plugins

    torch.set_num_threads(opts.threads)
    tflops = cap.matmul_tflops["fp32"]
    bw_gbps = cap.mem_bw_gbps or 10.0
    task = get_plugins().task(TASK["name"], {**TASK["params"], "n_test": 64})
    prompts = [task.prompt(ex.question) for ex in task.examples("test")]
    rows, points = [], []
    for model in opts.students:
        shape = model_shape(model)
        params = shape.params
        loaded = load_model(model)
        for batch in opts.decode_batches:
            seconds, steps = measure_decode(model, loaded, prompts, batch, opts.new_tokens,
                                            opts.decode_repeats)
            step_s = seconds / max(steps, 1)
            x = decode_bound_s(params, params * 4, batch, tflops, bw_gbps)  # fp32 on CPU
            rows.append({"student": model, "params": params, "layers": shape.layers,
                         "batch": batch, "steps": steps, "step_s": step_s, "bound_s": x})
            points.append((shape.layers, x, step_s))
            if not opts.json:
                print(f"{model:<36} batch {batch:>2}  {step_s * 1e3:6.2f} ms/decode step "
                      f"({steps} steps)  FLOP/bandwidth bound {x * 1e3:.3f} ms", flush=True)
    import numpy as np

    a = np.array([[layers, x] for layers, x, _ in points])
    y = np.array([s for _, _, s in points])
    (per_layer, per_bound), *_ = np.linalg.lstsq(a, y, rcond=None)
    return {"students": rows, "mem_bw_gbps": bw_gbps, "fit": {
        "layer_overhead_s": float(per_layer),
        "mfu": 1 / float(per_bound) if per_bound > 0 else float("nan"),
        "residuals_pct": [float(100 * (p / t - 1)) for p, t in zip(a @ [per_layer, per_bound], y,
                                                                  strict=True)]}}


def main() -> None:
    """Print per student: s/step, tokens/s, MFU; then the fitted overhead and MFU."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", nargs="+", default=STUDENTS)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16, help="the demo's batch")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: what an agent gives a tiny student)")
    ap.add_argument("--part", choices=("train", "decode", "startup", "all"), default="all")
    ap.add_argument("--startup-repeats", type=int, default=3)
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[8, 16, 20],
                    help="the probe's, GRPO rollouts' and the demo evaluation's batch")
    ap.add_argument("--new-tokens", type=int, default=32, help="max new tokens per answer")
    ap.add_argument("--decode-repeats", type=int, default=4, help="batches per point")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()

    from agents.calibrate import measure
    from stratosd.costmodel.work import model_shape

    with tempfile.TemporaryDirectory(prefix="bench-mfu-") as d:
        tmp = Path(d)
        cap = measure(opts.threads, tmp)
        rate = cap.matmul_tflops["fp32"] * 1e12
        out: dict[str, Any] = {"threads": opts.threads, "matmul_gflops_fp32": rate / 1e9}
        if opts.part in ("startup", "all"):
            out["startup"] = startup_part(opts, tmp)
            if not opts.json:
                print(f"child start-up: median {out['startup']['median_s']:.2f} s\n",
                      flush=True)
        if opts.part in ("decode", "all"):
            out["decode"] = decode_part(opts, cap)
            if not opts.json:
                f = out["decode"]["fit"]
                print(f"decode fit: {f['layer_overhead_s'] * 1e3:.3f} ms per layer + bound at "
                      f"MFU {f['mfu']:.3f}; residuals "
                      + ", ".join(f"{r:+.0f}%" for r in f["residuals_pct"]) + "\n", flush=True)
        if opts.part in ("decode", "startup"):
            if opts.json:
                print(json.dumps(out))
            return
        data = write_rows(tmp)
        rows, points = [], []
        for i, model in enumerate(opts.students):
            t0 = time.monotonic()
            res = run_train(model, data, opts, tmp / f"job-{i}")
            params = model_shape(model).params
            steps = int(res.get("steps") or opts.steps)
            step_s = float(res["train_time_s"]) / steps
            tokens_per_step = float(res["train_tokens"]) / steps
            flops = 6 * params * tokens_per_step
            mfu = flops / step_s / rate
            rows.append({"student": model, "params": params, "step_s": step_s,
                         "tokens_per_s": tokens_per_step / step_s, "mfu": mfu,
                         "tokens_per_step": tokens_per_step, "wall_s": time.monotonic() - t0})
            points.append((flops, step_s))
            if not opts.json:
                print(f"{model:<36} {params / 1e6:7.3f}M params  {step_s * 1e3:7.1f} ms/step  "
                      f"{tokens_per_step / step_s:8.0f} tokens/s  MFU {mfu:.3f}", flush=True)
        overhead, per_flop = fit(points)
        fitted_mfu = 1 / (per_flop * rate) if per_flop > 0 else float("nan")
        out.update({"steps": opts.steps, "batch": opts.batch, "students": rows, "fit": {
                   "step_overhead_s": overhead, "mfu": fitted_mfu,
                   "residuals_pct": [100 * ((overhead + per_flop * x) / y - 1)
                                     for x, y in points]}})
        if opts.json:
            print(json.dumps(out))
            return
        print(f"\nmatmul fp32 {rate / 1e9:.1f} GFLOP/s on {opts.threads} thread(s) (the agent's "
              "calibration)")
        print(f"fit: step overhead {overhead * 1e3:.1f} ms + FLOPs at MFU {fitted_mfu:.3f}; "
              "residuals " + ", ".join(f"{r:+.0f}%" for r in out["fit"]["residuals_pct"]))


if __name__ == "__main__":
    main()
