"""`stratosctl plugins`: what is installed, from which package, providing what."""

from __future__ import annotations

import argparse

from stratosd.ctl.common import add_common, ask, dump_json, run_async, table


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("plugins", help="installed plugins: name, package, version, provides",
                       description="List plugins. By default asks the daemon (what it loaded); "
                       "--local lists what this machine would load.")
    p.add_argument("--local", action="store_true", help="inspect this machine, no daemon")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Print the plugin table."""
    from schemas.commands import ListPlugins

    async def go() -> int:
        if args.local:
            from stratosd.plugins import Plugins

            plugins = Plugins().info()
        else:
            plugins = (await ask(args, "plugins", ListPlugins())).plugins
        if args.json:
            dump_json(plugins)
            return 0
        rows = [[p.name, p.distribution, p.version,
                 "; ".join(f"{k}: {', '.join(v)}" for k, v in p.provides.items())]
                for p in plugins]
        print(table(rows, ["PLUGIN", "PACKAGE", "VERSION", "PROVIDES"]))
        return 0
    return run_async(go)
