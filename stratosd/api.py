"""Public plugin API: the classes plugins register and the values they exchange.

Plugins import only `stratosd` (hookimpl), `stratosd.api`, `stratosd.errors` and `schemas`.
Registration hooks return *classes*; a class is instantiated per use with the user's params.
Heavy imports (torch, transformers, trl, vllm) happen inside methods, never at module import.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import msgspec

from schemas.specs import (
    Constraints,
    Selection,
    ServerOffer,
    TeacherSpec,
)

if TYPE_CHECKING:
    from stratosd.costmodel import JobCosting

# --- servers --------------------------------------------------------------------------


class ServerSelector(abc.ABC):
    """Picks one server from candidate offers under hard constraints, and explains why."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params: dict[str, Any] = dict(params or {})

    @abc.abstractmethod
    def select(
        self,
        offers: Sequence[ServerOffer],
        constraints: Constraints,
        *,
        costing: JobCosting | None = None,
        est_train_hours: float | None = None,
        seed: int = 0,
    ) -> Selection:
        """Return the pick with its explanation; raise errors.Infeasible naming the constraint.

        costing: the job's cost model (`stratosd.costmodel.JobCosting`): per-offer seconds, $
        and effective hardware via `costing.columns(offers)`, a phase-by-phase estimate via
        `costing.estimate(offer)`. The daemon always passes it; est_train_hours (training
        hours on 1x A100 80GB) is for callers that have no job, and is ignored when costing
        is given. `plugins.selectors.objectives.filter_offers` applies the hard constraints
        with the same numbers the built-in selectors use."""


class OfferCatalog(abc.ABC):
    """A source of servers that have no agent yet (a provider's price list, a static file)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abc.abstractmethod
    def offers(self) -> list[ServerOffer]:
        """All offers this catalog knows."""


# --- tasks ------------------------------------------------------------------------------


class Example(msgspec.Struct, frozen=True, kw_only=True):
    """One question with its gold answer (answers are canonical strings)."""

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = {}


class DataIssue(msgspec.Struct, frozen=True, kw_only=True):
    """A problem found in a task's data before training (duplicate, overlap, bad row)."""

    kind: Literal["duplicate", "overlap", "malformed"]
    message: str
    ids: list[str] = []


Split = Literal["train", "test"]


class TaskPack(abc.ABC):
    """Everything Stratos knows about a task: data, prompts, answer extraction, scoring,
    and where the domain allows, a verifier and a reference reasoner."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params: dict[str, Any] = dict(params or {})

    @abc.abstractmethod
    def examples(self, split: Split) -> list[Example]:
        """The examples of a split (deterministic for generated tasks)."""

    def prompt(self, question: str) -> str:
        """Forward prompt: ask for step-by-step reasoning ending in `Answer: ...`."""
        return f"{question}\nThink step by step, then give the final line as `Answer: <answer>`."

    def injection_prompt(self, question: str, answer: str) -> str:
        """Knowledge Injection prompt: the teacher sees the answer and writes the reasoning."""
        return (
            f"{question}\nThe correct answer is: {answer}\n"
            "Write the step-by-step reasoning that leads to this answer, "
            "then give the final line as `Answer: <answer>`."
        )

    @abc.abstractmethod
    def extract(self, output: str) -> str | None:
        """The canonical answer in a model's output, or None when there is none."""

    @abc.abstractmethod
    def score(self, predicted: str | None, gold: str) -> float:
        """1.0 for a correct answer, 0.0 otherwise."""

    def partial_score(self, predicted: str | None, gold: str) -> float:
        """Partial credit in [0, 1] (defaults to score)."""
        return self.score(predicted, gold)

    def verify(self, question: str, reasoning: str, answer: str) -> bool | None:
        """Does this reasoning really lead to this answer? None when the task has no verifier."""
        return None

    def reference_reasoning(self, question: str, answer: str) -> str | None:
        """A correct derivation for question given its answer; None when the task has none."""
        return None

    def format_target(self, reasoning: str, answer: str) -> str:
        """The training target a student learns to write."""
        return f"{reasoning.rstrip()}\nAnswer: {answer}"

    def check_data(self) -> list[DataIssue]:
        """Duplicates, train/test overlap and malformed rows, reported before any training."""
        return []


# --- teachers ---------------------------------------------------------------------------


class TeacherRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One generation request. question/answer are there for teachers that use structure."""

    prompt: str
    question: str = ""
    answer: str | None = None


class Generation(msgspec.Struct, frozen=True, kw_only=True):
    """A teacher's answer to one request, with what it cost."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    error: str | None = None


