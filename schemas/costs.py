"""Cost-model values on the wire: estimates with provenance, a job's work, per-phase costs.

Every number the selector, `plan`, the budget check and the report use is an `Estimate`: a
value with an interval and where it came from, never a bare float (shared/COSTMODEL.md).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

EstimateSource = Literal["measured", "calibrated", "prior", "given"]
"""measured: this run, this server; calibrated: the model corrected by N past runs of the same
kind; prior: the model alone, no history; given: typed by the user (e.g. est_train_hours)."""

PHASES: tuple[str, ...] = ("probe", "prescreen", "synthesis", "train", "evaluate", "deploy")
"""The phases a job is billed for, in pipeline order."""


class Estimate(msgspec.Struct, frozen=True, kw_only=True):
    """A value with its interval (low <= value <= high) and its source."""

    value: float
    low: float
    high: float
    source: EstimateSource = "prior"
    n: Annotated[int, Meta(ge=0)] = 0  # past runs behind a calibrated estimate
    unit: str = ""

    def describe(self, fmt: str = "{:.3g}") -> str:
        """'12.3 s (9.1-16.6, calibrated from 4 runs)'."""
        unit = f" {self.unit}" if self.unit else ""
        src = f"{self.source} from {self.n} runs" if self.source == "calibrated" else self.source
        if self.low == self.high == self.value:
            return f"{fmt.format(self.value)}{unit} ({src})"
        return (f"{fmt.format(self.value)}{unit} ({fmt.format(self.low)}-"
                f"{fmt.format(self.high)}, {src})")


class JobWork(msgspec.Struct, frozen=True, kw_only=True):
    """What a job must do, independent of the server it runs on (estimated from the job)."""

    student: str = ""
    params: float = 0.0  # student parameters
    trainable_params: float = 0.0  # all of them for full SFT, the adapter's for LoRA
    weight_bytes: float = 0.0  # bytes of the student's weights in the training dtype
    hidden: int = 0  # the student's width and depth: the attention term of training FLOPs
    layers: int = 0
    seq_tokens: float = 0.0  # tokens per training sequence
    trainer: str = ""
    dtype: str = "fp32"  # training dtype on this kind of server
    train_tokens: float = 0.0  # tokens trained on (rows x length x epochs, or steps x batch)
    train_steps: int = 0
    rollout_tokens: float = 0.0  # tokens GRPO generates
    rollout_batch: int = 8  # completions GRPO generates together (its per-device batch)
    rollout_length: int = 32  # new tokens per completion (max_completion_length)
    warm_start_tokens: float = 0.0  # tokens GRPO's SFT warm start trains on (before GRPO)
    warm_start_steps: int = 0  # optimizer steps of that SFT phase
    synth_rows: int = 0
    synth_new_tokens: float = 0.0  # tokens the teacher writes
    synth_prompt_tokens: float = 0.0
    teacher: str = ""
    teacher_local: bool = True  # runs on the server (hf, vllm, reference) vs an API
    teacher_params: float = 0.0
    teacher_layers: int = 0  # a local teacher's depth: decode's per-layer cost
    teacher_usd: Estimate | None = None  # API teachers: $ for the synthesis
    teacher_tokens_per_s: float | None = None  # measured by the probe
    eval_prompts: int = 0
    eval_new_tokens: float = 0.0
    artifact_bytes: float = 0.0  # model + checkpoints through the object store
    devices: Annotated[int, Meta(ge=1)] = 1  # devices the trainer launches ranks on
    notes: dict[str, str] = {}  # input -> where it came from ("task data", "probe", ...)


class PhaseCost(msgspec.Struct, frozen=True, kw_only=True):
    """One phase of a job on one server: time and $, with how they were computed."""

    phase: str
    seconds: Estimate
    usd: Estimate
    billed_on: Literal["server", "api"] = "server"
    basis: str = ""  # the arithmetic in words
    key: str = ""  # the learned-efficiency key this phase used


class JobEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """A whole job on one server: every phase, and the totals the budget is checked against."""

    server: str
    phases: list[PhaseCost] = []
    seconds: Estimate | None = None
    usd: Estimate | None = None
    capacity_source: Literal["measured", "estimated"] = "estimated"


class StageCost(msgspec.Struct, frozen=True, kw_only=True):
    """A finished phase: what was estimated before it ran and what it measured."""

    phase: str
    server: str
    estimated_s: Estimate | None = None
    measured_s: float | None = None
    estimated_usd: Estimate | None = None
    measured_usd: float | None = None
    key: str = ""
