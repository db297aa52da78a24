"""What a user asks for (RunSpec and its parts) and what the pipeline decides on the way."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas.telemetry import Capacity

Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
NonNeg = Annotated[float, Meta(ge=0.0)]
Name = Annotated[str, Meta(min_length=1, max_length=200)]
PluginName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A user-written structure: unknown fields are typos and are refused."""


class TaskSpec(Strict, frozen=True, kw_only=True):
    """Which task pack and how to make or load its data."""

    name: PluginName
    params: dict[str, Any] = {}
    probe_size: Annotated[int, Meta(ge=1, le=100_000)] = 20


class TeacherSpec(Strict, frozen=True, kw_only=True):
    """A candidate teacher: a backend plugin and a model it serves. Secrets come from env."""

    backend: PluginName
    model: Name
    name: str = ""
    params: dict[str, Any] = {}

    @property
    def label(self) -> str:
        """A display name: name when given, else backend:model."""
        return self.name or f"{self.backend}:{self.model}"


class StudentSpec(Strict, frozen=True, kw_only=True):
    """A candidate student: hub id, local path or `config:NAME` (tiny random-init model)."""

    model: Name
    params: dict[str, Any] = {}


class Constraints(Strict, frozen=True, kw_only=True):
    """Hard limits from the user; a run that cannot meet them stops with a report."""

    target_accuracy: Fraction = 0.0
    max_latency_ms: NonNeg | None = None
    budget_usd: NonNeg | None = None
    max_price_usd_per_hour: NonNeg | None = None
    min_gpu_mem_mib: Annotated[int, Meta(ge=0)] = 0
    region: str | None = None
    # the whole job (every phase still to run, as the cost model estimates it) must finish
    # within this many hours; when no single server can, the planner proposes a group of
    # same-region agents (stratosd.groups)
    deadline_hours: Annotated[float, Meta(gt=0.0, le=10_000.0)] | None = None


class ScoreWeights(Strict, frozen=True, kw_only=True):
    """Weights of the multi-objective score (equal by default, see PAPER.md)."""

    accuracy: NonNeg = 1.0
    latency: NonNeg = 1.0
    train_time: NonNeg = 1.0
    cost: NonNeg = 1.0


class RunSpec(Strict, frozen=True, kw_only=True):
    """A job as the user submits it (the TOML file given to `stratosctl submit`)."""

    name: Name
    task: TaskSpec
    teachers: Annotated[list[TeacherSpec], Meta(min_length=1)]
    students: Annotated[list[StudentSpec], Meta(min_length=1)]
    constraints: Constraints = Constraints()
    selector: PluginName = "pfg"
    selector_params: dict[str, Any] = {}
    mode: PluginName = "auto"
    mode_threshold: Fraction = 0.5
    trainer: PluginName = "lora-sft"
    train: dict[str, Any] = {}
    deployer: PluginName = "builtin"
    deploy: bool = True
    # optional override: training hours on 1x A100 80GB; by default the cost model estimates
    # the job's work from the job, and a value far from it is refused without --force
    est_train_hours: NonNeg | None = None
    score: ScoreWeights = ScoreWeights()
    seed: int = 0


class ServerOffer(msgspec.Struct, frozen=True, kw_only=True):
    """A server Stratos could use: a live agent, or an offer from a catalog (no agent yet)."""

    id: str
    source: str = "agent"
    agent_id: str | None = None
    gpu_model: str = ""
    gpu_count: Annotated[int, Meta(ge=0)] = 0
    gpu_mem_mib: Annotated[int, Meta(ge=0)] = 0
    cpu_count: Annotated[int, Meta(ge=0)] = 0
    ram_mib: Annotated[int, Meta(ge=0)] = 0
    price_usd_per_hour: NonNeg = 0.0
    latency_ms: NonNeg = 0.0
    region: str = ""
    hardware_score: float | None = None
    status: Literal["up", "down"] = "up"
    capacity: Capacity | None = None  # measured by the agent; None: the cost model's table
    latency_known: bool = True  # False: nothing measured it (latency_ms is then meaningless)
    busy: bool = False  # its device set is held by another training job
    # a group of servers that trains one job together (stratosd.groups): its agents, the
    # rendezvous host (agent_id) first; empty for one server
    members: list[str] = []


class Selection(msgspec.Struct, frozen=True, kw_only=True):
    """A selector's answer: the pick, the Pareto set, and why."""

    selector: str
    chosen: ServerOffer
    pareto_ids: list[str] = []
    explanation: str = ""
    removed: dict[str, list[str]] = {}
    candidates: int = 0
    details: dict[str, Any] = {}


class TeacherScore(msgspec.Struct, frozen=True, kw_only=True):
    """How a teacher did on the probe sample."""

    name: str
    backend: str
    model: str
    accuracy: Fraction
    n: int
    correct: int
    cost_usd: NonNeg = 0.0
    latency_ms_mean: NonNeg = 0.0
    tokens_out: int = 0
    error: str | None = None


class AccuracyEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """An accuracy measured on n examples with its Wilson 95% interval, and how it was got."""

    accuracy: Fraction
    n: int = 0
    correct: int = 0
    ci_low: Fraction = 0.0
    ci_high: Fraction = 1.0
    basis: str = ""  # e.g. "trial fine-tune (32 steps), held-out train examples" or "few-shot"


class TrialFit(msgspec.Struct, frozen=True, kw_only=True):
    """The pre-screen's short trial fine-tune of a student and its held-out outcome."""

    trainer: str = ""
    steps: int = 0
    loss_first: float | None = None  # mean of the first few logged training losses
    loss_last: float | None = None  # mean of the last few
    loss_drop: float | None = None  # (loss_first - loss_last) / loss_first
    n: int = 0  # held-out examples answered after the trial
    parsed: int = 0  # answers the task could extract (format compliance)
    format_rate: Fraction = 0.0
    format_ci_low: Fraction = 0.0
    format_ci_high: Fraction = 1.0
    correct: int = 0
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    stopped_by_time: bool = False  # the time budget cut the trial or its evaluation short
    error: str | None = None  # the trial itself failed (the student is dropped, with this)


class StudentCandidate(msgspec.Struct, frozen=True, kw_only=True):
    """A student after fit and pre-screen, with the reason it was kept or dropped.

    `prescreen_accuracy` is the few-shot accuracy (the paper's capacity pre-screen) on
    `prescreen_n` examples with its Wilson 95% interval; `trial` is the short trial
    fine-tune; `estimate` is the pre-screen's prediction (the trial's held-out accuracy
    when a trial ran, else the few-shot one), which ranks the kept students.
    """

    model: str
    params_m: float = 0.0
    est_train_mem_mib: float = 0.0
    est_serve_mem_mib: float = 0.0
    fits: bool = True
    prescreen_accuracy: float | None = None
    probe_loss_drop: float | None = None
    kept: bool = True
    reason: str = ""
    prescreen_n: int = 0
    prescreen_ci_low: float | None = None
    prescreen_ci_high: float | None = None
    trial: TrialFit | None = None
    estimate: AccuracyEstimate | None = None
