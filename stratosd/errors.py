"""StratosError tree: every error says what failed, which field or value, and what to do."""

from __future__ import annotations

from typing import ClassVar


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
    """A job failed on its agent."""

    code = "job_failed"


class RemoteError(StratosError):
    """The other side answered with an ErrorReply."""

    code = "remote"

    def __init__(self, code: str, message: str, hint: str = "", field: str | None = None) -> None:
        super().__init__(message, hint, field)
        self.remote_code = code


class MissingDependency(StratosError, ImportError):
    """An optional package is missing; hint names the extra to install."""

    code = "missing_dependency"
