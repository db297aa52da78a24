"""nats.micro "stratos-agent": run, cancel, job, undeploy, calibrate (stratos.cmd.agent.{id}.*)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nats.micro import add_service
from nats.micro.service import Service

from schemas import subjects
from schemas.base import Message
from schemas.commands import (
    AGENT_COMMAND_DECODER,
    Accepted,
    Calibrate,
    CancelJob,
    GetJob,
    RunStep,
    Undeploy,
)
from stratosd import __version__
from stratosd.bus import micro_handler
from stratosd.errors import NotFound, Unsupported

if TYPE_CHECKING:
    from agents.runner import Runner


class AgentService:
    """Command endpoints: a closed set of typed commands; nothing else ever runs."""

    def __init__(self, nc: Any, agent_id: str, runner: Runner, *,
                 calibrate: Callable[[], str] | None = None) -> None:
        self.nc = nc
        self.agent_id = agent_id
        self.runner = runner
        self.calibrate = calibrate  # starts the benchmarks in the background, returns a state
        self.service: Service | None = None

    async def start(self) -> None:
        """Register the endpoints under this agent's command group."""
        self.service = await add_service(
            self.nc, name=subjects.AGENT_SERVICE, version=__version__,
            description="Stratos agent", metadata={"agent_id": self.agent_id},
        )
        group = self.service.add_group(name=subjects.agent_cmd_group(self.agent_id))
        handler = micro_handler(AGENT_COMMAND_DECODER, self.handle, source=self.agent_id)
        for verb in subjects.AGENT_VERBS:
            await group.add_endpoint(name=verb, subject=verb, handler=handler)

    async def stop(self) -> None:
        """Stop answering commands."""
        if self.service is not None:
            await self.service.stop()

    async def handle(self, cmd: Any) -> Message:
        """Dispatch a decoded AgentCommand."""
        if isinstance(cmd, RunStep):
            job = self.runner.submit(cmd)
            return Accepted(ref=cmd.job_id, state=job.state, source=self.agent_id)
        if isinstance(cmd, CancelJob):
            cancelled = await self.runner.cancel(cmd.job_id)
            return Accepted(ref=cmd.job_id, state=cancelled.state, source=self.agent_id)
        if isinstance(cmd, GetJob):
            found = self.runner.jobs.get(cmd.job_id)
            if found is None:
                raise NotFound(f"no job {cmd.job_id!r} on agent {self.agent_id}")
            return found.status()
        if isinstance(cmd, Undeploy):
            serving = self.runner.jobs.get(cmd.endpoint_id)
            if serving is None or not serving.endpoint_url:
                raise NotFound(f"no endpoint {cmd.endpoint_id!r} on agent {self.agent_id}")
            await self.runner.cancel(cmd.endpoint_id)
            return Accepted(ref=cmd.endpoint_id, state="undeployed", source=self.agent_id)
        if isinstance(cmd, Calibrate):
            if self.calibrate is None:
                raise Unsupported(f"agent {self.agent_id} cannot calibrate",
                                  hint="run it as stratos-agent (agents.agent.Agent)")
            # replies at once; the capacity arrives with the heartbeat sent when it is done
            return Accepted(ref="calibrate", state=self.calibrate(), source=self.agent_id)
        raise Unsupported(f"unsupported command {type(cmd).__name__}")
