"""Tenants (ACME in Stratos): the `[[tenants]]` job, data signatures, adapter updates, results.

A tenant's Q/A data lives on its own agent(s) and is read only there. What travels on the bus
is declared here: a signature of aggregates (`TenantSignature`), per round an `AdapterUpdate`
(per-rank importance inline, or LoRA factors in an object-store artifact), and results. Every
byte of that is counted in `TenantBytes` and reported. See docs/tenants.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas.base import Message, utc_now
from schemas.errors import ErrorReply
from schemas.specs import Name, NonNeg, PluginName, Strict

Token = Annotated[str, Meta(pattern=r"^[a-z0-9_-]{1,64}$")]
PosInt = Annotated[int, Meta(ge=1)]

# --- the job (user-written: unknown fields are typos) --------------------------------------


class TenantLimits(Strict, frozen=True, kw_only=True):
    """A tenant's hard limits: a student over any of them is never picked for it."""

    max_params: Annotated[int, Meta(ge=1)] | None = None
    max_memory_mib: NonNeg | None = None  # fp32 weights + 20 % (the serving estimate)
    max_latency_ms: NonNeg | None = None  # mean per answer, measured on the tenant's agent
    budget_usd: NonNeg | None = None  # training + probing, at the agent's price


class TenantSpec(Strict, frozen=True, kw_only=True):
    """One tenant: its agents hold `data_path` (a Q/A JSONL); nothing else ever reads it."""

    name: Token
    agents: Annotated[list[Token], Meta(min_length=1)]
    data_path: Name  # a path on the tenant's agents, never opened by the daemon
    limits: TenantLimits = TenantLimits()
    question_field: str = "question"
    answer_field: str = "answer"
    test_fraction: Annotated[float, Meta(gt=0.0, lt=1.0)] = 0.25  # held out, on the agent


class TradeoffWeights(Strict, frozen=True, kw_only=True):
    """trade-off = quality·acc − latency·lat − size·size, each min-max normalised over the
    candidates that fit (ACME: accuracy − 0.5·(size + energy))."""

    quality: NonNeg = 1.0
    latency: NonNeg = 0.5
    size: NonNeg = 0.5


class StudentChoice(Strict, frozen=True, kw_only=True):
    """Candidates measured (briefly fitted, then evaluated) on each tenant's probe data;
    the others' accuracy and latency are predicted from the measured ones (labelled so)."""

    candidates: Annotated[list[Name], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["config:tiny"])
    measure: list[Name] = []  # empty: measure every candidate
    probe_size: Annotated[int, Meta(ge=1, le=10_000)] = 16
    fit_steps: Annotated[int, Meta(ge=0)] = 40  # the probe fit's loss plateaus by ~40
    rule: Literal["pareto", "highest-accuracy", "largest", "random"] = "pareto"
    weights: TradeoffWeights = TradeoffWeights()


class AggregationSpec(Strict, frozen=True, kw_only=True):
    """How tenants on the same student help each other, round by round."""

    rule: PluginName = "lora-product-average"  # a stratos_aggregators plugin
    weighting: Literal["similarity", "uniform"] = "similarity"  # uniform = plain average
    temperature: Annotated[float, Meta(gt=0.0)] = 0.1
    rounds: Annotated[int, Meta(ge=1, le=100)] = 2
    local_steps: PosInt = 40
    lora_r: PosInt = 8
    keep_ranks: PosInt = 4  # ACME form: ranks each tenant keeps (top by mixed importance)
    learning_rate: Annotated[float, Meta(gt=0.0)] = 1e-2
    params: dict[str, Any] = {}  # extra trainer params (lora-sft)


class DeploySpec(Strict, frozen=True, kw_only=True):
    """`[deploy]`: after the last round, one endpoint serves every tenant's tuned weights, each
    under its tenant's name (off by default: it moves each tenant's weights, never its data,
    to the serving agent)."""

    enabled: bool = False
    agent: Token | None = None  # the serving agent (default: the first live tenant's agent)
    deployer: PluginName = "auto"  # auto: builtin-multi without a GPU, vllm with one
    params: dict[str, Any] = {}  # extra deployer params
    load_requests: Annotated[int, Meta(ge=0, le=64)] = 2  # latency probe (on the base name)


