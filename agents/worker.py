"""Child-process entry: `python -m agents.worker JOB.json`. Heavy imports happen only here.

The original stdout becomes the private protocol channel to the agent; fd 1 is pointed at
stderr so anything a library prints ends up in the job's log instead of corrupting it.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from schemas.commands import STEP_NAMES

_stop = False


def _on_term(_signum: int, _frame: Any) -> None:
    global _stop
    _stop = True


# What out-of-memory looks like from the libraries a step uses, without importing them:
# torch.OutOfMemoryError / torch.cuda.OutOfMemoryError, and RuntimeErrors of allocators.
_OOM_TYPES = ("OutOfMemoryError",)
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for MemoryError, torch's OutOfMemoryError and allocator RuntimeErrors."""
    if isinstance(exc, MemoryError) or type(exc).__name__ in _OOM_TYPES:
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _OOM_WORDS)


def child_error(exc: BaseException) -> dict[str, Any]:
    """The `error` line for an exception: its code (kept, never flattened), message, hint and
    detail (e.g. the settings an out-of-memory step ran with)."""
    from stratosd.errors import OutOfMemory, StratosError

    if isinstance(exc, StratosError):
        detail = exc.detail if isinstance(exc, OutOfMemory) else {}
        return {"code": exc.code, "message": exc.message, "hint": exc.hint, "detail": detail}
    if is_out_of_memory(exc):
        return {"code": OutOfMemory.code, "message": f"{type(exc).__name__}: {exc}"[:2000],
                "hint": "the daemon retries with a smaller micro-batch, then gradient "
                "checkpointing, then a smaller student", "detail": {}}
    return {"code": "job_failed", "message": f"{type(exc).__name__}: {exc}",
            "hint": "see the job log for the traceback", "detail": {}}


def main(argv: list[str] | None = None) -> int:
    """Run one step described by the job file; write `result` or `error` to the channel."""
    argv = sys.argv[1:] if argv is None else argv
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGTERM, _on_term)
    job = json.loads(Path(argv[0]).read_text())

    from agents.stepctx import StepContext
    from stratosd.errors import StratosError

    ctx = StepContext(
        job_id=job["job_id"], run_id=job["run_id"], step=job["step"], args=job["args"],
        workdir=Path(job["workdir"]), inputs={k: Path(v) for k, v in job["inputs"].items()},
        state_dir=Path(job["state_dir"]), channel=channel, stop_flag=lambda: _stop,
    )
    if job["step"] not in STEP_NAMES:  # the agent checked already; never import a stranger
        ctx.send("error", code="unsupported", message=f"unknown step {job['step']!r}", hint="")
        return 2
    try:
        module = importlib.import_module(f"agents.steps.{job['step']}")
        result = module.run(ctx)
        ctx.send("result", result=result if result is not None else {})
        return 0
    except StratosError as exc:
        ctx.send("error", **child_error(exc))
        return 1
    except Exception as exc:  # noqa: BLE001 - child boundary: report, with traceback in log
        traceback.print_exc()
        ctx.send("error", **child_error(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
