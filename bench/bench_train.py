"""Training throughput: the agent's `lora-sft` step against a plain trl script, and MFU.

Both sides train the same model on the same rows (Mahjong difficulty 1, reference reasoning)
with the same LoRA config, batch, learning rate, steps, precision and torch threads. Tokens/s
counts non-padding tokens between the Trainer's train-begin and its last step end, measured
the same way on both sides. MFU = 6 * params * tokens/s over this machine's fp32 matmul
GFLOP/s (6·P·tokens is the dense-training rule of thumb; LoRA skips the weight gradients of
frozen layers, so for LoRA it overstates the work by about a third).

Run: .venv/bin/python bench/bench_train.py [--model config:base] [--steps 30] [--threads 1]
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

TASK = {"name": "mahjong-winning-tiles", "params": {"difficulty": 1, "n_train": 64, "n_test": 4}}


def write_dataset(path: Path) -> tuple[Path, Any]:
    """Reference-reasoning rows for the task, in the synthesis step's format."""
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
    path.write_bytes(b"\n".join(msgspec.json.encode(r) for r in rows) + b"\n")
    return path, task


def run_agent_step(model: str, data: Path, params: dict[str, Any], work: Path) -> dict[str, Any]:
    """The agent's path: agents.steps.train.run with the lora-sft plugin."""
    from agents.stepctx import StepContext
    from agents.steps import train

    ctx = StepContext(job_id="bench", run_id="bench", step="train", workdir=work,
                      inputs={"dataset": data},
                      args={"model": model, "trainer": "lora-sft", "task": TASK,
                            "params": params, "seed": 0})
    return train.run(ctx)


def run_plain_trl(model_ref: str, data: Path, task: Any, params: dict[str, Any],
                  work: Path) -> dict[str, Any]:
    """A plain trl script: SFTTrainer + peft LoRA on prompt/completion records."""
    import datasets
    import msgspec
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from plugins.models.hf import load_model
    from stratosd.api import DataRow

    rows = [msgspec.json.decode(line, type=DataRow) for line in data.read_bytes().splitlines()
            if line.strip()]
    ds = datasets.Dataset.from_list(
        [{"prompt": task.prompt(r.question), "completion": r.target} for r in rows])
    model, tok = load_model(model_ref, for_training=True)

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t1 = time.monotonic()

    clock = Clock()
    config = SFTConfig(
        output_dir=str(work / "plain"), max_steps=params["max_steps"],
        learning_rate=params["learning_rate"],
        per_device_train_batch_size=params["per_device_train_batch_size"],
        logging_steps=params["logging_steps"], save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), bf16=False, activation_checkpointing=False,
        max_length=params["max_length"], seed=0, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    lora = LoraConfig(r=params["lora_r"], lora_alpha=params["lora_alpha"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok,
                         peft_config=lora, callbacks=[clock])
    trainer.train()
    elapsed = clock.t1 - clock.t0
    tokens = trainer.state.num_input_tokens_seen
    return {"tokens_per_s": tokens / elapsed, "train_tokens": tokens, "train_time_s": elapsed}


def matmul_gflops(n: int = 1024, seconds: float = 2.0) -> float:
    """This machine's fp32 matmul throughput (current torch threads), GFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def _runs(results: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['tokens_per_s']:.0f}" for r in results)


def main() -> None:
    """Print agent vs plain tokens/s, their ratio, and MFU."""
    import torch

    from plugins.students.candidates import param_count
    from plugins.trainers.common import quiet_libraries

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="config:base")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads on both sides (1 is least disturbed by other load)")
    opts = ap.parse_args()
    quiet_libraries()
    threads = opts.threads if opts.threads > 0 else torch.get_num_threads()
    torch.set_num_threads(threads)
    params = {"max_steps": opts.steps, "learning_rate": 3e-3, "per_device_train_batch_size":
              opts.batch, "logging_steps": 1, "max_length": 512, "lora_r": 8, "lora_alpha": 16,
              "save_steps": 10 * opts.steps, "cpu_threads": threads}
    n_params = param_count(opts.model)
    agent, plain = [], []
    peaks = [matmul_gflops()]
    with tempfile.TemporaryDirectory() as tmp:
        data, task = write_dataset(Path(tmp) / "dataset.jsonl")
        for i in range(opts.repeats):  # interleaved, best of each: other load on the box varies
            plain.append(run_plain_trl(opts.model, data, task, params, Path(tmp) / f"p{i}"))
            agent.append(run_agent_step(opts.model, data, params, Path(tmp) / f"a{i}"))
            torch.set_num_threads(threads)
            peaks.append(matmul_gflops())
    best_agent = max(r["tokens_per_s"] for r in agent)
    best_plain = max(r["tokens_per_s"] for r in plain)
    gflops = max(peaks)  # the machine's peak, measured between runs like the training
    achieved = 6 * n_params * best_agent / 1e9
    device = "cuda" if torch.cuda.is_available() else f"cpu ({threads} threads)"
    print(f"model {opts.model}: {n_params / 1e6:.2f}M params, lora-sft r=8, batch {opts.batch}, "
          f"{opts.steps} steps, best of {opts.repeats}, device {device}")
    print(f"agent lora-sft step : {best_agent:10.1f} tokens/s  "
          f"(runs: {_runs(agent)})")
    print(f"plain trl script    : {best_plain:10.1f} tokens/s  "
          f"(runs: {_runs(plain)})")
    print(f"ratio agent/plain   : {best_agent / best_plain:10.3f}  (target >= 0.95)")
    print(f"fp32 matmul         : {gflops:10.1f} GFLOP/s")
    print(f"training (6*P*tok/s): {achieved:10.2f} GFLOP/s  MFU {achieved / gflops:.1%}")
    print(json.dumps({"agent_tokens_per_s": round(best_agent, 1),
                      "plain_tokens_per_s": round(best_plain, 1),
                      "ratio": round(best_agent / best_plain, 3),
                      "matmul_gflops": round(gflops, 1), "train_gflops": round(achieved, 3),
                      "mfu": round(achieved / gflops, 4)}))


if __name__ == "__main__":
    main()