class TenantJob(Strict, frozen=True, kw_only=True):
    """`stratosctl tenants submit FILE`: a `[[tenants]]` table plus the shared settings."""

    name: Name = "tenants"
    tenants: Annotated[list[TenantSpec], Meta(min_length=1)]
    students: StudentChoice = StudentChoice()
    aggregation: AggregationSpec = AggregationSpec()
    alone_baseline: bool = True  # also train each tenant alone for the report
    seed: int = 0
    eval_limit: Annotated[int, Meta(ge=1)] = 64
    trainer: PluginName = "lora-sft"
    deploy: DeploySpec = DeploySpec()


# --- what travels ------------------------------------------------------------------------


class TenantSignature(msgspec.Struct, frozen=True, kw_only=True):
    """Aggregates of a tenant's data (never per-sample values): hashed character-bigram
    distribution of the questions and hashed answer distribution, each summing to 1."""

    tenant: str
    n_examples: int
    question_hist: list[float]
    answer_hist: list[float]
    mean_question_chars: float = 0.0
    mean_answer_chars: float = 0.0
    raw_bytes: int = 0  # size of the data file (a number, not the data)


class CandidatePoint(msgspec.Struct, frozen=True, kw_only=True):
    """One student candidate for one tenant: measured on its agent or predicted (then every
    quality and latency figure of it is predicted, `basis` says from what)."""

    model: str
    params: int
    accuracy: float  # exact match on the probe rows
    latency_ms: float
    memory_mib: float
    predicted: bool = False
    fits: bool = True
    why_not: str = ""  # the limit it breaks
    # graded quality (teacher-forced on the gold targets of the probe rows), None if not known
    partial: float | None = None  # the task's partial credit (= accuracy when it has none)
    token_accuracy: float | None = None  # share of target tokens that are the model's argmax
    target_nll: float | None = None  # mean negative log-likelihood per target token (nats)
    target_nll_se: float | None = None  # its standard error over the probe rows
    n_probe: int = 0  # probe rows it was measured on
    fit_first_loss: float | None = None  # the probe fit's training loss, first and last step
    fit_final_loss: float | None = None
    quality: float | None = None  # its value on the pick's quality axis (set by the pick)
    basis: str = ""  # a predicted point: from which measured points, by which fit


class StudentPick(msgspec.Struct, frozen=True, kw_only=True):
    """The per-tenant choice and its baselines, with the trade-off score of each."""

    tenant: str
    chosen: str
    rule: str
    formula: str
    points: list[CandidatePoint]
    pareto: list[str] = []
    scores: dict[str, float] = {}  # model → trade-off score (fitting candidates)
    baselines: dict[str, str] = {}  # highest-accuracy / largest / random → model
    quality_metric: str = "accuracy"  # the quality axis: accuracy, partial, target_prob, none
    quality_note: str = ""  # why that axis (what did or did not separate the candidates)


class AdapterUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's per-round update: importance per rank inline, or LoRA factors by key."""

    tenant: str
    round: int
    student: str
    rank: int
    kind: Literal["importance", "lora"]
    importance: dict[str, list[float]] = {}  # module → one score per rank
    artifact: str = ""  # object-store key of the npz with `<module>.lora_A/.lora_B/.scaling`
    artifact_bytes: int = 0


class TenantBytes(msgspec.Struct, frozen=True, kw_only=True):
    """Bytes on the bus for one tenant, by direction, against its raw data."""

    to_agent: int = 0  # commands and artifacts the daemon sent to the tenant's agent
    from_agent: int = 0  # results and artifacts the agent sent back
    raw_data: int = 0  # the data file's size (it never travels)
    signature: int = 0
    updates: int = 0  # from_agent part that is per-round updates
    mixes: int = 0  # to_agent part that is aggregated mixes
    weights: int = 0  # from_agent part that is its tuned weights (ΔW) sent to the serving agent


class TenantBudget(msgspec.Struct, frozen=True, kw_only=True):
    """The per-tenant cost check before training: the core cost model's estimate of what is
    left (rounds x tracks of tenant_train, tenant_apply, tenant_evaluate) on its agent's offer,
    plus the estimated cost of the probe that already ran, against budget_usd."""

    budget_usd: float
    estimate_usd: float  # the whole tenant's work (probe + what is left), central estimate
    low_usd: float = 0.0
    high_usd: float = 0.0
    probe_usd: float = 0.0  # part of estimate_usd already spent when the check ran
    price_usd_per_hour: float = 0.0
    student: str = ""
    basis: str = ""  # the arithmetic in words
    fits: bool = True


