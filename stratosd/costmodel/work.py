"""A job's work, estimated from the job: what it trains, generates and moves.

Nothing here depends on the server. Inputs and where they come from (`JobWork.notes` keeps
the same words for the plan and the report):

- the student: parameter count and shape from its config (`config:NAME`, a local directory's
  config.json), or from the size in a hub id ("Qwen2.5-0.5B"); at server selection the largest
  candidate student is assumed (the conservative choice), after select_student the chosen one;
- training tokens: rows x tokenised length x epochs, or max_steps x batch x length, whichever
  stops first. Rows and their text come from the task's training data (the task's own prompt
  and its reference reasoning where the task has one, else synthesis' max_new_tokens); length
  in tokens is counted with the student's own tokenizer and chat template, as the trainer
  renders rows (`stratosd.costmodel.tokens`); where that tokenizer is not on this machine (a
  hub id not in the local cache), characters x a prior (0.3 tokens per character for BPE,
  1.0 for the char-level test tokenizer) + 2, said in the notes; capped at max_length; after
  synthesis, the rows kept and their measured length;
- synthesis: rows x tries x max_new_tokens written by the teacher; a remote API teacher is
  billed per token at its price (`plugins.teachers.common.price_for`), and one with no known
  price is refused unless the job gives it;
- GRPO's warm start: with `warm_start = "auto"` (the default) GRPO first runs SFT on the rows
  (`plugins.trainers.grpo`: LoRA-SFT when `lora_r` > 0, else full SFT, with the SFT trainer's
  batch unless the job sets one): rows x row length for one pass (`sft_steps = -1`), or
  sft_steps x batch x row length; none with "none", a given warm-start path, or a student that
  is already an adapter. Its tokens and steps are `JobWork.warm_start_tokens`/`_steps`;
- evaluation: test prompts x max_new_tokens, twice (before and after training);
- devices: the ranks the trainer launches (`ranks`; 0, the default, is every device of the
  server, which the cost model caps per offer); 1 for a trainer that runs on one device. The
  global batch is the job's on any rank count, so the tokens trained do not depend on it.

No torch: this runs in the daemon and in `stratosctl plan`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.costs import Estimate, JobWork
from schemas.specs import RunSpec, StudentSpec, TeacherSpec
from schemas.stages import ProbeTeachersResult
from stratosd.costmodel.tokens import token_profile
from stratosd.errors import ConfigError

if TYPE_CHECKING:
    from stratosd.plugins import Plugins

BPE_TOKENS_PER_CHAR = 0.3
CHAR_TOKENS_PER_CHAR = 1.0
SAMPLE_ROWS = 64  # rows whose text is measured for the mean length
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ALL_DEVICES = 1024  # `ranks = 0`: one rank per device, whatever the server has
_STAGE_KEYS = ("synthesis", "prescreen", "evaluate", "deploy")
_SIZE_IN_NAME = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class Shape:
    """What the cost model needs of a model."""

    params: float
    hidden: int
    layers: int
    vocab: int
    tokens_per_char: float
    source: str  # where the numbers came from


def _count(cfg: Mapping[str, Any]) -> Shape:
    """Parameters of a Llama/Qwen-style decoder from its config (embeddings, blocks, head)."""
    h = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
    vocab = int(cfg.get("vocab_size") or 0)
    if not (h and layers and vocab):
        raise ValueError("config lacks hidden_size, num_hidden_layers or vocab_size")
    heads = int(cfg.get("num_attention_heads") or max(1, h // 128))
    head_dim = int(cfg.get("head_dim") or h // heads)
    kv = int(cfg.get("num_key_value_heads") or heads) * head_dim
    inter = int(cfg.get("intermediate_size") or 4 * h)
    q = heads * head_dim
    block = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    arch = " ".join([str(cfg.get("model_type") or ""), *map(str, cfg.get("architectures") or [])])
    if cfg.get("attention_bias", "qwen2" in arch.lower()):  # Qwen2: q, k and v carry biases
        block += q + 2 * kv
    tied = bool(cfg.get("tie_word_embeddings", False))
    params = vocab * h * (1 if tied else 2) + layers * block + h
    return Shape(params=float(params), hidden=h, layers=layers, vocab=vocab,
                 tokens_per_char=BPE_TOKENS_PER_CHAR, source="config")


def model_shape(ref: str) -> Shape:
    """The shape of a model ref without loading it (no torch)."""
    if ref.startswith("config:"):
        from plugins.models.hf import model_config_dict, parse_config_ref
        from plugins.models.tiny import model_spec

        name, overrides = parse_config_ref(ref)
        spec = model_spec(name)
        s = _count({"model_type": spec.arch, **model_config_dict(name, overrides)})
        if spec.bpe:
            return Shape(s.params, s.hidden, s.layers, s.vocab, BPE_TOKENS_PER_CHAR,
                         f"{ref} config (byte-level BPE tokenizer)")
        return Shape(s.params, s.hidden, s.layers, s.vocab, CHAR_TOKENS_PER_CHAR,
                     f"{ref} config (char-level tokenizer)")
    path = Path(ref).expanduser()
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())
        return model_shape(str(base.get("base_model_name_or_path", "")))
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        try:
            s = _count(cfg)
        except ValueError as exc:
            raise ConfigError(f"cannot size model {ref!r} from its config.json: {exc}",
                              hint="use a decoder-only model with a standard config",
                              field="students") from exc
        return Shape(s.params, s.hidden, s.layers, s.vocab, BPE_TOKENS_PER_CHAR,
                     f"{path}/config.json")
    m = _SIZE_IN_NAME.search(ref.rsplit("/", 1)[-1])
    if m:
        params = float(m.group(1)) * (1e9 if m.group(2).lower() == "b" else 1e6)
        hidden = max(256, int(round((params / 12 / 24) ** 0.5 / 64)) * 64)
        layers = max(2, int(params / (12 * hidden * hidden)))
        return Shape(params, hidden, layers, 32_000, BPE_TOKENS_PER_CHAR,
                     f"the size in the name {ref!r} (shape guessed)")
    raise ConfigError(
        f"cannot tell the size of model {ref!r}: no config.json there and no size in its name",
        hint="use a local model directory, a hub id with its size (e.g. Qwen2.5-0.5B) or "
             "config:NAME", field="students")


def _train_params(spec: RunSpec) -> dict[str, Any]:
    return {k: v for k, v in spec.train.items() if k not in _STAGE_KEYS}


def _stage(spec: RunSpec, key: str) -> dict[str, Any]:
    value = spec.train.get(key, {})
    return dict(value) if isinstance(value, dict) else {}


def resolved_train_params(spec: RunSpec, params: float) -> dict[str, Any]:
    """The trainer's size defaults for this student, then the job's overrides."""
    from plugins.trainers.hparams import size_defaults

    return {**size_defaults(int(params), spec.trainer), **_train_params(spec)}


@dataclass(frozen=True)
class TaskSample:
    """Sizes of a task's data, measured on its examples."""

    train_rows: int
    test_rows: int
    prompt_chars: float  # mean characters of the forward prompt
    target_chars: float | None  # mean characters of the reference target (None: no reasoner)
    rows: tuple[tuple[str, str], ...] = ()  # sampled (user content, target or "") pairs


