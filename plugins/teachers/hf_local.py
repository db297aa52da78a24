"""`hf` teacher: a local Hugging Face causal LM (path, hub id or `config:` spec).

The model lives in a child process (`python -m plugins.teachers.hf_local`) fed JSON lines
over pipes, so torch is never imported in the caller and its event loop never blocks.
Concurrent generate() calls are gathered into batches of `batch_size`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from plugins.teachers.common import MicroBatcher, TeacherStats, param
from schemas.specs import TeacherSpec
from stratosd import hookimpl
from stratosd.api import Generation, TaskPack, TeacherBackend, TeacherRequest
from stratosd.errors import ConfigError

if TYPE_CHECKING:
    from plugins.models.hf import GenOut

log = structlog.stdlib.get_logger(__name__)

_STREAM_LIMIT = 64 * 1024 * 1024


class WorkerTeacher(TeacherBackend):
    """Base for local models served by a child process that speaks JSON lines on its pipes.

    Subclasses name the worker module and its argv; the module's `__main__` loads the model,
    prints `{"ready": true}` (or `{"error": ...}`), then answers one line per batch.
    """

    worker_module: ClassVar[str]
    known_params: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "usd_per_hour", "load_timeout_s"}
    )

    def __init__(self, spec: TeacherSpec, task: TaskPack | None = None) -> None:
        super().__init__(spec, task)
        p = spec.params
        unknown = sorted(set(p) - self.known_params)
        if unknown:
            raise ConfigError(
                f"unknown {self.name} teacher params: {', '.join(unknown)}",
                hint=f"known params: {', '.join(sorted(self.known_params))}",
                field=f"teacher.params.{unknown[0]}",
            )
        self.batch_size = param(p, "batch_size", int, 8, minimum=1)
        self.usd_per_hour = param(p, "usd_per_hour", float, 0.0, minimum=0.0)
        self.load_timeout_s = param(p, "load_timeout_s", float, 600.0, minimum=1.0)
        self.stats = TeacherStats()
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self._stderr_task: asyncio.Task[None] | None = None
        self._batcher: MicroBatcher | None = None
        self._start_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def worker_argv(self) -> list[str]:
        """Arguments after `python -m <worker_module>`."""
        return ["--model", self.spec.model]

    async def generate(
        self,
        requests: Sequence[TeacherRequest],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """Queue the requests into the worker's next batches and wait for them."""
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._loop is not loop:
            # A new event loop (e.g. a second asyncio.run) cannot reuse the old pipes.
            await self._kill()
            self._loop = loop
            self._start_lock = asyncio.Lock()
            self._batcher = MicroBatcher(self._run_batch, self.batch_size)
        gens = await self._batcher.submit(
            requests, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        )
        for g in gens:
            self.stats.add(g)
        return gens

    async def _ensure_worker(self) -> asyncio.subprocess.Process:
        assert self._start_lock is not None
        async with self._start_lock:
            if self._proc is not None and self._proc.returncode is None:
                return self._proc
            root = Path(__file__).resolve().parents[2]
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                x for x in (str(root), env.get("PYTHONPATH", "")) if x
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.worker_module, *self.worker_argv(),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, limit=_STREAM_LIMIT,
            )
            self._stderr_tail.clear()
            self._stderr_task = asyncio.get_running_loop().create_task(self._pump_stderr(proc))
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), self.load_timeout_s)
            except TimeoutError:
                proc.kill()
                raise RuntimeError(f"{self.name} worker did not load {self.spec.model!r} "
                                   f"in {self.load_timeout_s}s") from None
            hello = json.loads(line) if line else {"error": self._tail() or "worker exited"}
            if "error" in hello:
                await proc.wait()
                raise RuntimeError(f"{self.name} worker could not load {self.spec.model!r}: "
                                   f"{hello['error']}")
            log.info("local_teacher_ready", backend=self.name, model=self.spec.model, pid=proc.pid,
                     device=hello.get("device"))
            self._proc = proc
            return proc

    async def _pump_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._stderr_tail.append(line)
                log.debug("hf_worker_stderr", line=line)

    def _tail(self) -> str:
        return " | ".join(list(self._stderr_tail)[-5:])

    async def _run_batch(
        self, requests: list[TeacherRequest], max_new_tokens: int, temperature: float,
        seed: int | None,
    ) -> list[Generation]:
        try:
            proc = await self._ensure_worker()
        except Exception as exc:  # noqa: BLE001 - reported as failed generations
            return [Generation(text="", error=str(exc))] * len(requests)
        assert proc.stdin is not None and proc.stdout is not None
        msg = {"prompts": [r.prompt for r in requests], "max_new_tokens": max_new_tokens,
               "temperature": temperature, "seed": seed}
        start = time.perf_counter()
        try:
            proc.stdin.write((json.dumps(msg) + "\n").encode())
            await proc.stdin.drain()
            line = await proc.stdout.readline()
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        if not line:
            await proc.wait()
            self._proc = None  # restart on the next batch
            err = f"{self.name} worker exited with {proc.returncode}: {self._tail()}"
            return [Generation(text="", error=err)] * len(requests)
        reply: dict[str, Any] = json.loads(line)
        elapsed_ms = (time.perf_counter() - start) * 1000
        if "error" in reply:
            return [Generation(text="", error=f"generation failed: {reply['error']}")] * len(
                requests
            )
        each_usd = self.usd_per_hour * elapsed_ms / 3.6e6 / max(1, len(requests))
        return [
            Generation(text=o["text"], prompt_tokens=o["prompt_tokens"],
                       completion_tokens=o["completion_tokens"], latency_ms=elapsed_ms,
                       cost_usd=each_usd)
            for o in reply["outputs"]
        ]

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 5)
        except (TimeoutError, RuntimeError):
            proc.kill()
        if self._stderr_task is not None:
            self._stderr_task.cancel()

    async def aclose(self) -> None:
        """Stop the worker process."""
        await self._kill()