class TenantResult(msgspec.Struct, frozen=True, kw_only=True):
    """One tenant's section of the report."""

    tenant: str
    agent: str
    student: str = ""
    adapter: str = ""  # where the tuned model lives (on the tenant's agent)
    pick: StudentPick | None = None
    accuracy_alone: float | None = None
    accuracy_aggregated: float | None = None
    n_test: int = 0
    weights: dict[str, float] = {}  # its row of the aggregation weights
    group: str = ""  # the student/rank group it was aggregated in
    rounds_done: int = 0
    bytes: TenantBytes = TenantBytes()
    state: Literal["ok", "lost", "failed"] = "ok"
    error: str = ""
    dropped_at: str = ""  # the stage (e.g. "round-2") where a lost or failed tenant left
    budget: TenantBudget | None = None  # the cost check before training, when budget_usd is set
    spent_usd: float = 0.0  # measured: its agent's job seconds x the agent's price
    spent_s: float = 0.0  # its jobs' seconds on its agent
    stopped_at: str = ""  # the round it did not start (its budget would have been exceeded)
    stop_reason: str = ""
    endpoint_url: str = ""  # where its tuned model is served (`model` = served_name)
    served_name: str = ""


class TenantEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """One endpoint serving the tenants of one student, each under its own name."""

    student: str  # the base model, also served under its own name
    agent: str = ""  # the serving agent
    deployer: str = ""
    endpoint_id: str = ""  # `stratosctl undeploy ID` stops it
    url: str = ""
    names: dict[str, str] = {}  # tenant → served model name
    weights_bytes: dict[str, int] = {}  # tenant → bytes of its weights moved (0: served locally)
    state: Literal["deploying", "serving", "stopped", "failed"] = "deploying"
    error: str = ""


class TenantJobState(msgspec.Struct, frozen=True, kw_only=True):
    """A tenants job as the daemon keeps it (KV `stratos_tenants`)."""

    job_id: str
    name: str
    state: Literal["queued", "running", "completed", "failed", "cancelled"]
    stage: str = ""
    spec: TenantJob
    created: datetime = msgspec.field(default_factory=utc_now)
    updated: datetime = msgspec.field(default_factory=utc_now)
    similarity: dict[str, dict[str, float]] = {}
    signatures: dict[str, TenantSignature] = {}  # aggregates only (what crossed the bus)
    results: dict[str, TenantResult] = {}
    report_paths: dict[str, str] = {}
    error: str = ""
    attempt: int = 1  # 2+ after a daemon restart took the job up again
    endpoints: list[TenantEndpoint] = []  # with [deploy] enabled: one per student


# --- events (stratos.evt.tenant.{job_id}.{event}, stream STRATOS_EVENTS) --------------------


class TenantStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One tenant's live state, as every tenant event shows it."""

    state: Literal["ok", "lost", "failed"] = "ok"
    agent: str = ""
    student: str = ""
    rounds_done: int = 0
    accuracy_alone: float | None = None
    accuracy_aggregated: float | None = None
    bytes_sent: int = 0  # to and from its agent, so far
    raw_bytes: int = 0  # its data file (never sent)
    spent_usd: float = 0.0  # measured so far
    stopped_at: str = ""  # the round it did not start, over budget


class TenantJobSubmitted(Message, frozen=True, kw_only=True, tag="tenant_job_submitted"):
    """A tenants job was accepted and stored."""

    job_id: str
    name: str
    tenants: list[str]
    rounds: int
    rule: str


class TenantStageStarted(Message, frozen=True, kw_only=True, tag="tenant_stage_started"):
    """A stage of a tenants job began (agents, signature, select, budget, evaluate, report)."""

    job_id: str
    stage: str
    tenants: dict[str, TenantStatus] = {}


class TenantRoundStarted(Message, frozen=True, kw_only=True, tag="tenant_round_started"):
    """An aggregation round began for the tenants still in the job."""

    job_id: str
    round: int
    rounds: int
    tenants: dict[str, TenantStatus] = {}


class TenantRoundCompleted(Message, frozen=True, kw_only=True, tag="tenant_round_completed"):
    """A round's mixes were applied; weights are each tenant's row over who was left."""

    job_id: str
    round: int
    rounds: int
    tenants: dict[str, TenantStatus] = {}
    weights: dict[str, dict[str, float]] = {}
    duration_s: float = 0.0


