"""StepContext: what a pipeline step sees inside the agent's child process.

The child talks to its agent over a private pipe (the original stdout; stray prints from
libraries go to stderr and become job logs), one JSON object per line:
`progress`, `log`, `checkpoint`, `ready`, then exactly one `result` or `error`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from schemas.subjects import artifact_key

if TYPE_CHECKING:
    from stratosd.plugins import Plugins


class StepContext:
    """Arguments, files and callbacks for one step. Progress is throttled to ~1 line/s."""

    def __init__(
        self,
        *,
        job_id: str,
        run_id: str,
        step: str,
        args: dict[str, Any],
        workdir: Path,
        inputs: dict[str, Path],
        state_dir: Path | None = None,
        channel: IO[str] | None = None,
        min_interval_s: float = 1.0,
        stop_flag: Callable[[], bool] | None = None,
    ) -> None:
        self.job_id = job_id
        self.run_id = run_id
        self.step = step
        self.args = args
        self.workdir = workdir
        self.inputs = inputs
        self.outdir = workdir / "out"
        self.outdir.mkdir(parents=True, exist_ok=True)
        # Survives job retries on the same host (per run and step): resumable work lives here.
        self.state_dir = state_dir or workdir / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._channel = channel
        self._lock = threading.Lock()
        self._min_interval_s = min_interval_s
        self._last_progress = 0.0
        self._stop_flag = stop_flag or (lambda: False)
        self.messages: list[dict[str, Any]] = []

    @cached_property
    def plugins(self) -> Plugins:
        """The plugin facade (built on first use in this process)."""
        from stratosd.plugins import get_plugins

        return get_plugins()

    def send(self, kind: str, **payload: Any) -> None:
        """Write one protocol line to the agent (kept in memory when run without an agent)."""
        line = {"kind": kind, **payload}
        with self._lock:
            if self._channel is None:
                self.messages.append(line)
                return
            self._channel.write(json.dumps(line, default=str) + "\n")
            self._channel.flush()

    def progress(
        self,
        done: float,
        total: float | None = None,
        *,
        unit: str = "",
        message: str = "",
        force: bool = False,
        **metrics: float,
    ) -> None:
        """Report progress; lines closer than min_interval_s are dropped unless final/forced."""
        now = time.monotonic()
        final = total is not None and done >= total
        if not (force or final) and now - self._last_progress < self._min_interval_s:
            return
        self._last_progress = now
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self.send("progress", done=done, total=total, unit=unit, message=message, metrics=clean)

    def log(self, message: str, level: str = "info") -> None:
        """A log line that becomes a JobLog event."""
        self.send("log", level=level, message=message)

    def output(self, name: str) -> Path:
        """Path for an output artifact (a file or a directory, uploaded when the step ends).

        Any size: the agent streams it in resumable, checksummed chunks to the bus or to its
        --artifact-store; the step only writes the file.
        """
        artifact_key(self.run_id or "local", name)  # validates the name
        return self.outdir / name

    def checkpoint(self, path: Path, name: str = "checkpoint") -> None:
        """Ask the agent to upload path now (a directory is tarred) so a resume can use it.

        An upload cut off by a broken connection resumes: stored chunks are not sent again.
        """
        self.send("checkpoint", path=str(path), name=name)

    def ready(self, **info: Any) -> None:
        """A deploy step is serving (url=..., model=..., metrics)."""
        self.send("ready", **info)

    def should_stop(self) -> bool:
        """True once the agent asked this job to stop (cancel or shutdown)."""
        return self._stop_flag()
