"""What the tenant_* steps share: the tenant's local data, its state on this agent, LoRA I/O.

The data file named by `data_path` is opened only here, inside the tenant's own agent. A
tenant's models live under `<agent work dir>/runs/<job id>/tenants/<tenant>/<track>/`: the
adapter of each round (`adapter-rN`) and, once an update was applied, the merged full model
(`model`). Nothing under that directory is uploaded; only what a step writes to its `out/`
(the per-round update) travels, and the steps say how many bytes it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from agents.stepctx import StepContext
from stratosd.api import DataRow, Example, TaskPack
from stratosd.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

TEACHER = "tenant-labels"  # who writes the targets: the tenant's own gold answers, on its agent
PEFT_PREFIX = "base_model.model."


class TenantArgs(msgspec.Struct, frozen=True, kw_only=True):
    """Arguments every tenant step takes (unknown ones are refused by each step)."""

    tenant: str
    data_path: str
    test_fraction: float = 0.25
    question_field: str = "question"
    answer_field: str = "answer"
    split_seed: int = 0


def parse_args(ctx: StepContext, cls: type[msgspec.Struct]) -> Any:
    """The step's args as cls; a bad or unknown field is a ConfigError naming it."""
    try:
        return msgspec.convert(ctx.args, cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"bad {ctx.step} arguments: {exc}",
                          hint="fix the named field in the step arguments") from None


def local_task(ctx: StepContext, args: TenantArgs) -> TaskPack:
    """The tenant's data as a jsonl-qa task (split by test_fraction and split_seed)."""
    path = Path(args.data_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"tenant {args.tenant}: data file {str(path)!r} is not on this agent",
                          hint="list in the tenant's `agents` only agents that hold its data",
                          field=f"tenants.{args.tenant}.data_path")
    return ctx.plugins.task("jsonl-qa", {
        "path": str(path), "test_fraction": args.test_fraction, "seed": args.split_seed,
        "question_field": args.question_field, "answer_field": args.answer_field})


def probe_split(task: TaskPack, probe_size: int) -> tuple[list[Example], list[Example]]:
    """(fit, probe) parts of the train split: the last probe_size rows are the probe."""
    train = task.examples("train")
    if len(train) <= probe_size:
        raise ConfigError(f"the tenant's train split ({len(train)} rows) is not larger than "
                          f"probe_size {probe_size}", hint="lower students.probe_size",
                          field="students.probe_size")
    return train[:-probe_size], train[-probe_size:]


def write_rows(task: TaskPack, examples: list[Example], path: Path) -> Path:
    """Training rows (DataRow JSONL) in the step's private workdir, never in out/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [DataRow(example_id=ex.id, question=ex.question, answer=ex.answer, reasoning="",
                    target=task.format_target("", ex.answer), teacher=TEACHER, mode="labels")
            for ex in examples]
    path.write_bytes(b"\n".join(msgspec.json.encode(r) for r in rows) + b"\n")
    return path


def track_dir(ctx: StepContext, tenant: str, track: str) -> Path:
    """This tenant's models of one track (agg, alone, probe-N) on this agent."""
    for value, what in ((tenant, "tenant"), (track, "track")):
        if not value or "/" in value or value.startswith("."):
            raise ConfigError(f"bad {what} name {value!r}", field=what,
                              hint="use [a-z0-9_-] names")
    path = ctx.state_dir.parent / "tenants" / tenant / track
    path.mkdir(parents=True, exist_ok=True)
    return path


def current_model(track: Path, base: str) -> str:
    """The track's merged model when an update was applied, else the student's base ref."""
    merged = track / "model"
    return str(merged) if (merged / "config.json").is_file() else base


def read_lora(adapter: Path) -> dict[str, np.ndarray]:
    """A peft adapter as `<module>.lora_A` (r×in), `.lora_B` (out×r), `.scaling` arrays."""
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    rank = int(cfg["r"])
    scaling = float(cfg.get("lora_alpha", rank)) / rank
    out: dict[str, np.ndarray] = {}
    for key, value in load_file(str(adapter / "adapter_model.safetensors")).items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.weight"
            if name.endswith(tail):
                module = name[: -len(tail)]
                out[f"{module}.{part}"] = value.astype(np.float32)
                out[f"{module}.scaling"] = np.asarray(scaling, dtype=np.float32)
    if not out:
        raise ConfigError(f"adapter {adapter} holds no LoRA weights",
                          hint="train with the lora-sft trainer", field="trainer")
    return out