class TenantDropped(Message, frozen=True, kw_only=True, tag="tenant_dropped"):
    """A tenant left the job (its agent was lost, a step failed, or over budget); the others
    go on, re-weighted over `remaining`."""

    job_id: str
    tenant: str
    agent: str = ""
    state: Literal["lost", "failed"] = "failed"
    stage: str = ""
    reason: str = ""
    remaining: list[str] = []


class TenantBudgetStopped(Message, frozen=True, kw_only=True, tag="tenant_budget_stopped"):
    """A tenant's rounds stopped at a round boundary: its measured spend plus the next round
    and its evaluation would exceed budget_usd. It keeps what it trained and is evaluated;
    the others go on."""

    job_id: str
    tenant: str
    round: int  # the round it does not start
    spent_usd: float
    projected_usd: float
    budget_usd: float
    reason: str = ""


class TenantEndpointReady(Message, frozen=True, kw_only=True, tag="tenant_endpoint_ready"):
    """An endpoint serves the tenants of one student, each by its name."""

    job_id: str
    endpoint: TenantEndpoint


class TenantJobCancelled(Message, frozen=True, kw_only=True, tag="tenant_job_cancelled"):
    """The job was cancelled (`stratosctl tenants cancel`); its endpoints were stopped."""

    job_id: str
    stage: str = ""
    undeployed: list[str] = []  # endpoint ids


class TenantJobResumed(Message, frozen=True, kw_only=True, tag="tenant_job_resumed"):
    """A restarted daemon took the job up again at `stage`."""

    job_id: str
    stage: str
    tenants: dict[str, TenantStatus] = {}


class TenantJobCompleted(Message, frozen=True, kw_only=True, tag="tenant_job_completed"):
    """The job finished; dropped tenants are listed, the others have their accuracies."""

    job_id: str
    tenants: dict[str, TenantStatus] = {}
    dropped: list[str] = []
    report_paths: dict[str, str] = {}


class TenantJobFailed(Message, frozen=True, kw_only=True, tag="tenant_job_failed"):
    """The job stopped: which stage, why, what to do."""

    job_id: str
    stage: str
    message: str
    hint: str = ""
    tenants: dict[str, TenantStatus] = {}


TenantEvent = (TenantJobSubmitted | TenantStageStarted | TenantRoundStarted
               | TenantRoundCompleted | TenantDropped | TenantJobResumed | TenantJobCompleted
               | TenantJobFailed | TenantBudgetStopped | TenantEndpointReady
               | TenantJobCancelled)
TENANT_EVENT_DECODER = msgspec.json.Decoder(TenantEvent)
TENANT_TERMINAL = (TenantJobCompleted, TenantJobFailed, TenantJobCancelled)


# --- commands and replies (stratos.cmd.daemon.tenants) ------------------------------------


class SubmitTenantJob(Message, frozen=True, kw_only=True, tag="submit_tenant_job"):
    """Start a tenants job; the same job_id again returns its current state."""

    spec: TenantJob
    job_id: Token | None = None


class GetTenantJob(Message, frozen=True, kw_only=True, tag="get_tenant_job"):
    """One tenants job's state (and, when finished, its per-tenant report)."""

    job_id: Token


class ListTenantJobs(Message, frozen=True, kw_only=True, tag="list_tenant_jobs"):
    """Tenants jobs, newest first."""

    limit: int = 50


class CancelTenantJob(Message, frozen=True, kw_only=True, tag="cancel_tenant_job"):
    """Stop a running job at once and undeploy its endpoints (a finished job: only the
    endpoints)."""

    job_id: Token


class TenantJobReply(Message, frozen=True, kw_only=True, tag="tenant_job_reply"):
    """A tenants job's state."""

    job: TenantJobState


class TenantJobList(Message, frozen=True, kw_only=True, tag="tenant_job_list"):
    """Tenants jobs."""

    jobs: list[TenantJobState]


TenantCommand = SubmitTenantJob | GetTenantJob | ListTenantJobs | CancelTenantJob
TENANT_COMMAND_DECODER = msgspec.json.Decoder(TenantCommand)
TenantReply = TenantJobReply | TenantJobList | ErrorReply
TENANT_REPLY_DECODER = msgspec.json.Decoder(TenantReply)
TENANT_STATE_DECODER = msgspec.json.Decoder(TenantJobState)
