"""What each pipeline stage hands to the stages after it, the report, `status` and plugins.

A run keeps its stage results in `RunInfo.results[stage]` as plain JSON (the KV value and the
`stage_completed` event carry them as they are); these structs are the contract for that JSON.
Stages build them, and readers decode them with `stratosd.results.stage_result(run, Cls)`.
Fields an agent step adds beyond these are kept in the stored JSON and ignored when decoding.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from schemas.costs import Estimate, JobEstimate, JobWork, StageCost
from schemas.specs import (
    AccuracyEstimate,
    Selection,
    ServerOffer,
    StudentCandidate,
    TeacherScore,
    TeacherSpec,
)


class StageResult(msgspec.Struct, frozen=True, kw_only=True):
    """Base: `STAGE` names the stage; `cost` is its estimate vs measurement (agent stages)."""

    STAGE: ClassVar[str] = ""
    cost: StageCost | None = None


class SelectServerResult(StageResult, frozen=True, kw_only=True):
    """The server the run uses, the offers it was chosen from, and the job's estimate there."""

    STAGE: ClassVar[str] = "select_server"
    selection: Selection
    agent_id: str
    offers: list[ServerOffer] = []
    work: JobWork | None = None
    estimate: JobEstimate | None = None
    train_loop_estimate: Estimate | None = None
    queued_s: float = 0.0


class ProbeTeachersResult(StageResult, frozen=True, kw_only=True):
    """Every teacher's probe score; `best` is the one synthesis uses (None: none usable)."""

    STAGE: ClassVar[str] = "probe_teachers"
    scores: list[TeacherScore] = []
    best: str | None = None
    projected_cost_usd: dict[str, float] = {}
    probe_size: int = 0
    train_size: int = 0


class SelectStudentResult(StageResult, frozen=True, kw_only=True):
    """Every candidate student after fit and pre-screen, and the one chosen."""

    STAGE: ClassVar[str] = "select_student"
    candidates: list[StudentCandidate] = []
    chosen: str | None = None
    reason: str = ""
    shots: int = 0
    sample_size: int = 0
    prediction: AccuracyEstimate | None = None  # the chosen student's pre-screen estimate
    settings: dict[str, Any] = {}  # the thresholds and sizes the pre-screen decided with


class ChooseStrategyResult(StageResult, frozen=True, kw_only=True):
    """The distillation mode and teacher, and why."""

    STAGE: ClassVar[str] = "choose_strategy"
    mode: str
    teacher: str
    teacher_spec: TeacherSpec
    teacher_accuracy: float
    threshold: float
    reason: str = ""
    teacher_n: int = 0  # probe examples behind teacher_accuracy
    teacher_ci_low: float | None = None  # its Wilson 95% interval
    teacher_ci_high: float | None = None


class SynthesizeResult(StageResult, frozen=True, kw_only=True):
    """What the teacher wrote: rows kept/dropped, API cost, and the dataset artifact key."""

    STAGE: ClassVar[str] = "synthesize"
    rows: int = 0
    kept: int = 0
    dropped: int = 0
    failed: int = 0
    duplicates: int = 0
    by_mode: dict[str, int] = {}
    by_teacher: dict[str, int] = {}
    verified: int = 0
    tries_total: int = 0
    cost_usd: float = 0.0
    mean_target_chars: float | None = None
    dataset: str = ""
    artifact: str = ""


class TrainResult(StageResult, frozen=True, kw_only=True):
    """Training metrics, the model artifact key, and the loop's estimate made before it ran."""

    STAGE: ClassVar[str] = "train"
    model: str = ""
    trainer: str = ""
    final_loss: float | None = None
    first_loss: float | None = None
    steps: int | None = None
    train_time_s: float | None = None
    tokens_per_s: float | None = None
    train_tokens: int | None = None
    peak_rss_mib: float | None = None
    step_time_median_s: float | None = None
    loss_history: list[Any] = []
    artifact: str = ""
    resumed: bool = False
    train_time_estimate: Estimate | None = None
    degradations: list[str] = []


class EvalRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One example's outcome."""

    id: str
    predicted: str | None
    gold: str
    correct: bool
    output: str = ""
    error: str | None = None


class EvalResult(msgspec.Struct, frozen=True, kw_only=True):
    """Accuracy (Wilson 95% interval), partial credit, latency and throughput of one eval."""

    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    partial: float
    latency_ms_mean: float
    latency_ms_p95: float
    tokens_per_s: float
    completion_tokens: int
    prompt_tokens: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    answers_per_s: float = 0.0
    records: list[EvalRecord] = []
    # set by the evaluate step: what was evaluated
    model: str = ""
    task: str = ""
    split: str = ""


class EvaluateResult(StageResult, frozen=True, kw_only=True):
    """Held-out accuracy before and after training, against the job's target."""

    STAGE: ClassVar[str] = "evaluate"
    before: EvalResult
    after: EvalResult
    teacher_probe_accuracy: float | None = None
    target_accuracy: float | None = None
    target_met: bool | None = None


class DeployResult(StageResult, frozen=True, kw_only=True):
    """The live endpoint and what its probe measured (`skipped` when none was started)."""

    STAGE: ClassVar[str] = "deploy"
    skipped: bool = False
    reason: str = ""
    endpoint_id: str = ""
    url: str = ""
    model: str = ""
    agent_id: str = ""
    deployer: str = ""
    metrics: dict[str, float] = {}


class ReportResult(StageResult, frozen=True, kw_only=True):
    """Where the report was written and its headline numbers."""

    STAGE: ClassVar[str] = "report"
    paths: dict[str, str] = {}
    score: float | None = None
    improvement_pct: float | None = None
    summary: dict[str, Any] = {}


STAGE_RESULTS: dict[str, type[StageResult]] = {
    cls.STAGE: cls
    for cls in (SelectServerResult, ProbeTeachersResult, SelectStudentResult,
                ChooseStrategyResult, SynthesizeResult, TrainResult, EvaluateResult,
                DeployResult, ReportResult)
}
