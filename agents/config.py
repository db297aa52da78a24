"""AgentConfig (extends StratosConfig); defined beside the others in stratosd.config."""

from stratosd.config import AgentConfig

__all__ = ["AgentConfig"]
