"""A plain trl LoRA-SFT script: the baseline `bench_train.py` measures the agent against.

Nothing from Stratos is imported: the model and tokenizer load from a local directory with
transformers, the data is a prompt/completion JSONL, and trl's SFTTrainer + peft train it with
the hyper-parameters given on the command line. The only addition is a callback that clocks
the training loop (train begin to the last step end, and each step), the same windows the
agent's trainer reports. Prints one JSON line: tokens/s, tokens, seconds, per-step seconds
and the final loss (the caller times the whole process).

Run: python bench/plain_trl_sft.py --model-dir DIR --data prompts.jsonl --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def main() -> None:
    """Train with trl SFTTrainer + peft LoRA and print the throughput as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="save_pretrained directory")
    ap.add_argument("--data", required=True, help="JSONL of {prompt, completion}")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()

    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    datasets.disable_progress_bars()
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        opts.model_dir, dtype=torch.float32 if not cuda else "auto")
    tok = AutoTokenizer.from_pretrained(opts.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    ds = datasets.load_dataset("json", data_files=opts.data, split="train")

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = self.t1 = time.monotonic()
            self.step_times: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.monotonic()
            self.step_times.append(now - self.t1)
            self.t1 = now

    clock = Clock()
    config = SFTConfig(
        output_dir=opts.out, max_steps=opts.steps, learning_rate=opts.lr,
        per_device_train_batch_size=opts.batch, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=not cuda, bf16=False, max_length=opts.max_length,
        activation_checkpointing=False,  # trl turns it on by default: recompute costs ~35 %
        seed=opts.seed, data_seed=opts.seed, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    lora = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok,
                         peft_config=lora, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # no per-step stdout: as quiet as the agent's
    trainer.train()
    trainer.save_model(opts.out)
    elapsed = clock.t1 - clock.t0
    tokens = int(trainer.state.num_input_tokens_seen)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({"tokens_per_s": tokens / elapsed, "train_tokens": tokens,
                      "train_time_s": elapsed, "steps": int(trainer.state.global_step),
                      "final_loss": losses[-1] if losses else None,
                      "step_times_s": [round(t, 5) for t in clock.step_times]}))


if __name__ == "__main__":
    main()
