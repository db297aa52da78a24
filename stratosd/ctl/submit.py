"""`stratosctl submit JOB.toml`: validate locally, send, print the run id."""

from __future__ import annotations

import argparse

from stratosd.ctl.common import add_common, ask, dump_json, run_async


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("submit", help="submit a job (TOML) and print its run id",
                       description="Submit a distillation job. The file is checked here first "
                       "(typos and bad values name the field), then by the daemon (plugin "
                       "names, task params). See examples/*.toml.")
    p.add_argument("file", help="job TOML file")
    p.add_argument("--run-id", help="idempotency key: resubmitting returns the same run")
    p.add_argument("--watch", action="store_true", help="follow the run after submitting")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Submit and print the id (or follow it with --watch)."""
    from schemas.commands import SubmitRun
    from stratosd.validate import parse_spec_toml

    spec = parse_spec_toml(args.file)

    run_ids: list[str] = []

    async def go() -> int:
        reply = await ask(args, "submit", SubmitRun(spec=spec, run_id=args.run_id))
        run_ids.append(reply.ref)
        if args.json:
            dump_json(reply)
        else:
            print(reply.ref, flush=True)
        return 0
    rc = run_async(go)
    if rc == 0 and args.watch:
        from stratosd.ctl import watch

        return watch.follow(args, run_ids[0])
    return rc
