"""nats.micro service "stratosd": the control endpoints stratosctl talks to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from nats.micro import add_service
from nats.micro.service import Service

from schemas import subjects
from schemas.commands import (
    DAEMON_COMMAND_DECODER,
    Accepted,
    CalibrateServers,
    CancelRun,
    EndpointList,
    GetReport,
    GetRun,
    ListEndpoints,
    ListPlugins,
    ListRuns,
    ListServers,
    PlanReply,
    PlanRun,
    PluginList,
    ReportReply,
    ResumeRun,
    RunList,
    RunReply,
    ServerList,
    ServerRow,
    SubmitRun,
    UndeployEndpoint,
)
from stratosd import __version__
from stratosd.bus import micro_handler
from stratosd.errors import Conflict, NotFound, Unsupported
from stratosd.validate import validate_spec

if TYPE_CHECKING:
    from schemas.specs import RunSpec

if TYPE_CHECKING:
    from schemas.base import Message
    from stratosd.daemon import Daemon

log = structlog.stdlib.get_logger(__name__)


class ControlService:
    """Handlers for stratos.cmd.daemon.*; each returns a reply Message."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.service: Service | None = None

    async def start(self) -> None:
        """Register the micro service and its endpoints."""
        self.service = await add_service(
            self.d.bus.nc, name=subjects.DAEMON_SERVICE, version=__version__,
            description="Stratos daemon control API",
        )
        group = self.service.add_group(name=subjects.DAEMON_CMD_GROUP)
        handler = micro_handler(DAEMON_COMMAND_DECODER, self.handle, source="stratosd")
        for verb in subjects.DAEMON_VERBS:
            await group.add_endpoint(name=verb, subject=verb, handler=handler)
        from schemas.tenants import TENANT_COMMAND_DECODER
        from stratosd.tenants.service import TenantService

        self.tenants = TenantService(self.d)
        await self.tenants.start()
        tenant_handler = micro_handler(TENANT_COMMAND_DECODER, self.tenants.handle,
                                       source="stratosd")
        for verb in subjects.TENANT_VERBS:
            await group.add_endpoint(name=verb, subject=verb, handler=tenant_handler)

    async def stop(self) -> None:
        """Stop answering."""
        if self.service is not None:
            await self.service.stop()
        if getattr(self, "tenants", None) is not None:
            await self.tenants.stop()

    async def handle(self, cmd: Any) -> Message:
        """Dispatch on the command type."""
        d = self.d
        if isinstance(cmd, SubmitRun):
            validate_spec(cmd.spec, d.plugins)
            await self._check_costs(cmd.spec, force=cmd.force)
            run = await d.pipeline.submit(cmd.spec, cmd.run_id)
            return Accepted(ref=run.run_id, state=run.state, source="stratosd")
        if isinstance(cmd, ListRuns):
            runs = await d.store.list()
            return RunList(runs=runs[: cmd.limit], source="stratosd")
        if isinstance(cmd, GetRun):
            return RunReply(run=await d.store.get(cmd.run_id), source="stratosd")
        if isinstance(cmd, CancelRun):
            run = await d.pipeline.cancel(cmd.run_id)
            return Accepted(ref=run.run_id, state=run.state, source="stratosd")
        if isinstance(cmd, ListServers):
            rows = d.fleet.rows()
            if cmd.offers:
                rows += [ServerRow(offer=o) for o in d.catalog_offers()]
            return ServerList(servers=rows, source="stratosd")
        if isinstance(cmd, ListPlugins):
            return PluginList(plugins=d.plugins.info(), source="stratosd")
        if isinstance(cmd, PlanRun):
            return await self._plan(cmd)
        if isinstance(cmd, ListEndpoints):
            return EndpointList(endpoints=await d.endpoints(), source="stratosd")
        if isinstance(cmd, UndeployEndpoint):
            for ep in await d.endpoints():
                if ep.endpoint_id == cmd.endpoint_id:
                    await d.dispatch.undeploy(ep.agent_id, ep.endpoint_id)
                    return Accepted(ref=ep.endpoint_id, state="undeploying", source="stratosd")
            raise NotFound(f"no endpoint {cmd.endpoint_id!r}",
                           hint="list them with `stratosctl endpoints`")
        if isinstance(cmd, GetReport):
            run = await d.store.get(cmd.run_id)
            rep = run.results.get("report")
            if not rep:
                raise Conflict(f"run {cmd.run_id} has no report yet (state {run.state})",
                               hint="wait for the run to finish: stratosctl watch ID")
            return ReportReply(run_id=run.run_id, paths=dict(rep.get("paths", {})),
                               report=dict(rep.get("report", rep)), source="stratosd")
        if isinstance(cmd, CalibrateServers):
            from stratosd.calibration import calibrate_agents

            asked = await calibrate_agents(d.fleet, d.dispatch, cmd.agent_ids)
            return Accepted(ref="calibrate", state="calibrating", detail={"agents": asked},
                            source="stratosd")
        if isinstance(cmd, ResumeRun):
            run = await d.pipeline.resume(cmd.run_id, cmd.set)
            return Accepted(ref=run.run_id, state=run.state, source="stratosd")
        raise Unsupported(f"unsupported command {type(cmd).__name__}")

    async def _check_costs(self, spec: RunSpec, *, force: bool) -> None:
        """Refuse at submit what would fail later: an est_train_hours far from the model, or
        a job whose estimate breaks the budget (or another constraint) on every live server.
        Servers that are only busy are fine: the run queues for them."""
        import asyncio

        from stratosd.errors import Infeasible

        d = self.d
        offers = d.fleet.table()
        await asyncio.to_thread(d.costs.check_given, spec, offers, force=force)
        if not len(offers):
            return  # select_server says so, once the run starts
        from stratosd.groupplan import plan_select

        selector = d.plugins.selectors.get(spec.selector)(spec.selector_params)
        try:  # as select_server will: groups when train.nodes or the deadline asks for one
            costing = await asyncio.to_thread(d.costs.costing, spec)
            await asyncio.to_thread(plan_select, selector, offers, spec, costing,
                                    plugins=d.plugins)
        except Infeasible as exc:
            if exc.field != "constraints.busy":
                raise

    async def _plan(self, cmd: PlanRun) -> PlanReply:
        import asyncio

        from stratosd import planning
        from stratosd.groupplan import plan_select
        from stratosd.offers import OfferTable

        d = self.d
        spec = cmd.spec
        name = cmd.selector or spec.selector
        selector = d.plugins.selectors.get(name)(
            spec.selector_params if name == spec.selector else {})
        live = d.fleet.table()
        offers = (OfferTable.concat(live, d.plugins.catalog_table()) if cmd.catalog
                  else live)
        await asyncio.to_thread(d.costs.check_given, spec, offers, force=cmd.force)
        costing = await asyncio.to_thread(d.costs.costing, spec)
        planned = await asyncio.to_thread(plan_select, selector, offers, spec, costing,
                                          plugins=d.plugins)
        rows = planning.plan_rows(planned.selection, planned.offers, spec.constraints, costing)
        selection = planned.selection
        notes = planning.plan_notes(selection, live, offers, catalog=cmd.catalog,
                                    groups=planned.offers[len(offers):])
        return PlanReply(selection=selection, rows=rows, work=costing.work,
                         estimate=costing.estimate(selection.chosen), notes=notes,
                         source="stratosd")