class TeacherBackend(abc.ABC):
    """A model that answers prompts: an API, a local model, a vLLM engine, a reasoner."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # True for a paid remote API (billed per token, needs a known price); False when the
    # model runs on the server (its time is billed at the server's $/h)
    remote: ClassVar[bool] = False

    def __init__(self, spec: TeacherSpec, task: TaskPack | None = None) -> None:
        self.spec = spec
        self.task = task

    @abc.abstractmethod
    async def generate(
        self,
        requests: Sequence[TeacherRequest],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """One Generation per request, in order; failures are Generations with error set."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections, processes or GPU memory."""


# --- distillation modes --------------------------------------------------------------------


class DataRow(msgspec.Struct, frozen=True, kw_only=True):
    """One synthesised training row with its provenance."""

    example_id: str
    question: str
    answer: str
    reasoning: str
    target: str
    teacher: str
    mode: str
    tries: int = 1
    verified: bool | None = None


@dataclass
class SynthesisContext:
    """What a mode needs for one example: the task, the teacher, and the rejection budget."""

    task: TaskPack
    teacher: TeacherBackend
    teacher_name: str
    reference: TeacherBackend | None = None
    tries: int = 4
    temperature: float = 0.7
    max_new_tokens: int = 256
    seed: int = 0


class DistillationMode(abc.ABC):
    """Turns one example into a verified training row, or None when it cannot."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abc.abstractmethod
    async def synthesize(self, example: Example, ctx: SynthesisContext) -> DataRow | None:
        """The row for this example, or None (no try passed the check)."""


# --- training and deployment (run inside the agent's child process) -------------------------


ProgressFn = Callable[..., None]


@dataclass
class TrainContext:
    """Inputs and callbacks for one training job, inside the worker child process."""

    model: str
    train_file: Path
    out_dir: Path
    checkpoint_dir: Path
    params: dict[str, Any]
    task: TaskPack | None = None
    resume_from: Path | None = None
    seed: int = 0
    progress: ProgressFn = lambda **_: None
    checkpoint: Callable[[Path], None] = lambda _p: None
    should_stop: Callable[[], bool] = lambda: False


class Trainer(abc.ABC):
    """Trains a student on a synthesised dataset; runs in a child process of the agent."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abc.abstractmethod
    def train(self, ctx: TrainContext) -> dict[str, Any]:
        """Train, checkpointing to ctx.checkpoint_dir; return metrics and the output layout."""


@dataclass
class DeployContext:
    """Inputs and callbacks for serving one model, inside the worker child process."""

    model: str
    adapter: Path | None
    host: str
    port: int
    served_name: str
    params: dict[str, Any] = field(default_factory=dict)
    ready: Callable[..., None] = lambda **_: None
    should_stop: Callable[[], bool] = lambda: False


class Deployer(abc.ABC):
    """Serves a model on an OpenAI-compatible endpoint until asked to stop."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def unavailable_reason(self) -> str | None:
        """Why this deployer cannot run here (missing GPU or package), or None."""
        return None

    @abc.abstractmethod
    def serve(self, ctx: DeployContext) -> None:
        """Start serving, call ctx.ready(url=...) once healthy, return when should_stop()."""


# --- tenants: personalised aggregation (runs in the daemon, numpy only) ----------------------


class Aggregator(abc.ABC):
    """Combines tenants' per-round updates into one personal mix per tenant.

    `sends` says what each tenant's agent sends per round: "importance" (one score per LoRA
    rank and module, inline) or "lora" (the LoRA factors `<module>.lora_A` (r×in),
    `<module>.lora_B` (out×r) and the scalar `<module>.scaling`, as numpy arrays).
    `returns` says what each tenant applies: "importance" (module → mixed score per rank; the
    tenant keeps its top ranks of its own adapter) or "delta" (module → a weight delta
    (out×in) added to its weights). Updates come only from tenants on the same student and
    rank (the daemon groups them first)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    sends: ClassVar[Literal["importance", "lora"]] = "lora"
    returns: ClassVar[Literal["importance", "delta"]] = "delta"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params: dict[str, Any] = dict(params or {})

    @abc.abstractmethod
    def aggregate(
        self,
        updates: Mapping[str, Mapping[str, Any]],
        weights: Mapping[str, Mapping[str, float]],
    ) -> dict[str, dict[str, Any]]:
        """tenant → its mix. updates: tenant → {name → numpy array}; weights: tenant i →
        {tenant j → w_ij}, each row summing to 1 over the tenants in updates."""


# --- daemon-side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodicJob:
    """A periodic coroutine the daemon's scheduler runs (max_instances=1, coalesce)."""

    id: str
    func: Callable[[], Awaitable[object]]
    seconds: float
    jitter: float = 0.0


class DaemonAPI(Protocol):
    """The narrow view of the daemon a plugin gets in startup/shutdown hooks."""

    @property
    def config(self) -> Any:
        """The daemon's StratosConfig."""

    async def publish(self, subject: str, message: Any) -> None:
        """Publish a schemas Message on a subject built with schemas.subjects."""

    def offers(self) -> list[ServerOffer]:
        """Current servers: live agents and catalog offers."""
