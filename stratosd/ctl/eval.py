"""`stratosctl eval --task T --model M`: held-out accuracy, latency and tokens/s of a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from stratosd.ctl.common import add_common, dump_json, table


def _kv(values: list[str]) -> dict[str, Any]:
    from stratosd.errors import ConfigError

    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r} must look like key=value",
                              hint="e.g. --param difficulty=1", field="param")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("eval", help="evaluate a model on a task's held-out split",
                       description="Evaluate a local model (path, hub id, config:NAME, or a "
                       "trained adapter dir) or an OpenAI-compatible endpoint on a task: "
                       "accuracy with a 95% confidence interval, mean/p95 latency per answer, "
                       "tokens/s. Runs on this machine; writes a JSON file.",
                       epilog="example: stratosctl eval --task mahjong-winning-tiles "
                       "--param difficulty=1 --model config:tiny --limit 20")
    p.add_argument("--task", required=True, help="task pack name (stratosctl plugins --local)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="task parameter (repeatable; values parsed as JSON when possible)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local model: path, hub id or config:NAME")
    src.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    p.add_argument("--served-model", help="model name at the endpoint")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval-results.json", help="JSON results file")
    p.add_argument("--no-publish", action="store_true",
                   help="do not publish the result as an event on the bus")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the evaluation here and write the JSON file."""
    from plugins.models.evaluate import run_eval

    result = run_eval(args.task, _kv(args.param), model=args.model, endpoint=args.endpoint,
                      served_model=args.served_model, split=args.split, limit=args.limit,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      seed=args.seed)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    published = None if args.no_publish else publish_result(args, result)
    if args.json:
        dump_json(result)
        return 0
    rows = [[args.task, args.model or args.endpoint, result.get("n"),
             f"{result.get('accuracy', 0):.1%}",
             f"[{result.get('ci_low', 0):.1%}, {result.get('ci_high', 0):.1%}]",
             f"{result.get('latency_ms_mean', 0):.0f}", f"{result.get('latency_ms_p95', 0):.0f}",
             f"{result.get('tokens_per_s', 0):.1f}"]]
    print(table(rows, ["TASK", "MODEL", "N", "ACCURACY", "95% CI", "MEAN MS", "P95 MS",
                       "TOK/S"]))
    print(f"results: {args.out}")
    if published:
        print(f"event:   {published}")
    return 0


def publish_result(args: argparse.Namespace, result: dict[str, Any]) -> str | None:
    """Publish the result as a JobCompleted(step=evaluate) event; None when no bus is there."""
    import asyncio
    import sys

    from schemas import subjects
    from schemas.base import new_id
    from schemas.events import JobCompleted
    from stratosd.ctl.common import open_bus
    from stratosd.errors import StratosError

    async def go() -> str:
        bus = await open_bus(args)
        try:
            job_id = new_id()
            subject = subjects.job_event("stratosctl", job_id, "completed")
            trimmed = {k: v for k, v in result.items() if k != "records"}
            await bus.publish_event(subject, JobCompleted(
                job_id=job_id, agent_id="stratosctl", step="evaluate", result=trimmed,
                source="stratosctl"))
            return subject
        finally:
            await bus.close()

    try:
        return asyncio.run(go())
    except (StratosError, Exception) as exc:  # noqa: BLE001 - the result file is what matters
        print(f"note: result not published as an event ({exc}); use --no-publish to skip",
              file=sys.stderr)
        return None
