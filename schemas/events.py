"""Run, job and agent events: what the pipeline says happened (stream STRATOS_EVENTS)."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.base import Message
from schemas.specs import RunSpec


class RunSubmitted(Message, frozen=True, kw_only=True, tag="run_submitted"):
    """A run was accepted and stored."""

    run_id: str
    spec: RunSpec


class RunStageStarted(Message, frozen=True, kw_only=True, tag="run_stage_started"):
    """A pipeline stage began (attempt > 1 after a resume or a retry)."""

    run_id: str
    stage: str
    attempt: int = 1


class RunStageCompleted(Message, frozen=True, kw_only=True, tag="run_stage_completed"):
    """A pipeline stage finished; result is what it wrote to the run state."""

    run_id: str
    stage: str
    result: dict[str, Any] = {}
    duration_s: float = 0.0


class RunProgress(Message, frozen=True, kw_only=True, tag="run_progress"):
    """Progress of a long stage (forwarded from its agent job)."""

    run_id: str
    stage: str
    done: float = 0.0
    total: float | None = None
    unit: str = ""
    message: str = ""
    metrics: dict[str, float] = {}


class RunCompleted(Message, frozen=True, kw_only=True, tag="run_completed"):
    """The run finished every stage."""

    run_id: str
    summary: dict[str, Any] = {}


class RunFailed(Message, frozen=True, kw_only=True, tag="run_failed"):
    """The run stopped: which stage, why, what to do."""

    run_id: str
    stage: str
    code: str
    message: str
    hint: str = ""


class RunBudgetExhausted(Message, frozen=True, kw_only=True, tag="run_budget_exhausted"):
    """The run stopped at a safe point before a stage that would exceed its budget.

    Every artifact is kept; `stratosctl resume RUN --set constraints.budget_usd=...` goes on."""

    run_id: str
    stage: str  # the stage that was not started
    budget_usd: float
    spent_usd: float  # measured so far
    next_usd: float  # estimated cost of the rest of the run
    message: str = ""


class RunResumed(Message, frozen=True, kw_only=True, tag="run_resumed"):
    """A failed or stopped run was resumed from its last completed stage."""

    run_id: str
    stage: str
    changed: dict[str, Any] = {}


class RunCancelled(Message, frozen=True, kw_only=True, tag="run_cancelled"):
    """An operator cancelled the run."""

    run_id: str
    stage: str = ""


class JobStarted(Message, frozen=True, kw_only=True, tag="job_started"):
    """An agent started a job's child process."""

    job_id: str
    run_id: str = ""
    agent_id: str
    step: str
    pid: int = 0


class JobProgress(Message, frozen=True, kw_only=True, tag="job_progress"):
    """A job's progress: done of total units, and metrics such as loss or rows/s."""

    job_id: str
    run_id: str = ""
    agent_id: str = ""
    step: str = ""
    done: float = 0.0
    total: float | None = None
    unit: str = ""
    message: str = ""
    metrics: dict[str, float] = {}


class JobLog(Message, frozen=True, kw_only=True, tag="job_log"):
    """A log line from a job's child process."""

    job_id: str
    run_id: str = ""
    agent_id: str = ""
    level: str = "info"
    message: str


class JobCompleted(Message, frozen=True, kw_only=True, tag="job_completed"):
    """A job finished; artifacts maps output names to object-store keys."""

    job_id: str
    run_id: str = ""
    agent_id: str = ""
    step: str = ""
    result: dict[str, Any] = {}
    artifacts: dict[str, str] = {}
    duration_s: float = 0.0


class JobFailed(Message, frozen=True, kw_only=True, tag="job_failed"):
    """A job failed in its child process or while handling its artifacts."""

    job_id: str
    run_id: str = ""
    agent_id: str = ""
    step: str = ""
    code: str = "job_failed"
    message: str
    hint: str = ""
    detail: dict[str, Any] = {}  # e.g. the settings an out-of-memory step ran with


class JobCancelled(Message, frozen=True, kw_only=True, tag="job_cancelled"):
    """A job was cancelled on request."""

    job_id: str
    run_id: str = ""
    agent_id: str = ""


class JobInterrupted(Message, frozen=True, kw_only=True, tag="job_interrupted"):
    """An agent stopped with the job unfinished; checkpoint names what a resume can use."""

    job_id: str
    run_id: str = ""
    agent_id: str = ""
    checkpoint: str | None = None


class AgentRegistered(Message, frozen=True, kw_only=True, tag="agent_registered"):
    """The daemon heard from an agent for the first time (or after it was down)."""

    agent_id: str
    hostname: str = ""
    region: str = ""
    price_usd_per_hour: float = 0.0


class AgentDown(Message, frozen=True, kw_only=True, tag="agent_down"):
    """An agent missed its heartbeats; its jobs are considered lost."""

    agent_id: str
    silent_s: float
    running_jobs: list[str] = []


class EndpointDeployed(Message, frozen=True, kw_only=True, tag="endpoint_deployed"):
    """A model is served at url (OpenAI-compatible)."""

    endpoint_id: str
    run_id: str = ""
    agent_id: str
    url: str
    model: str
    deployer: str
    metrics: dict[str, float] = {}


class EndpointRemoved(Message, frozen=True, kw_only=True, tag="endpoint_removed"):
    """A served model was stopped."""

    endpoint_id: str
    agent_id: str = ""


Event = (
    RunSubmitted
    | RunStageStarted
    | RunStageCompleted
    | RunProgress
    | RunCompleted
    | RunFailed
    | RunCancelled
    | RunBudgetExhausted
    | RunResumed
    | JobStarted
    | JobProgress
    | JobLog
    | JobCompleted
    | JobFailed
    | JobCancelled
    | JobInterrupted
    | AgentRegistered
    | AgentDown
    | EndpointDeployed
    | EndpointRemoved
)

EVENT_DECODER = msgspec.json.Decoder(Event)
