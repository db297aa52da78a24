"""StratosError tree: every error says what failed, which field or value, and what to do."""

from __future__ import annotations

from typing import Any, ClassVar, Literal


class StratosError(Exception):
    """Base of all Stratos errors: code (stable), message (what), hint (what to do)."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, hint: str = "", field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.field = field

    def __str__(self) -> str:
        return self.message


class ConfigError(StratosError):
    """Bad configuration or job spec."""

    code = "config"


class PluginError(StratosError):
    """A plugin failed to load or a registration/decision hook raised."""

    code = "plugin"

    def __init__(self, plugin: str, hook: str, message: str, hint: str = "") -> None:
        super().__init__(f"plugin {plugin!r} failed in {hook}: {message}", hint)
        self.plugin = plugin
        self.hook = hook


class BusUnavailable(StratosError):
    """NATS cannot be reached."""

    code = "bus_unavailable"


class BadMessage(StratosError):
    """A message failed validation at the edge."""

    code = "bad_message"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(
            f"invalid value at `{field}`: {reason}",
            hint="fix that field and send again",
            field=field,
        )
        self.reason = reason


class NotFound(StratosError):
    """A run, job, agent, plugin or artifact does not exist."""

    code = "not_found"


class Conflict(StratosError):
    """The request conflicts with the current state (e.g. cancel a finished run)."""

    code = "conflict"


class Infeasible(StratosError):
    """No option meets the constraints; message names the binding one and the nearest option."""

    code = "infeasible"


class Unsupported(StratosError):
    """A command or message type this side does not know."""

    code = "unsupported"


class AgentUnavailable(StratosError):
    """An agent is down or did not answer."""

    code = "agent_unavailable"


class AgentIncompatible(StratosError):
    """An agent speaks another schema version."""

    code = "agent_incompatible"


class JobFailed(StratosError):
    """A job failed on its agent in a way a retry may fix (a crash, the bus, a lost event)."""

    code = "job_failed"

    def __init__(self, message: str, hint: str = "", field: str | None = None, *,
                 child_code: str = "job_failed") -> None:
        super().__init__(message, hint, field)
        self.child_code = child_code


class RemoteError(StratosError):
    """The other side answered with an ErrorReply."""

    code = "remote"

    def __init__(self, code: str, message: str, hint: str = "", field: str | None = None) -> None:
        super().__init__(message, hint, field)
        self.remote_code = code


class MissingDependency(StratosError, ImportError):
    """An optional package is missing; hint names the extra to install."""

    code = "missing_dependency"


class JobRejected(RemoteError):
    """A job failed in a way no retry can fix; remote_code is the child's own code."""

    code = "job_rejected"


class OutOfMemory(StratosError):
    """A step ran out of memory; detail holds the settings it ran with (micro-batch, ...)."""

    code = "out_of_memory"

    def __init__(self, message: str, hint: str = "", field: str | None = None, *,
                 detail: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint, field)
        self.detail = dict(detail or {})


# How a job's failure is handled, by the code its child (or agent) reported.
FailureClass = Literal["permanent", "transient", "out_of_memory"]
PERMANENT_CODES = frozenset({
    "config",  # a bad job spec or argument; a model that does not exist or cannot be loaded
    "bad_message",  # inputs that fail validation
    "not_found",  # an input artifact that is not there
    "unsupported",
    "plugin",
    "missing_dependency",
    "infeasible",
    "agent_incompatible",
})


def failure_class(code: str) -> FailureClass:
    """permanent: fail the run now; out_of_memory: degrade, then retry; else retry."""
    if code == OutOfMemory.code:
        return "out_of_memory"
    return "permanent" if code in PERMANENT_CODES else "transient"


def reported_code(exc: StratosError) -> str:
    """The code a run or client should see: a remote side's or a child's own code wins."""
    return exc.remote_code if isinstance(exc, RemoteError) else exc.code
