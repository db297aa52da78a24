"""Subject builders and stream/KV definitions: the only place subject literals live."""

from __future__ import annotations

from schemas.base import is_token

PREFIX = "stratos"
EVENTS_STREAM = "STRATOS_EVENTS"
TELEMETRY_STREAM = "STRATOS_TELEMETRY"
RUNS_BUCKET = "stratos_runs"
AGENTS_BUCKET = "stratos_agents"
ENDPOINTS_BUCKET = "stratos_endpoints"
ARTIFACTS_BUCKET = "stratos_artifacts"
COSTMODEL_BUCKET = "stratos_costmodel"  # learned efficiency per (hardware, size, trainer, phase)
TENANTS_BUCKET = "stratos_tenants"  # tenants jobs (schemas.tenants.TenantJobState)

EVENTS_SUBJECTS = [f"{PREFIX}.evt.>"]
TELEMETRY_SUBJECTS = [f"{PREFIX}.tlm.>"]
TELEMETRY_MAX_AGE_S = 3600.0

AGENT_SERVICE = "stratos-agent"
DAEMON_SERVICE = "stratosd"
AGENT_VERBS = ("run", "cancel", "job", "undeploy", "calibrate")
DAEMON_VERBS = (
    "submit", "runs", "run", "cancel", "servers", "plugins", "plan", "endpoints", "undeploy",
    "report", "calibrate", "resume",
)
TENANT_VERBS = ("tenants",)  # schemas.tenants commands, decoded by their own decoder


def _tok(value: str, what: str) -> str:
    if not is_token(value):
        raise ValueError(f"{what} {value!r} is not a valid subject token ([a-z0-9_-], ≤64 chars)")
    return value


def run_event(run_id: str, event: str) -> str:
    """stratos.evt.run.{run_id}.{event}"""
    return f"{PREFIX}.evt.run.{_tok(run_id, 'run_id')}.{_tok(event, 'event')}"


def job_event(agent_id: str, job_id: str, event: str) -> str:
    """stratos.evt.job.{agent_id}.{job_id}.{event} — the agent token lets bus permissions
    confine each agent to its own jobs' events (docs/security.md)."""
    return (f"{PREFIX}.evt.job.{_tok(agent_id, 'agent_id')}.{_tok(job_id, 'job_id')}."
            f"{_tok(event, 'event')}")


def agent_event(agent_id: str, event: str) -> str:
    """stratos.evt.agent.{agent_id}.{event}"""
    return f"{PREFIX}.evt.agent.{_tok(agent_id, 'agent_id')}.{_tok(event, 'event')}"


def tenant_event(job_id: str, event: str) -> str:
    """stratos.evt.tenant.{job_id}.{event} — a tenants job's events (schemas.tenants)."""
    return f"{PREFIX}.evt.tenant.{_tok(job_id, 'job_id')}.{_tok(event, 'event')}"


def tenant_events(job_id: str = "*") -> str:
    """Filter for one tenants job's events (or all of them)."""
    return f"{PREFIX}.evt.tenant.{job_id}.>"


def run_events(run_id: str = "*") -> str:
    """Filter for one run's events (or all runs)."""
    return f"{PREFIX}.evt.run.{run_id}.>"


def job_events(job_id: str = "*", agent_id: str = "*") -> str:
    """Filter for one job's events (or all jobs, or one agent's)."""
    return f"{PREFIX}.evt.job.{agent_id}.{job_id}.>"


def job_event_agent(subject: str) -> str:
    """The agent token of a job event subject."""
    return subject.split(".")[3]


ALL_JOB_EVENTS = f"{PREFIX}.evt.job.>"
ALL_AGENT_EVENTS = f"{PREFIX}.evt.agent.>"


def telemetry(agent_id: str) -> str:
    """stratos.tlm.{agent_id}"""
    return f"{PREFIX}.tlm.{_tok(agent_id, 'agent_id')}"


ALL_TELEMETRY = f"{PREFIX}.tlm.*"


def agent_cmd_group(agent_id: str) -> str:
    """stratos.cmd.agent.{agent_id} (endpoints are its verbs)."""
    return f"{PREFIX}.cmd.agent.{_tok(agent_id, 'agent_id')}"


def agent_cmd(agent_id: str, verb: str) -> str:
    """stratos.cmd.agent.{agent_id}.{verb}"""
    return f"{agent_cmd_group(agent_id)}.{_tok(verb, 'verb')}"


DAEMON_CMD_GROUP = f"{PREFIX}.cmd.daemon"


def daemon_cmd(verb: str) -> str:
    """stratos.cmd.daemon.{verb}"""
    return f"{DAEMON_CMD_GROUP}.{_tok(verb, 'verb')}"


def artifact_key(run_id: str, name: str) -> str:
    """Object-store key of a run's artifact; names are single safe path segments."""
    _tok(run_id, "run_id")
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"artifact name {name!r} must be one plain file name (no / \\ or ..)")
    return f"{run_id}/{name}"
