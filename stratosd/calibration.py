"""Re-calibration on request: ask agents to measure their capacity again.

Agents calibrate at start by themselves (agents.calibrate); `stratosctl servers --calibrate`
sends CalibrateServers, and the daemon forwards one `Calibrate` command to each agent named
(every live agent when none is). Agents reply at once and report the new `Capacity` with their
telemetry; the caller waits for it there.
"""

from __future__ import annotations

import asyncio

import structlog

from stratosd.dispatch import Dispatcher
from stratosd.errors import AgentUnavailable, NotFound, StratosError
from stratosd.fleet import Fleet

log = structlog.stdlib.get_logger(__name__)


async def calibrate_agents(fleet: Fleet, dispatch: Dispatcher, agent_ids: list[str]) -> list[str]:
    """Send Calibrate to agent_ids (all live agents when empty); return the ids that took it.

    An id that is unknown or down is NotFound (the hint lists the live ones). An agent that
    refuses (busy training) is logged and left out; when none takes it, AgentUnavailable says
    why for each.
    """
    live = fleet.live()
    if not agent_ids:
        if not live:
            raise NotFound("no live agent to calibrate",
                           hint="start stratos-agent on a host, then try again")
        targets = live
    else:
        targets = list(dict.fromkeys(agent_ids))
        absent = [a for a in targets if a not in live]
        if absent:
            state = "down" if absent[0] in fleet.agents else "unknown"
            raise NotFound(f"agent {absent[0]!r} is {state}: cannot calibrate it",
                           hint=f"live agents: {', '.join(live) or 'none'}",
                           field="agent_ids")
    replies = await asyncio.gather(*(dispatch.calibrate(a) for a in targets),
                                   return_exceptions=True)
    asked: list[str] = []
    refused: list[str] = []
    for agent_id, reply in zip(targets, replies, strict=True):
        if isinstance(reply, StratosError):
            log.warning("calibration_refused", agent_id=agent_id, error=reply.message)
            refused.append(f"{agent_id}: {reply.message}")
        elif isinstance(reply, BaseException):
            raise reply
        else:
            asked.append(agent_id)
    if not asked:
        raise AgentUnavailable(f"no agent took the calibration ({'; '.join(refused)})",
                               hint="wait for running training jobs to finish, then try again")
    log.info("calibration_requested", agents=asked, refused=len(refused))
    return asked
