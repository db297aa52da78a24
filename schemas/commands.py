"""Commands (request/reply on stratos.cmd.*) and their replies. A closed set: nothing else runs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas.base import Message
from schemas.costs import JobEstimate, JobWork
from schemas.errors import ErrorReply
from schemas.events import EndpointDeployed
from schemas.specs import RunSpec, Selection, ServerOffer

# ids become subject tokens and directory names: validated here, at the edge
Token = Annotated[str, Meta(pattern=r"^[a-z0-9_-]{1,64}$")]
OptToken = Annotated[str, Meta(pattern=r"^[a-z0-9_-]{0,64}$")]

StepName = Literal["probe", "prescreen", "synthesize", "train", "evaluate", "deploy",
                   "tenant_signature", "tenant_probe", "tenant_train", "tenant_apply",
                   "tenant_evaluate"]
STEP_NAMES: tuple[str, ...] = StepName.__args__  # type: ignore[attr-defined]
JobStateName = Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]

# --- daemon → agent ---------------------------------------------------------------


class RunStep(Message, frozen=True, kw_only=True, tag="run_step"):
    """Run one pipeline step in a child process. inputs: local name → artifact key."""

    job_id: Token
    run_id: OptToken = ""
    step: StepName
    args: dict[str, Any] = {}
    inputs: dict[str, str] = {}


class CancelJob(Message, frozen=True, kw_only=True, tag="cancel_job"):
    """Stop a job's child process (its last checkpoint is kept)."""

    job_id: Token


class GetJob(Message, frozen=True, kw_only=True, tag="get_job"):
    """Ask for a job's state (for a daemon resuming after a restart)."""

    job_id: Token


class Undeploy(Message, frozen=True, kw_only=True, tag="undeploy"):
    """Stop serving an endpoint."""

    endpoint_id: Token


class Calibrate(Message, frozen=True, kw_only=True, tag="calibrate"):
    """Run the capacity micro-benchmarks again; the result arrives with the next telemetry."""


AgentCommand = RunStep | CancelJob | GetJob | Undeploy | Calibrate
AGENT_COMMAND_DECODER = msgspec.json.Decoder(AgentCommand)

# --- stratosctl → daemon ----------------------------------------------------------


class SubmitRun(Message, frozen=True, kw_only=True, tag="submit_run"):
    """Start a run. Resending with the same run_id returns the run's current state."""

    spec: RunSpec
    run_id: Token | None = None
    force: bool = False  # accept an est_train_hours that disagrees with the model


class ListRuns(Message, frozen=True, kw_only=True, tag="list_runs"):
    """List runs, newest first."""

    limit: int = 100


class GetRun(Message, frozen=True, kw_only=True, tag="get_run"):
    """One run's full state."""

    run_id: Token


class CancelRun(Message, frozen=True, kw_only=True, tag="cancel_run"):
    """Cancel a run and its agent job."""

    run_id: Token


class ListServers(Message, frozen=True, kw_only=True, tag="list_servers"):
    """The live server registry (and, with offers=True, catalog offers)."""

    offers: bool = False


class ListPlugins(Message, frozen=True, kw_only=True, tag="list_plugins"):
    """Installed plugins and what they provide."""


class PlanRun(Message, frozen=True, kw_only=True, tag="plan_run"):
    """Dry-run server selection for a spec over what submit would use (live agents);
    catalog=True adds the offers one could rent. Nothing is started."""

    spec: RunSpec
    selector: str | None = None
    catalog: bool = False
    force: bool = False  # accept an est_train_hours that disagrees with the model


class CalibrateServers(Message, frozen=True, kw_only=True, tag="calibrate_servers"):
    """Ask agents (all live ones when agent_ids is empty) to re-run their micro-benchmarks."""

    agent_ids: list[Token] = []


class ResumeRun(Message, frozen=True, kw_only=True, tag="resume_run"):
    """Resume a failed or stopped run from its last completed stage, reusing its artifacts.

    `set` overrides spec fields by dotted path (e.g. {"constraints.budget_usd": 12.0})."""

    run_id: Token
    set: dict[str, Any] = {}


class ListEndpoints(Message, frozen=True, kw_only=True, tag="list_endpoints"):
    """Deployed endpoints."""


