"""Data-parallel scaling of the train step: 1 and 2 ranks under torchrun, against plain trl.

Every run is the agent's own child (`python -m agents.worker job.json`, the `train` step with
the lora-sft plugin), except the baseline, `bench/plain_trl_sft.py` (trl + peft, no Stratos
code, one process). All train the same rows, model, LoRA config, learning rate, seed and
*global* batch; each rank gets 1 CPU thread:

- plain   : one process, batch B;
- 1 rank  : the distributed path with one rank (`ranks = 1, strategy = "ddp"`: torchrun starts
            it, the launcher forwards its progress), batch B;
- 2 ranks : torchrun, gloo, B/2 per rank (the same examples per optimizer step).

Tokens/s counts non-padding tokens over the training loop (train begin to the last step end,
rank 0's clock; tokens gathered over the ranks). Figures: scaling efficiency = tokens/s of 2
ranks / (2 x tokens/s of 1 rank) (target >= 0.8), and the per-step overhead of the 1-rank
distributed path against plain trl (target >= 0.95x plain). As in bench_train, the headline
sums the fastest repeat of each step (this machine is shared and noisy); whole-run medians
stand beside it. Start-up (torchrun, imports, model load) is reported apart: it is paid once
per job, not per step.

Run: .venv/bin/python bench/bench_scaling.py [--model config:base] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_train import (  # noqa: E402 - after the path set-up
    LORA_ALPHA,
    LORA_R,
    MAX_LENGTH,
    TASK,
    run_plain,
    undisturbed_tokens_per_s,
    write_datasets,
)
from bench.childjob import run_child_job  # noqa: E402


def run_step(model_dir: str, data: Path, opts: argparse.Namespace, work: Path,
             ranks: int) -> dict[str, Any]:
    """One `train` job through the agent's child entry point with `ranks` ranks (torchrun)."""
    params = {"max_steps": opts.steps, "learning_rate": opts.lr,
              "per_device_train_batch_size": opts.batch, "logging_steps": 1,
              "max_length": MAX_LENGTH, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
              "save_steps": 10 * opts.steps, "cpu_threads": 1, "ranks": ranks,
              "strategy": "ddp"}
    args = {"model": model_dir, "trainer": "lora-sft", "task": TASK, "params": params,
            "seed": 0}
    result, wall = run_child_job(work, "train", args, inputs={"dataset": str(data)},
                                 what=f"{ranks}-rank run")
    if result.get("ranks") != ranks:
        sys.exit(f"asked for {ranks} ranks, the step ran {result.get('ranks')}")
    result["tokens_per_s"] = result["train_tokens"] / result["train_time_s"]
    result["wall_s"] = wall
    return result


def _runs(results: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['tokens_per_s']:.0f}" for r in results)


def main() -> None:
    """Print tokens/s of plain trl, 1 rank and 2 ranks, the efficiency and the overhead."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="config:base", help="student ref (config:NAME or a dir)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over the ranks)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--raw", type=Path, default=None, help="write every run's results as JSON")
    opts = ap.parse_args()
    opts.threads = 1  # run_plain's torch threads: one per process, like each rank
    if opts.batch % 2:
        ap.error("--batch must be even (2 ranks split it)")

    from plugins.models.hf import resolve_model
    from plugins.students.candidates import param_count

    model_dir = resolve_model(opts.model)
    n_params = param_count(opts.model)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "1": [], "2": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        agent_data, plain_data = write_datasets(tmp)
        for i in range(opts.repeats):
            order = ["plain", "1", "2"] if i % 2 == 0 else ["2", "1", "plain"]
            for side in order:
                work = tmp / f"{side}-{i}"
                if side == "plain":
                    runs[side].append(run_plain(model_dir, plain_data, opts, work))
                else:
                    runs[side].append(run_step(model_dir, agent_data, opts, work, int(side)))
                print(f"repeat {i + 1}/{opts.repeats} {side:>5}: "
                      f"{runs[side][-1]['tokens_per_s']:.0f} tok/s, "
                      f"wall {runs[side][-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    if opts.raw:
        opts.raw.write_text(json.dumps(runs, default=str))
    tokens = {r["train_tokens"] for rs in runs.values() for r in rs}
    if len(tokens) != 1:
        sys.exit(f"the runs trained different token counts {sorted(tokens)}: not comparable")
    fast = {k: undisturbed_tokens_per_s(v) for k, v in runs.items()}
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    eff, eff_med = fast["2"] / (2 * fast["1"]), med["2"] / (2 * med["1"])
    over, over_med = fast["1"] / fast["plain"], med["1"] / med["plain"]
    step = {k: statistics.median(t for r in v for t in r["step_times_s"])
            for k, v in runs.items()}
    load = os.getloadavg()
    print(f"model {opts.model}: {n_params / 1e6:.2f}M params, lora-sft r={LORA_R}, global batch "
          f"{opts.batch}, {opts.steps} steps, {opts.repeats} repeats, 1 CPU thread per process")
    print(f"machine                : {os.cpu_count()} CPUs, load average {load[0]:.1f} "
          f"{load[1]:.1f} {load[2]:.1f} at the end (shared: other work runs beside the bench)")
    print(f"tokens trained per run : {tokens.pop()} (the same batches on every side)")
    for name, key in (("plain trl (1 process)", "plain"), ("1 rank (torchrun)", "1"),
                      ("2 ranks (torchrun)", "2")):
        print(f"{name:<23}: {fast[key]:8.1f} tok/s undisturbed, median {med[key]:.1f} "
              f"(runs: {_runs(runs[key])}); step median {step[key] * 1e3:.1f} ms")
    print(f"scaling efficiency 2/1 : {eff:.3f} undisturbed, {eff_med:.3f} medians "
          f"(target >= 0.8: {'met' if eff >= 0.8 else 'NOT met'})")
    print(f"1 rank / plain trl     : {over:.3f} undisturbed, {over_med:.3f} medians "
          f"(target >= 0.95: {'met' if over >= 0.95 else 'NOT met'}); per-step overhead "
          f"{(step['1'] - step['plain']) * 1e3:+.2f} ms")
    print("outside the loop       : median " + ", ".join(
        f"{k} {statistics.median(r['wall_s'] - r['train_time_s'] for r in v):.1f} s"
        for k, v in runs.items()) + " per run (spawn to exit: torchrun, imports, model load)")


if __name__ == "__main__":
    main()