def merge_into(model_ref: str, deltas: dict[str, np.ndarray], out: Path) -> Path:
    """Save model_ref with W += ΔW for every module as a full model directory at out."""
    import torch

    from plugins.models.hf import load_model

    model, tokenizer = load_model(model_ref)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module, dw in deltas.items():
            weight = params.get(f"{module}.weight")
            if weight is None or tuple(weight.shape) != tuple(dw.shape):
                raise ConfigError(f"update for {module} (shape {tuple(dw.shape)}) does not fit "
                                  f"{model_ref}", hint="aggregate only within one student",
                                  field="update")
            weight.add_(torch.from_numpy(dw).to(weight.dtype))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def fit(ctx: StepContext, task: TaskPack, examples: list[Example], *, model: str, out: Path,
        steps: int, lora_r: int, learning_rate: float, params: dict[str, Any], seed: int,
        trainer: str = "lora-sft") -> dict[str, Any]:
    """Train a LoRA adapter on examples with the trainer plugin; the adapter stays at out."""
    from stratosd.api import TrainContext
    from stratosd.plugins import lookup

    rows = write_rows(task, examples, ctx.workdir / "private" / f"{out.name}.jsonl")
    ckpt = ctx.workdir / "private" / f"{out.name}-ckpt"
    merged = {"max_steps": steps, "lora_r": lora_r, "lora_alpha": 2 * lora_r,
              "learning_rate": learning_rate, "save_steps": max(steps, 1) * 10,
              "save_total_limit": 1, **params}
    cls = lookup(ctx.plugins.trainers, trainer, "trainer")
    tctx = TrainContext(model=model, train_file=rows, out_dir=out, checkpoint_dir=ckpt,
                        params=merged, task=task, seed=seed, progress=ctx.progress,
                        should_stop=ctx.should_stop)
    try:
        metrics = cls().train(tctx)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
        rows.unlink(missing_ok=True)  # the rows are the tenant's data: not kept around
    return {k: metrics.get(k) for k in ("first_loss", "final_loss", "steps", "train_time_s",
                                        "params_m")}


def evaluate_model(ctx: StepContext, task: TaskPack, examples: list[Example], model: str, *,
                   seed: int = 0, max_new_tokens: int = 12, batch_size: int = 64,
                   loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Accuracy, partial credit and mean latency per answer of model on examples (the task's
    scoring); `loaded`: model's (model, tokenizer), already loaded by the caller."""
    from plugins.models.evaluate import evaluate, local_generator

    generate = local_generator(model, seed=seed, max_new_tokens=max_new_tokens, loaded=loaded)
    res = evaluate(task, examples, generate, batch_size=batch_size, max_records=0)
    return {"accuracy": res.accuracy, "n": res.n, "correct": res.correct,
            "partial": res.partial, "latency_ms": res.latency_ms_mean}


def target_scores(task: TaskPack, examples: list[Example], model: str, *, seed: int = 0,
                  loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Graded quality of model on examples, teacher-forced on each gold target as it is trained
    (`prompting.encode_example` of `task.format_target("", answer)`, completion tokens only):
    `token_accuracy` (share of target tokens that are the model's argmax), `target_nll` (the
    rows' mean of each row's negative log-likelihood per target token, nats) and
    `target_nll_se` (its standard error over the rows). Unlike exact match these move as soon as
    a model learns anything of the targets. `loaded`: as in evaluate_model."""
    import statistics

    import torch

    from plugins.models import prompting
    from plugins.models.hf import load_model

    net, tokenizer = loaded if loaded is not None else load_model(model, seed=seed)
    net.eval()
    device = next(net.parameters()).device
    row_nll: list[float] = []
    tokens = hits = 0
    with torch.inference_mode():
        for ex in examples:
            enc = prompting.encode_example(tokenizer, prompting.task_messages(task, ex.question),
                                           task.format_target("", ex.answer))
            ids = torch.tensor([enc["input_ids"]], device=device)
            mask = torch.tensor(enc["completion_mask"][1:], device=device).bool()
            logp = torch.log_softmax(net(input_ids=ids).logits[0, :-1][mask].float(), dim=-1)
            gold = ids[0, 1:][mask]
            if not len(gold):
                continue
            row_nll.append(-float(logp.gather(1, gold[:, None]).mean()))
            hits += int((logp.argmax(dim=-1) == gold).sum())
            tokens += len(gold)
    if not row_nll:
        return {"token_accuracy": None, "target_nll": None, "target_nll_se": None}
    se = statistics.stdev(row_nll) / len(row_nll) ** 0.5 if len(row_nll) > 1 else 0.0
    return {"token_accuracy": hits / tokens, "target_nll": statistics.fmean(row_nll),
            "target_nll_se": se}


def param_count(model: str) -> int:
    """Parameters of a model ref (built on the meta device when it is a config: ref)."""
    from plugins.models.hf import load_model

    loaded, _tok = load_model(model)
    return int(sum(p.numel() for p in loaded.parameters()))