class HFTeacher(WorkerTeacher):
    """A transformers model in a worker process; batched, greedy at temperature 0."""

    name: ClassVar[str] = "hf"
    description: ClassVar[str] = "local Hugging Face causal LM in a child process"
    worker_module: ClassVar[str] = "plugins.teachers.hf_local"
    known_params = WorkerTeacher.known_params | {"seed", "chat"}

    def __init__(self, spec: TeacherSpec, task: TaskPack | None = None) -> None:
        super().__init__(spec, task)
        self.model_seed = param(spec.params, "seed", int, 0)
        if spec.model.startswith(("/", "./", "../", "~")):
            path = Path(spec.model).expanduser()
            if not path.exists():
                raise ConfigError(f"hf teacher model path {spec.model!r} does not exist",
                                  hint="give an existing directory, a hub id or config:NAME",
                                  field="teacher.model")
        # Instruct models want their chat template; config: models read the raw prompt.
        self.chat = param(spec.params, "chat", bool, not spec.model.startswith("config:"))

    def worker_argv(self) -> list[str]:
        """Model, seed for config: models, chat template on/off."""
        return ["--model", self.spec.model, "--seed", str(self.model_seed),
                *(["--chat"] if self.chat else [])]


def open_protocol() -> tuple[Any, Any]:
    """In a worker: (send, stdin). The real stdout carries the protocol; prints go to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    return send, sys.stdin


def generate_prompts(model: Any, tokenizer: Any, prompts: list[str], *, chat: bool,
                     **kwargs: Any) -> list[GenOut]:
    """Generate for raw prompts: as one user turn in the model's chat format, or verbatim.

    With `chat`, each prompt is rendered by `plugins.models.prompting` (the same rendering
    students are trained and served with), so the template's own special tokens are not
    added a second time (a Llama-3 teacher gets one `<|begin_of_text|>`, not two).
    Without it, the prompt is encoded as is, with the tokenizer's special tokens.
    """
    from plugins.models import prompting
    from plugins.models.hf import generate_batch

    if chat:
        return prompting.generate_chat(
            model, tokenizer, [prompting.user_messages(p) for p in prompts], **kwargs)
    return generate_batch(model, tokenizer, prompts, **kwargs)


def _worker(model_ref: str, seed: int, chat: bool) -> int:
    """Child process: load the model, then answer one JSON line per batch on stdout."""
    send, stdin = open_protocol()
    try:
        from plugins.models.hf import load_model

        model, tokenizer = load_model(model_ref, seed=seed)
        device = str(next(model.parameters()).device)
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        send({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    send({"ready": True, "device": device})
    for line in stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        try:
            outs = generate_prompts(model, tokenizer, msg["prompts"], chat=chat,
                                    max_new_tokens=msg["max_new_tokens"],
                                    temperature=msg["temperature"], seed=msg["seed"])
            send({"outputs": [
                {"text": o.text, "prompt_tokens": o.prompt_tokens,
                 "completion_tokens": o.completion_tokens} for o in outs
            ]})
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the worker
            send({"error": f"{type(exc).__name__}: {exc}"})
    return 0


@hookimpl
def stratos_teacher_backends() -> list[type[TeacherBackend]]:
    """Register the `hf` teacher backend."""
    return [HFTeacher]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="stratos hf teacher worker (internal)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true")
    ns = ap.parse_args()
    sys.exit(_worker(ns.model, ns.seed, ns.chat))
