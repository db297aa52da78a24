"""Peak memory of a few real training steps, measured in a child process for memory-estimate tests.

By default the child runs as a trainer does, so its peak RSS includes what glibc keeps of freed
memory: that is what a CPU host's memory limit sees, and what the estimate is calibrated on.
That retention varies from run to run and machine to machine (the same steps peaked 40-60 MiB
apart), too much to compare two runs. `exact=True` fixes glibc's mmap threshold at 64 KiB, so each
tensor is its own mapping, returned on free: the peak then follows live tensors and repeats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAVE_PROCFS = Path("/proc/self/clear_refs").exists()

MEASURE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from plugins.models.hf import model_config_dict, parse_config_ref

def mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
ref, trainer, ckpt = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
seq, batch, r = map(int, sys.argv[4:7])
name, ov = parse_config_ref(ref)
cfg = LlamaConfig(**model_config_dict(name, ov))
x = torch.randint(5, cfg.vocab_size, (batch, seq))
torch.set_num_threads(1)
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM (peak RSS) to the current RSS
base = mib("VmRSS")
model = AutoModelForCausalLM.from_config(cfg).float().train()
if ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if trainer == "lora-sft":
    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
for _ in range(2):  # the second step runs with the Adam moments allocated
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({"peak_mib": mib("VmHWM") - base}))
"""


def peak_train_mib(ref: str, *, trainer: str = "full-sft", seq: int, batch: int, r: int = 8,
                   gradient_checkpointing: bool = False, exact: bool = False) -> float:
    """Peak RSS growth (VmHWM after a reset) over building the model and two fp32 AdamW steps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if exact:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, "-c", MEASURE, ref, trainer,
                          "1" if gradient_checkpointing else "0", str(seq), str(batch), str(r)],
                         capture_output=True, text=True, cwd=ROOT, env=env, check=True,
                         timeout=120)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])
