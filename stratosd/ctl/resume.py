"""`stratosctl resume ID [--set KEY=VALUE ...]`: go on with a failed or stopped run."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tomllib
from typing import Any

from stratosd.ctl.common import add_common, ask, dump_json, run_async
from stratosd.errors import ConfigError

EXAMPLES = """\
examples:
  stratosctl resume 01j9z...                                  # after fixing what failed
  stratosctl resume 01j9z... --set constraints.budget_usd=12  # a run stopped by its budget
  stratosctl resume 01j9z... --set train.max_steps=200 --set mode=injection --watch

Stages that finished are kept (their results and artifacts are reused); the stage that did
not finish runs again with its retries available again, and training goes on from its last
uploaded checkpoint. Runs that failed, were stopped by their budget or were cancelled can be
resumed; a completed run cannot.
"""
_SET_HINT = "write --set KEY=VALUE, e.g. --set constraints.budget_usd=12"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("resume", help="go on with a failed or stopped run where it ended",
                       description="Resume a failed, stopped (over budget) or cancelled run "
                       "from its last completed stage, optionally changing job fields first.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("id", help="run id (from `stratosctl jobs`)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="change a job field by its dotted path before resuming; VALUE is a "
                   "TOML/JSON value (12, 0.5, true, \"text\"; bare words are text, null "
                   "clears); repeatable")
    p.add_argument("--watch", action="store_true", help="follow the run after resuming")
    add_common(p)
    p.set_defaults(func=main)


def parse_value(raw: str) -> Any:
    """A --set VALUE: a TOML or JSON value (numbers, true/false, "strings"); else the text."""
    text = raw.strip()
    if text == "null":
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            return json.loads(text)
        except ValueError:
            return raw  # a bare word: text (--set mode=injection)
    if isinstance(value, dt.date | dt.time):  # TOML dates: keep the text as written
        return raw
    return value


def parse_sets(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE items → {dotted key: value}; ConfigError names the bad one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE", hint=_SET_HINT,
                              field=key or item)
        if any(not part for part in key.split(".")) or any(c.isspace() for c in key):
            raise ConfigError(f"--set {item!r}: {key!r} is not a dotted field path",
                              hint=_SET_HINT, field=key)
        out[key] = parse_value(raw)
    return out


def main(args: argparse.Namespace) -> int:
    """Resume and print the new state (or follow it with --watch)."""
    from schemas.commands import ResumeRun

    changes = parse_sets(args.sets)

    async def go() -> int:
        reply = await ask(args, "resume", ResumeRun(run_id=args.id, set=changes), timeout=30)
        if args.json:
            dump_json(reply)
        else:
            changed = " ".join(f"{k}={json.dumps(v)}" for k, v in changes.items())
            print(f"{reply.ref} {reply.state}" + (f" ({changed})" if changed else ""),
                  flush=True)
        return 0
    rc = run_async(go)
    if rc == 0 and args.watch:
        from stratosd.ctl import watch

        return watch.follow(args, args.id)
    return rc