class UndeployEndpoint(Message, frozen=True, kw_only=True, tag="undeploy_endpoint"):
    """Stop an endpoint wherever it runs."""

    endpoint_id: Token


class GetReport(Message, frozen=True, kw_only=True, tag="get_report"):
    """A finished run's report (paths and the JSON body)."""

    run_id: Token


DaemonCommand = (
    SubmitRun
    | ListRuns
    | GetRun
    | CancelRun
    | ListServers
    | ListPlugins
    | PlanRun
    | ListEndpoints
    | UndeployEndpoint
    | GetReport
    | CalibrateServers
    | ResumeRun
)
DAEMON_COMMAND_DECODER = msgspec.json.Decoder(DaemonCommand)

# --- replies -------------------------------------------------------------------------


class Accepted(Message, frozen=True, kw_only=True, tag="accepted"):
    """The command was taken; long work reports through events."""

    ref: str
    state: str = "queued"
    detail: dict[str, Any] = {}


class JobStatus(Message, frozen=True, kw_only=True, tag="job_status"):
    """A job's state on its agent (what a daemon applies when the job's events are lost)."""

    job_id: str
    state: JobStateName
    step: str = ""
    result: dict[str, Any] = {}
    artifacts: dict[str, str] = {}
    error: str | None = None
    code: str = ""  # a failed job's error code, hint and detail, as in its job_failed event
    hint: str = ""
    detail: dict[str, Any] = {}
    endpoint: EndpointDeployed | None = None  # a deploy job that serves


class RunInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One run as the daemon keeps it (the KV value)."""

    run_id: str
    name: str
    state: Literal["queued", "running", "completed", "failed", "cancelled", "stopped"]
    stage: str
    created: datetime
    updated: datetime
    spec: RunSpec
    results: dict[str, Any] = {}
    jobs: dict[str, str] = {}
    error: dict[str, str] | None = None
    progress: dict[str, Any] = {}
    revision: int = 0


class RunReply(Message, frozen=True, kw_only=True, tag="run_reply"):
    """A run's state."""

    run: RunInfo


class RunList(Message, frozen=True, kw_only=True, tag="run_list"):
    """Runs, newest first."""

    runs: list[RunInfo]


class ServerRow(msgspec.Struct, frozen=True, kw_only=True):
    """A server as `stratosctl servers` shows it."""

    offer: ServerOffer
    last_seen: datetime | None = None
    cpu_pct: float = 0.0
    ram_used_mib: int = 0
    running_jobs: list[str] = []
    endpoints: list[str] = []


class ServerList(Message, frozen=True, kw_only=True, tag="server_list"):
    """The registry."""

    servers: list[ServerRow]


class PluginInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An installed plugin."""

    name: str
    distribution: str = ""
    version: str = ""
    provides: dict[str, list[str]] = {}


class PluginList(Message, frozen=True, kw_only=True, tag="plugin_list"):
    """Installed plugins."""

    plugins: list[PluginInfo]


class PlanReply(Message, frozen=True, kw_only=True, tag="plan_reply"):
    """A selection made without running anything; rows are per-candidate estimates."""

    selection: Selection
    rows: list[dict[str, Any]] = []
    work: JobWork | None = None  # what the job must do, estimated from the job
    estimate: JobEstimate | None = None  # the pick, phase by phase
    notes: list[str] = []  # e.g. catalog offers no agent serves yet


class EndpointInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A deployed model endpoint."""

    endpoint_id: str
    run_id: str = ""
    agent_id: str
    url: str
    model: str
    deployer: str
    metrics: dict[str, float] = {}
    created: datetime | None = None


class EndpointList(Message, frozen=True, kw_only=True, tag="endpoint_list"):
    """Deployed endpoints."""

    endpoints: list[EndpointInfo]


class ReportReply(Message, frozen=True, kw_only=True, tag="report_reply"):
    """A run's report: where it was written and its JSON body."""

    run_id: str
    paths: dict[str, str] = {}
    report: dict[str, Any] = {}


Reply = (
    Accepted
    | JobStatus
    | RunReply
    | RunList
    | ServerList
    | PluginList
    | PlanReply
    | EndpointList
    | ReportReply
    | ErrorReply
)
REPLY_DECODER = msgspec.json.Decoder(Reply)
