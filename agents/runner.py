"""One job = one child process: inputs in, progress and logs out as events, outputs up."""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import shutil
import signal
import sys
import tarfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog

from agents.outbox import Faults, Outbox
from agents.worker import child_env, credential_files
from schemas import subjects
from schemas.base import Message, is_token
from schemas.commands import JobStatus, RunStep
from schemas.events import (
    EndpointDeployed,
    EndpointRemoved,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobInterrupted,
    JobLog,
    JobProgress,
    JobStarted,
)
from schemas.subjects import artifact_key
from stratosd.bus import Bus
from stratosd.errors import BadMessage, Conflict, NotFound, StratosError

log = structlog.stdlib.get_logger(__name__)
STATUS_DECODER = msgspec.json.Decoder(JobStatus)
# Events that settle a job or an endpoint: kept in the outbox until JetStream acks them.
# Progress and log lines are best effort (the next one says the same, or more).
DURABLE_EVENTS = (JobStarted, JobCompleted, JobFailed, JobCancelled, JobInterrupted,
                  EndpointDeployed, EndpointRemoved)
OUTBOX_FILE = Path("outbox") / "job-events.log"


def worker_argv(job_file: Path) -> list[str]:
    """The command line of a step's child process (see agents.worker)."""
    return [sys.executable, "-m", "agents.worker", str(job_file)]


# Steps that train: each holds the agent's whole device set (what the trainer uses) while it
# runs, so two never share it; the others (probe, synthesize, evaluate, deploy) only count
# against max_jobs. A tenant's LoRA rounds and its student probe (short fits) train too.
TRAINING_STEPS = frozenset({"train", "prescreen", "tenant_train", "tenant_probe"})
JOB_THREADS_ENV = "STRATOS_JOB_THREADS"


