"""What the daemon and agent entry points share: stop signals and the error → exit mapping."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from stratosd.errors import StratosError


def stop_on_signals(event: asyncio.Event) -> None:
    """SIGTERM/SIGINT set event (the service then shuts down in order)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, event.set)
        except (NotImplementedError, RuntimeError):
            pass  # not the main thread (tests run services in-process)


def run_service(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """asyncio.run(main()); a StratosError becomes `error:`/`hint:` lines and exit 2 or 1."""
    try:
        asyncio.run(main())
    except StratosError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2 if exc.code in ("config", "plugin") else 1
    except KeyboardInterrupt:
        return 130
    return 0
