"""`stratosctl endpoints` and `stratosctl undeploy ID`: served models."""

from __future__ import annotations

import argparse
from typing import Any

from stratosd.ctl.common import add_common, ago, ask, dump_json, run_async, table


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `endpoints` and `undeploy`."""
    p = sub.add_parser("endpoints", help="deployed OpenAI-compatible endpoints",
                       description="List served models: id, url, model, agent, p50/p95 ms.")
    add_common(p)
    p.set_defaults(func=main_list)
    u = sub.add_parser("undeploy", help="stop serving an endpoint",
                       description="Stop an endpoint (its agent stops the server process).")
    u.add_argument("id", help="endpoint id (from `stratosctl endpoints`)")
    add_common(u)
    u.set_defaults(func=main_undeploy)


def main_list(args: argparse.Namespace) -> int:
    """Print endpoints."""
    from schemas.commands import ListEndpoints

    async def go() -> int:
        eps = (await ask(args, "endpoints", ListEndpoints())).endpoints
        if args.json:
            dump_json(eps)
            return 0
        def ms(e: Any, k: str) -> str:  # a missing figure was never measured: never 0
            v = e.metrics.get(k)
            return "-" if v is None else f"{v:.0f}"

        rows = [[e.endpoint_id, e.url, e.model, e.agent_id, e.deployer,
                 f"{ms(e, 'latency_ms_p50')}/{ms(e, 'latency_ms_p95')} ms",
                 f"{ms(e, 'ttft_ms_p50')} ms", ago(e.created)] for e in eps]
        print(table(rows, ["ID", "URL", "MODEL", "AGENT", "DEPLOYER", "P50/P95", "TTFT P50",
                           "SINCE"]))
        return 0
    return run_async(go)


def main_undeploy(args: argparse.Namespace) -> int:
    """Stop one endpoint."""
    from schemas.commands import UndeployEndpoint

    async def go() -> int:
        reply = await ask(args, "undeploy", UndeployEndpoint(endpoint_id=args.id), timeout=60)
        print(f"{reply.ref} {reply.state}")
        return 0
    return run_async(go)
