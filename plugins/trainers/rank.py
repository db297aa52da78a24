"""One rank of a launched training job: `torchrun ... -m plugins.trainers.rank SPEC.json`.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; the trainer plugin runs unchanged and
transformers/accelerate take the process group from that environment (gloo on CPU, NCCL on
GPUs). Rank 0 writes progress and checkpoint lines for the launcher (see `distributed`); every
rank writes its result or its error to its own file, so the launcher can say which rank failed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from stratosd.api import TrainContext

_term = False


def _on_term(_signum: int, _frame: Any) -> None:
    global _term
    _term = True


class RankIO:
    """The rank side of the launcher's files: events (rank 0), stop requests, results."""

    def __init__(self, run_dir: Path, rank: int, plan: dict[str, Any],
                 launcher_pid: int = 0) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self.plan = plan
        self.launcher_pid = launcher_pid
        self.events = run_dir / "events.jsonl"

    def launcher_gone(self) -> bool:
        """True once the launching train step died (killed): the ranks save and leave."""
        if self.launcher_pid <= 0:
            return False
        try:
            os.kill(self.launcher_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _event(self, kind: str, **payload: Any) -> None:
        if self.rank != 0:
            return
        with self.events.open("a") as fh:
            fh.write(json.dumps({"kind": kind, **payload}, default=str) + "\n")

    def progress(self, **payload: Any) -> None:
        """Rank 0's progress line for the step context."""
        self._event("progress", **payload)

    def checkpoint(self, path: Path) -> None:
        """Record the world that wrote a checkpoint, then have the launcher upload it."""
        if self.rank != 0:
            return
        from plugins.trainers.distributed import LaunchPlan, world_size, write_world

        # the world that trained: an elastic group may have started with fewer nodes
        write_world(path, LaunchPlan(**self.plan), world=world_size())
        self._event("checkpoint", path=str(path))

    def should_stop(self) -> bool:
        """True on every rank at the same step once any rank was asked to stop."""
        import torch
        import torch.distributed as dist

        local = _term or (self.run_dir / "stop").exists() or self.launcher_gone()
        if not (dist.is_available() and dist.is_initialized()):
            return local
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if local else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def write(self, name: str, payload: dict[str, Any]) -> None:
        """A result or error file (write then rename: the launcher never reads half a file)."""
        tmp = self.run_dir / f".{name}.tmp-{self.rank}"
        tmp.write_text(json.dumps(payload, default=str))
        tmp.replace(self.run_dir / name)


def error_payload(exc: BaseException, rank: int) -> dict[str, Any]:
    """A rank's error: its code, message, hint and detail, as the agent's worker reports them."""
    from stratosd.errors import OutOfMemory, StratosError

    if isinstance(exc, StratosError):
        detail = exc.detail if isinstance(exc, OutOfMemory) else {}
        return {"rank": rank, "code": exc.code, "message": exc.message, "hint": exc.hint,
                "field": exc.field, "detail": detail}
    return {"rank": rank, "code": "job_failed", "message": f"{type(exc).__name__}: {exc}"[:2000],
            "hint": "see the job log for the traceback", "detail": {}}


def main(argv: list[str] | None = None) -> int:
    """Run the spec's trainer as this rank; 0 on success."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    io = RankIO(Path(spec["run_dir"]), rank, spec["plan"], int(spec.get("launcher_pid") or 0))
    signal.signal(signal.SIGTERM, _on_term)  # save at the next step, as a single process does
    try:
        from plugins.trainers import common
        from stratosd.plugins import get_plugins, lookup

        common.quiet_libraries()
        plugins = get_plugins()
        task = spec.get("task")
        ctx = TrainContext(
            model=spec["model"], train_file=Path(spec["train_file"]),
            out_dir=Path(spec["out_dir"]), checkpoint_dir=Path(spec["checkpoint_dir"]),
            params=dict(spec["params"]),
            task=plugins.task(task["name"], dict(task.get("params") or {})) if task else None,
            resume_from=Path(spec["resume_from"]) if spec.get("resume_from") else None,
            seed=int(spec["seed"]), progress=io.progress, checkpoint=io.checkpoint,
            should_stop=io.should_stop,
        )
        trainer_cls = lookup(plugins.trainers, spec["trainer"], "trainer")
        metrics = trainer_cls().train(ctx)
        from plugins.trainers.distributed import world_size

        metrics["world_size"] = world_size()  # the ranks that trained (all nodes)
        io.write(f"result-{rank}.json" if rank else "result.json", metrics)
        return 0
    except BaseException as exc:  # noqa: BLE001 - rank boundary: report it, with traceback
        traceback.print_exc()
        io.write(f"error-{rank}.json", error_payload(exc, rank))
        return 1


def leave(code: int) -> None:
    """Exit without the interpreter's teardown of torch and transformers (seconds per rank
    on a busy host, and torchrun waits for the slowest): everything is written by now."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    leave(main())