def task_sample(spec: RunSpec, plugins: Plugins) -> TaskSample:
    """Rows and mean text lengths of the job's task (the task pack's own data)."""
    task = plugins.task(spec.task.name, dict(spec.task.params))
    train = task.examples("train")
    test = task.examples("test")
    step = max(1, len(train) // SAMPLE_ROWS)
    sample = train[::step][:SAMPLE_ROWS]
    prompts = [task.prompt(e.question) for e in sample]
    targets = []
    for e in sample:
        reasoning = task.reference_reasoning(e.question, e.answer)
        if reasoning is None:
            break
        targets.append(task.format_target(reasoning, e.answer))
    known = bool(targets) and len(targets) == len(sample)
    return TaskSample(
        train_rows=len(train), test_rows=len(test),
        prompt_chars=sum(map(len, prompts)) / len(prompts) if prompts else 0.0,
        target_chars=sum(map(len, targets)) / len(targets) if known else None,
        rows=tuple(zip(prompts, targets if known else [""] * len(prompts), strict=True)))


def _int(value: Any, default: int) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else default


def train_tokens(p: Mapping[str, Any], rows: int, row_tokens: float) -> tuple[float, int]:
    """(tokens trained on, optimizer steps): max_steps x batch, or rows x epochs."""
    batch = _int(p.get("per_device_train_batch_size"), 8) * _int(
        p.get("gradient_accumulation_steps"), 1)
    max_steps = _int(p.get("max_steps"), -1)
    if max_steps > 0:
        return float(max_steps * batch * row_tokens), max_steps
    epochs = float(p.get("num_train_epochs") or 1)
    steps = math.ceil(rows / max(batch, 1)) * epochs
    return float(rows * epochs * row_tokens), int(steps)


def teacher_cost(spec: RunSpec, teacher: TeacherSpec, plugins: Plugins, prompt_tokens: float,
                 new_tokens: float) -> tuple[bool, Estimate | None]:
    """(remote?, $ for these tokens): a remote API teacher with no known price is refused."""
    from plugins.teachers.common import PRICES_USD_PER_MTOK, price_for

    backend = plugins.teachers.get(teacher.backend)
    if not getattr(backend, "remote", False):
        return False, None
    name = teacher.model.rsplit("/", 1)[-1].lower()
    known = any(name.startswith(k) for k in PRICES_USD_PER_MTOK)
    given = "price_in_per_mtok" in teacher.params or "price_out_per_mtok" in teacher.params
    if not known and not given:
        raise ConfigError(
            f"API teacher {teacher.label!r} ({teacher.model}) has no known price, so the budget "
            "cannot be checked",
            hint="add price_in_per_mtok and price_out_per_mtok (USD per million tokens) to "
                 "its [teachers.params]", field="teachers")
    p_in, p_out = price_for(teacher.model, teacher.params)
    usd = (prompt_tokens * p_in + new_tokens * p_out) / 1e6
    # token counts are estimates: completions stop early or run to max_new_tokens
    return True, Estimate(value=usd, low=usd * 0.3, high=usd * 1.2, source="prior", unit="USD")


def estimate_work(
    spec: RunSpec,
    plugins: Plugins,
    *,
    student: str | None = None,
    rows: int | None = None,
    row_chars: float | None = None,
    probe: ProbeTeachersResult | None = None,
    sample: TaskSample | None = None,
) -> JobWork:
    """The job's work from its spec; later stages refine it (chosen student, rows kept,
    the teacher's measured tokens/s)."""
    notes: dict[str, str] = {}
    if student is None:
        shapes = [(model_shape(s.model), s) for s in spec.students]
        shape, chosen = max(shapes, key=lambda x: x[0].params)
        notes["student"] = (f"{chosen.model}: the largest of {len(shapes)} candidate(s), "
                            "until select_student picks one")
    else:
        shape, chosen = model_shape(student), StudentSpec(model=student)
        notes["student"] = f"{student}: chosen by select_student"
    notes["student_size"] = f"{shape.params / 1e6:.3g}M parameters from {shape.source}"
    sample = sample or task_sample(spec, plugins)
    p = resolved_train_params(spec, shape.params)
    syn = _stage(spec, "synthesis")
    max_new = _int(syn.get("max_new_tokens"), 256)
    tpc = shape.tokens_per_char
    profile = token_profile(chosen.model, sample.rows) if sample.rows else None
    if profile is not None:
        overhead, per_char = profile.overhead, profile.per_char
        notes["tokens"] = (f"{profile.source}: {overhead:.0f} tokens of prompt format per row "
                           f"+ {per_char:.3f} tokens per character")
    else:
        overhead, per_char = 2.0, tpc  # bos/eos
        notes["tokens"] = (f"prior {tpc} tokens per character + 2 (the student's tokenizer is "
                           "not on this machine; the chat template's wrapper is not counted)")
    extra = 0.0
    if row_chars is None:
        target = sample.target_chars
        if target is None:
            target, extra = 0.0, float(max_new)
            notes["row_length"] = (f"prompt {sample.prompt_chars:.0f} chars (task data) + "
                                   f"{max_new} new tokens (synthesis max_new_tokens, no "
                                   "reference reasoning to measure)")
        else:
            notes["row_length"] = (f"prompt {sample.prompt_chars:.0f} + target {target:.0f} "
                                   "chars, measured on the task's training data")
        row_chars = sample.prompt_chars + target
    else:
        notes["row_length"] = f"{row_chars:.0f} chars per row, measured on the synthesised data"
    max_len = _int(p.get("max_length"), 512)
    full_row = overhead + row_chars * per_char + extra
    row_tokens = min(full_row, float(max_len))
    n_rows = rows if rows is not None else sample.train_rows
    notes["rows"] = (f"{n_rows} rows kept by synthesis" if rows is not None
                     else f"{n_rows} training rows of the task")
    tokens, steps = train_tokens(p, n_rows, row_tokens)
    notes["train_tokens"] = (f"{steps} steps x batch x {row_tokens:.0f} tokens per row"
                             if _int(p.get("max_steps"), -1) > 0
                             else f"{n_rows} rows x {row_tokens:.0f} tokens x epochs")
    lora_r = _int(p.get("lora_r"), 0)
    lora = spec.trainer == "lora-sft" or (spec.trainer == "grpo" and lora_r > 0)
    trainable = (lora_r * shape.layers * 12 * shape.hidden if lora else shape.params)
    rollout = warm_tokens = 0.0
    warm_steps = 0
    rollout_batch = _int(p.get("per_device_train_batch_size"), 4)
    rollout_length = _int(p.get("max_completion_length"), 32)
    if spec.trainer == "grpo":
        rollout = float(steps * rollout_batch * rollout_length)
        warm_tokens, warm_steps = warm_start_work(spec, chosen.model, shape.params, p, n_rows,
                                                  full_row, notes)
    tries = _int(syn.get("tries"), 4)
    synth_rows = sample.train_rows
    teacher = spec.teachers[0]
    remote, usd = False, None
    for t in spec.teachers:  # the dearest teacher: the probe may pick any of them
        r, u = teacher_cost(spec, t, plugins, synth_rows * tries * sample.prompt_chars * 0.3,
                            synth_rows * tries * max_new)
        if r and (usd is None or (u is not None and u.value > usd.value)):
            remote, usd, teacher = r, u, t
    teacher_params, teacher_layers = 0.0, 0
    if not remote:
        try:
            tshape = model_shape(teacher.model)
            teacher_params, teacher_layers = tshape.params, tshape.layers
        except ConfigError:
            pass  # a reasoner or an unsized local model: learned per phase
    ev = _stage(spec, "evaluate")
    n_test = _int(ev.get("limit"), sample.test_rows) or sample.test_rows
    eval_new = _int(ev.get("max_new_tokens"), 128)
    tps = None
    if probe is not None:
        got = [s.tokens_out / max(s.latency_ms_mean * 1e-3 * max(s.n, 1), 1e-9)
               for s in probe.scores if s.name == teacher.label and s.tokens_out]
        tps = got[0] if got else None
    dtype = "fp32"
    return JobWork(
        student=chosen.model, params=shape.params, trainable_params=float(trainable),
        weight_bytes=shape.params * BYTES[dtype], hidden=shape.hidden, layers=shape.layers,
        seq_tokens=row_tokens, trainer=spec.trainer, dtype=dtype,
        train_tokens=tokens, train_steps=steps, rollout_tokens=rollout,
        rollout_batch=max(rollout_batch, 1), rollout_length=max(rollout_length, 1),
        warm_start_tokens=warm_tokens, warm_start_steps=warm_steps,
        synth_rows=synth_rows * tries, synth_new_tokens=float(synth_rows * tries * max_new),
        synth_prompt_tokens=float(synth_rows * tries * sample.prompt_chars * tpc),
        teacher=teacher.label, teacher_local=not remote, teacher_params=teacher_params,
        teacher_layers=teacher_layers,
        teacher_usd=usd, teacher_tokens_per_s=tps, eval_prompts=2 * n_test,
        eval_new_tokens=float(2 * n_test * eval_new),
        artifact_bytes=shape.params * 4 * (3 if not lora else 1),
        devices=train_ranks(spec, p, plugins, notes), notes=notes,
    )


def warm_start_work(spec: RunSpec, student: str, params: float, p: Mapping[str, Any],
                    rows: int, row_tokens: float, notes: dict[str, str]) -> tuple[float, int]:
    """(tokens, optimizer steps) of GRPO's SFT warm start, as `plugins.trainers.grpo` runs it:
    the SFT trainer's size defaults, the job's shared params, `sft_steps` or one pass."""
    from plugins.trainers.grpo import SHARED_SFT_PARAMS, WARM_DEFAULTS
    from plugins.trainers.hparams import size_defaults

    choice = p.get("warm_start", WARM_DEFAULTS["warm_start"])
    if choice == "none":
        notes["warm_start"] = "none (warm_start = \"none\"): GRPO starts from the student"
        return 0.0, 0
    if choice != "auto":
        notes["warm_start"] = f"from {choice} (given): no SFT phase"
        return 0.0, 0
    if (Path(student).expanduser() / "adapter_config.json").is_file():
        notes["warm_start"] = f"none: the student {student} is an SFT adapter GRPO starts from"
        return 0.0, 0
    sft = "lora-sft" if _int(p.get("lora_r"), 0) > 0 else "full-sft"
    q = {**size_defaults(int(params), sft),
         **{k: v for k, v in _train_params(spec).items() if k in SHARED_SFT_PARAMS}}
    batch = max(_int(q.get("per_device_train_batch_size"), 8)
                * _int(q.get("gradient_accumulation_steps"), 1), 1)
    length = min(row_tokens, float(_int(q.get("max_length"), 512)))
    sft_steps = _int(p.get("sft_steps"), WARM_DEFAULTS["sft_steps"])
    if sft_steps > 0:
        tokens, steps = float(sft_steps * batch * length), sft_steps
        how = f"sft_steps {sft_steps} x batch {batch} x {length:.0f} tokens"
    else:
        tokens, steps = float(rows * length), math.ceil(rows / batch)
        how = f"one pass: {rows} rows x {length:.0f} tokens, {steps} steps of batch {batch}"
    notes["warm_start"] = (f"SFT warm start ({sft}, warm_start = \"auto\") before GRPO: {how} "
                           f"= {tokens:.3g} tokens (assumes the rows have targets, as "
                           "synthesised rows do)")
    return tokens, steps


def train_ranks(spec: RunSpec, p: Mapping[str, Any], plugins: Plugins,
                notes: dict[str, str]) -> int:
    """Devices the trainer will launch ranks on (ALL_DEVICES: every one the server has)."""
    try:
        trainer = plugins.trainers.get(spec.trainer)
    except ConfigError:
        trainer = None
    if not getattr(trainer, "supports_ranks", False):
        notes["devices"] = f"{spec.trainer} trains on one device"
        return 1
    asked = _int(p.get("ranks"), 0)
    if asked > 0:
        notes["devices"] = f"ranks = {asked} (the job's)"
        return asked
    notes["devices"] = "one rank per device of the server (ranks = 0)"
    return ALL_DEVICES