def worker_env(threads: int = 0, hidden: list[str] | None = None) -> dict[str, str]:
    """The child's environment: the agent's without its bus credentials (agents.worker.
    child_env), unbuffered, tokenizers without their own threads; hidden: files the child
    makes unreadable to itself before a step runs (the agent's password and creds files).

    threads > 0 caps the child's CPU threads: OpenMP/MKL pools and `STRATOS_JOB_THREADS`,
    which the trainers read as their default `cpu_threads` (0: the libraries' defaults).
    """
    env = {**child_env(dict(os.environ), hidden), "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   **{JOB_THREADS_ENV: str(threads)})
    return env


@dataclass
class Job:
    """A job on this agent."""

    cmd: RunStep
    workdir: Path
    state: str = "queued"
    proc: asyncio.subprocess.Process | None = None
    result: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    interrupted: bool = False
    endpoint_url: str | None = None
    deployed: EndpointDeployed | None = None
    code: str = ""  # a failed job's error code, hint and detail (its job_failed event's)
    hint: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def status(self) -> JobStatus:
        """The job as a GetJob reply."""
        serving = self.deployed if self.state == "running" else None
        return JobStatus(job_id=self.cmd.job_id, state=self.state,  # type: ignore[arg-type]
                         step=self.cmd.step, result=self.result, artifacts=self.artifacts,
                         error=self.error, code=self.code, hint=self.hint, detail=self.detail,
                         endpoint=serving, source="agent")

    def failed(self, code: str, message: str, hint: str = "",
               detail: dict[str, Any] | None = None) -> None:
        """Record the job's failure."""
        self.state, self.error, self.code, self.hint = "failed", message, code, hint
        self.detail = dict(detail or {})


def _tar_dir(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tar:
        tar.add(src, arcname=".")
    return dest


def _untar(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tar:
        tar.extractall(dest, filter="data")  # "data" refuses absolute paths and ../ escapes
    return dest


class Runner:
    """Runs RunStep jobs in child processes and reports them on the bus."""

    def __init__(self, bus: Bus, agent_id: str, work_dir: Path, *, max_jobs: int = 4,
                 grace_s: float = 20.0, job_threads: int = 0) -> None:
        self.bus = bus
        self.agent_id = agent_id
        self.work_dir = work_dir
        self.max_jobs = max_jobs
        self.grace_s = grace_s
        self.job_threads = job_threads
        self.jobs: dict[str, Job] = {}
        self._load_finished()
        # what an earlier life left unpublished goes out first, once start() runs
        self.outbox = Outbox(work_dir / OUTBOX_FILE, self._publish, faults=Faults.from_env())

    async def start(self) -> None:
        """Start publishing the outbox (the bus is connected)."""
        self.outbox.start()

    async def _publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        # JetStream acks or this raises; the stream deduplicates a repeat by the message id
        await self.bus.js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})

    def _load_finished(self) -> None:
        # Finished jobs survive an agent restart so a resuming daemon can still ask about them.
        for status_file in (self.work_dir / "jobs").glob("*/status.json"):
            try:
                st = STATUS_DECODER.decode(status_file.read_bytes())
            except (msgspec.DecodeError, OSError):
                continue
            cmd = RunStep(job_id=st.job_id, step=st.step or "probe")  # type: ignore[arg-type]
            job = Job(cmd, status_file.parent, state=st.state, result=dict(st.result),
                      artifacts=dict(st.artifacts), error=st.error, code=st.code, hint=st.hint,
                      detail=dict(st.detail))
            if job.state in ("queued", "running"):
                job.state = "interrupted"
            self.jobs[st.job_id] = job

    def running(self) -> list[str]:
        """Ids of jobs in flight."""
        return [j for j, job in self.jobs.items() if job.state in ("queued", "running")]

    def training_jobs(self) -> list[str]:
        """Ids of the training jobs in flight: they hold the device set (at most one)."""
        return [j for j, job in self.jobs.items()
                if job.cmd.step in TRAINING_STEPS and job.state in ("queued", "running")]

    def endpoints(self) -> list[str]:
        """URLs this agent serves."""
        return [job.endpoint_url for job in self.jobs.values()
                if job.endpoint_url and job.state == "running"]

    async def emit(self, event: Message, name: str, job_id: str) -> None:
        """Publish a job event (JetStream; the daemon's durable consumer picks it up).

        Events that settle a job go through the outbox: on disk first, then published until
        JetStream acks them, across bus outages and agent restarts."""
        subject = subjects.job_event(self.agent_id, job_id, name)
        if isinstance(event, DURABLE_EVENTS):
            try:
                await self.outbox.put(subject, event)
                return
            except OSError:  # a full or failing disk: still try the bus once
                log.error("job_event_not_stored", job_id=job_id, event_name=name, exc_info=True)
        try:
            await self.bus.publish_event(subject, event)
        except Exception:  # noqa: BLE001 - the bus may be reconnecting; the state stays local
            log.warning("job_event_not_published", job_id=job_id, event_name=name, exc_info=True)

    def submit(self, cmd: RunStep) -> Job:
        """Start a job; the same job_id again returns the existing job (idempotent)."""
        if not is_token(cmd.job_id) or (cmd.run_id and not is_token(cmd.run_id)):
            raise BadMessage("job_id", "job_id and run_id must be 1-64 of [a-z0-9_-]")
        if cmd.job_id in self.jobs and self.jobs[cmd.job_id].state != "interrupted":
            return self.jobs[cmd.job_id]
        if cmd.step in TRAINING_STEPS and (holders := self.training_jobs()):
            held = self.jobs[holders[0]].cmd
            raise Conflict(
                f"agent {self.agent_id} is busy: its devices are held by {held.step} job "
                f"{held.job_id}" + (f" of run {held.run_id}" if held.run_id else "")
                + f"; {cmd.step} job {cmd.job_id} was not started",
                hint="one training job per device set: wait for it to finish, cancel it, or "
                "pick a server whose offer is not busy")
        if len(self.running()) >= self.max_jobs:
            raise Conflict(f"agent {self.agent_id} is busy ({self.max_jobs} jobs running)",
                           hint="wait, or raise max_jobs in the agent config")
        job = Job(cmd, self.work_dir / "jobs" / cmd.job_id)
        self.jobs[cmd.job_id] = job
        job.task = asyncio.create_task(self._run(job), name=f"job-{cmd.job_id}",
                                       context=contextvars.Context())
        return job

    async def _fetch_inputs(self, job: Job) -> dict[str, str]:
        paths: dict[str, str] = {}
        for name, key in job.cmd.inputs.items():
            artifact_key("x", name)  # validates the local name
            if key.endswith(".tar"):
                tmp = job.workdir / "inputs" / f"{name}.tar"
                await self.bus.get_artifact(key, tmp)
                paths[name] = str(await asyncio.to_thread(_untar, tmp,
                                                          job.workdir / "inputs" / name))
                tmp.unlink(missing_ok=True)
            else:
                dest = job.workdir / "inputs" / name
                paths[name] = str(await self.bus.get_artifact(key, dest))
        return paths

    async def _upload(self, run_id: str, path: Path, name: str) -> str:
        if path.is_dir():
            tar = path.parent / f".{name}.tar"
            await asyncio.to_thread(_tar_dir, path, tar)
            key = artifact_key(run_id, f"{name}.tar")
            await self.bus.put_artifact(key, tar)
            tar.unlink(missing_ok=True)
            return key
        return await self.bus.put_artifact(artifact_key(run_id, name), path)

    async def _run(self, job: Job) -> None:
        cmd = job.cmd
        run_id = cmd.run_id or "adhoc"
        t0 = time.monotonic()
        with structlog.contextvars.bound_contextvars(job_id=cmd.job_id, run_id=run_id):
            try:
                shutil.rmtree(job.workdir, ignore_errors=True)
                job.workdir.mkdir(parents=True)
                inputs = await self._fetch_inputs(job)
                spec = {"job_id": cmd.job_id, "run_id": run_id, "step": cmd.step,
                        "args": cmd.args, "inputs": inputs, "workdir": str(job.workdir),
                        "state_dir": str(self.work_dir / "runs" / run_id / cmd.step)}
                (job.workdir / "job.json").write_text(json.dumps(spec))
                await self._child(job, run_id)
            except StratosError as exc:
                job.failed(exc.code, exc.message, exc.hint, getattr(exc, "detail", None))
                await self.emit(JobFailed(job_id=cmd.job_id, run_id=run_id, agent_id=self.agent_id,
                                          step=cmd.step, code=exc.code, message=exc.message,
                                          hint=exc.hint, detail=job.detail, source=self.agent_id),
                                "failed", cmd.job_id)
            except asyncio.CancelledError:
                job.state = "interrupted"
                raise
            except Exception as exc:  # noqa: BLE001 - job boundary
                log.error("job_crashed", exc_info=True)
                job.failed("job_failed", f"{type(exc).__name__}: {exc}")
                await self.emit(JobFailed(job_id=cmd.job_id, run_id=run_id, agent_id=self.agent_id,
                                          step=cmd.step, message=job.error or "",
                                          source=self.agent_id),
                                "failed", cmd.job_id)
            finally:
                if job.state != "completed":
                    await self._terminate(job)  # never leave a child running for a dead job
                self._save(job)
                log.info("job_finished", state=job.state,
                         duration_s=round(time.monotonic() - t0, 2))

    async def _child(self, job: Job, run_id: str) -> None:
        cmd = job.cmd
        t0 = time.monotonic()
        hidden = credential_files(self.bus.config)
        env = worker_env(self.job_threads, hidden)
        if hidden:  # new files beside a hidden one are unreadable: temp files go to the workdir
            env["TMPDIR"] = str(job.workdir / "tmp")
            (job.workdir / "tmp").mkdir(exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            *worker_argv(job.workdir / "job.json"),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
            limit=16 * 1024 * 1024,
            env=env,
        )
        job.proc, job.state = proc, "running"
        await self.emit(JobStarted(job_id=cmd.job_id, run_id=run_id, agent_id=self.agent_id,
                                   step=cmd.step, pid=proc.pid, source=self.agent_id),
                        "started", cmd.job_id)
        final: dict[str, Any] = {}
        if proc.stdout is None or proc.stderr is None:  # both are PIPE above: never
            raise StratosError(f"job {cmd.job_id}: the child has no output pipes",
                               hint="report this as a bug")
        await asyncio.gather(self._read_protocol(job, run_id, proc.stdout, final),
                             self._read_logs(job, run_id, proc.stderr))
        rc = await proc.wait()
        if job.endpoint_url:
            await self.emit(EndpointRemoved(endpoint_id=cmd.job_id, agent_id=self.agent_id,
                                            source=self.agent_id), "undeployed", cmd.job_id)
        if job.interrupted:
            job.state = "interrupted"
            await self.emit(JobInterrupted(job_id=cmd.job_id, run_id=run_id,
                                           agent_id=self.agent_id, source=self.agent_id),
                            "interrupted", cmd.job_id)
        elif job.cancel_requested:
            job.state = "cancelled"
            await self.emit(JobCancelled(job_id=cmd.job_id, run_id=run_id,
                                         agent_id=self.agent_id, source=self.agent_id),
                            "cancelled", cmd.job_id)
        elif "result" in final and rc == 0:
            outdir = job.workdir / "out"
            for entry in sorted(outdir.iterdir()) if outdir.exists() else []:
                if not entry.name.startswith("."):
                    job.artifacts[entry.name if entry.is_file() else f"{entry.name}.tar"] = \
                        await self._upload(run_id, entry, entry.name)
            job.result = dict(final["result"])
            job.state = "completed"
            await self.emit(JobCompleted(job_id=cmd.job_id, run_id=run_id,
                                         agent_id=self.agent_id, step=cmd.step,
                                         result=job.result, artifacts=job.artifacts,
                                         duration_s=round(time.monotonic() - t0, 3),
                                         source=self.agent_id), "completed", cmd.job_id)
        else:
            err = final.get("error") or {
                "code": "job_failed",
                "message": f"child exited with code {rc}: "
                + (" | ".join(list(job.stderr_tail)[-3:]) or "no output"),
                "hint": "see the job log"}
            detail = err.get("detail")
            job.failed(str(err.get("code") or "job_failed"), str(err.get("message", "")),
                       str(err.get("hint") or ""), detail if isinstance(detail, dict) else None)
            await self.emit(JobFailed(job_id=cmd.job_id, run_id=run_id, agent_id=self.agent_id,
                                      step=cmd.step, code=job.code, message=job.error or "",
                                      hint=job.hint, detail=job.detail, source=self.agent_id),
                            "failed", cmd.job_id)

    async def _read_protocol(self, job: Job, run_id: str, stream: asyncio.StreamReader,
                             final: dict[str, Any]) -> None:
        cmd = job.cmd
        async for raw in stream:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                job.stderr_tail.append(raw.decode(errors="replace").rstrip())
                continue
            kind = line.pop("kind", "")
            if kind == "progress":
                await self.emit(JobProgress(job_id=cmd.job_id, run_id=run_id,
                                            agent_id=self.agent_id, step=cmd.step,
                                            done=float(line.get("done", 0)),
                                            total=line.get("total"), unit=line.get("unit", ""),
                                            message=line.get("message", ""),
                                            metrics=line.get("metrics", {}),
                                            source=self.agent_id), "progress", cmd.job_id)
            elif kind == "log":
                await self.emit(JobLog(job_id=cmd.job_id, run_id=run_id, agent_id=self.agent_id,
                                       level=line.get("level", "info"),
                                       message=str(line.get("message", ""))[:4000],
                                       source=self.agent_id), "log", cmd.job_id)
            elif kind == "checkpoint":
                name = f"{cmd.step}-{line.get('name', 'checkpoint')}"
                try:
                    key = await self._upload(run_id, Path(line["path"]), name)
                except Exception:  # noqa: BLE001 - bus away: the next checkpoint tries again
                    log.warning("checkpoint_upload_failed", job_id=cmd.job_id, exc_info=True)
                    continue
                await self.emit(JobProgress(job_id=cmd.job_id, run_id=run_id,
                                            agent_id=self.agent_id, step=cmd.step,
                                            message=f"checkpoint uploaded: {key}",
                                            source=self.agent_id), "progress", cmd.job_id)
            elif kind == "ready":
                job.endpoint_url = str(line.get("url", ""))
                metrics = {k: float(v) for k, v in dict(line.get("metrics", {})).items()
                           if isinstance(v, int | float)}
                job.deployed = EndpointDeployed(
                    endpoint_id=cmd.job_id, run_id=run_id, agent_id=self.agent_id,
                    url=job.endpoint_url, model=str(line.get("model", "")),
                    deployer=str(cmd.args.get("deployer", "")), metrics=metrics,
                    source=self.agent_id)
                await self.emit(job.deployed, "deployed", cmd.job_id)
            elif kind in ("result", "error"):
                final[kind] = line.get("result", line) if kind == "result" else line

    async def _read_logs(self, job: Job, run_id: str, stream: asyncio.StreamReader) -> None:
        last = 0.0
        async for raw in stream:
            text = raw.decode(errors="replace").rstrip()
            if not text:
                continue
            job.stderr_tail.append(text)
            now = time.monotonic()
            if now - last >= 0.2:  # a chatty library must not flood the stream
                last = now
                await self.emit(JobLog(job_id=job.cmd.job_id, run_id=run_id,
                                       agent_id=self.agent_id, level="stderr",
                                       message=text[:4000], source=self.agent_id),
                                "log", job.cmd.job_id)

    def _save(self, job: Job) -> None:
        try:
            job.workdir.mkdir(parents=True, exist_ok=True)
            (job.workdir / "status.json").write_bytes(msgspec.json.encode(job.status()))
        except OSError:
            log.warning("job_status_not_saved", job_id=job.cmd.job_id)

    async def _terminate(self, job: Job) -> None:
        proc = job.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(proc.wait(), self.grace_s)
        except TimeoutError:
            log.warning("job_kill", job_id=job.cmd.job_id)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def cancel(self, job_id: str) -> Job:
        """SIGTERM the job's process group (the step checkpoints), SIGKILL after the grace."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} on agent {self.agent_id}")
        if job.state in ("queued", "running"):
            job.cancel_requested = True
            await self._terminate(job)
            if job.task is not None:
                await asyncio.wait([job.task], timeout=self.grace_s + 5)
        return job

    async def shutdown(self) -> None:
        """Interrupt every job (checkpoint, then job_interrupted), then wait for their tasks."""
        for job in self.jobs.values():
            if job.state in ("queued", "running"):
                job.interrupted = True
        await asyncio.gather(*(self._terminate(j) for j in self.jobs.values()))
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.grace_s + 5)
        await self.outbox.close(timeout=5.0)  # what is left is published on the next start
