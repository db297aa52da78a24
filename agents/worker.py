"""Child-process entry: `python -m agents.worker JOB.json`. Heavy imports happen only here.

The original stdout becomes the private protocol channel to the agent; fd 1 is pointed at
stderr so anything a library prints ends up in the job's log instead of corrupting it.

A job runs code the agent does not vouch for line by line (model code, datasets, checkpoints),
so it gets none of the agent's bus credentials: `child_env` leaves the NATS settings and
secrets out of its environment, and before anything else the child makes the agent's password
and creds files unreadable to itself (`hide_paths`, Linux Landlock; see docs/security.md).
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

# Environment the child never gets: the bus (the agent does all bus I/O) and its secrets.
# Teacher API keys stay (a step needs them, named by api_key_env), as do STRATOS_HOME & co.
SECRET_ENV_PREFIXES = ("STRATOS_NATS_", "NATS_")
SECRET_ENV_WORDS = ("PASSWORD", "CREDS", "NKEY", "TOKEN", "SECRET")
HIDDEN_PATHS_ENV = "STRATOS_JOB_HIDDEN_PATHS"  # os.pathsep-separated; the child hides them


def child_env(base: dict[str, str], hidden: list[str] | None = None) -> dict[str, str]:
    """base without the bus credentials and settings; hidden: files the child must not read."""
    env = {k: v for k, v in base.items()
           if not k.upper().startswith(SECRET_ENV_PREFIXES)
           and not (k.upper().startswith("STRATOS_")
                    and any(w in k.upper() for w in SECRET_ENV_WORDS))}
    env.pop(HIDDEN_PATHS_ENV, None)
    paths = [p for p in hidden or [] if p]
    if paths:
        env[HIDDEN_PATHS_ENV] = os.pathsep.join(paths)
    return env


def credential_files(config: Any) -> list[str]:
    """The agent's credential files (password, creds) named by its config: hidden from jobs."""
    files = [getattr(config, "nats_password_file", None), getattr(config, "nats_creds", None)]
    return [os.path.expanduser(f) for f in files if f]


# Landlock (Linux >= 5.13), from <linux/landlock.h>: the same syscall numbers on every arch
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_READ_FILE, _REFER = 1 << 2, 1 << 13
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38


def hide_paths(paths: list[str]) -> bool:
    """Make paths unreadable by this process and its children, for good; False when the
    kernel has no Landlock (nothing changed).

    Landlock only allows: reading files is handled, then allowed beneath every entry of each
    directory on the way to a hidden file, except that way itself. Linking or moving a hidden
    file elsewhere (REFER) is refused too; files created later directly in those directories
    are not readable either (the child's temp files live in its own workdir).
    """
    import ctypes
    import struct

    real = {os.path.realpath(p) for p in paths if os.path.exists(p)}
    if not real:
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return False
    handled = _READ_FILE | (_REFER if abi >= 2 else 0)
    attr = ctypes.create_string_buffer(struct.pack("=Q", handled))
    ruleset = libc.syscall(_SYS_CREATE_RULESET, attr, ctypes.c_size_t(8), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        blocked = set(real)  # the hidden files and every directory above them
        for path in real:
            parent = os.path.dirname(path)
            while parent not in blocked:
                blocked.add(parent)
                parent = os.path.dirname(parent)
        for directory in sorted(b for b in blocked if b not in real):
            try:
                entries = os.listdir(directory)
            except OSError:
                continue
            for name in entries:
                entry = os.path.join(directory, name)
                target = os.path.realpath(entry)
                if entry in blocked or target in blocked or \
                        any(h.startswith(target.rstrip("/") + "/") for h in real):
                    continue  # on the way to a hidden file, or a link to one
                try:
                    fd = os.open(entry, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    allowed = handled if os.path.isdir(entry) else _READ_FILE
                    rule = ctypes.create_string_buffer(struct.pack("=Qi", allowed, fd))
                    libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, rule,
                                 ctypes.c_uint32(0))
                finally:
                    os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return False
        return bool(libc.syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) == 0)
    finally:
        os.close(ruleset)


def _hide_agent_secrets() -> None:
    hidden = os.environ.pop(HIDDEN_PATHS_ENV, "")
    paths = [p for p in hidden.split(os.pathsep) if p]
    if paths and not hide_paths(paths):
        print("warning: this kernel has no Landlock: the job can read the agent's credential "
              "files", file=sys.stderr)


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
    _hide_agent_secrets()  # before any step code runs
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
