"""Capacity micro-benchmarks: what this host can do, measured in a few seconds.

The agent calibrates at start and on the `calibrate` command. The compute, memory and disk
benchmarks run in a child process, `python -m agents.calibrate --threads N --work-dir D`, which
prints one JSON `Capacity` on stdout: the agent's own process never imports torch. The upload
benchmark runs in the agent itself (`measure_upload`), which holds the bus connection, and
`calibrate()` merges the two.

What is measured, and how. Each figure is the best of a few timed repeats after one untimed
warm-up (what the hardware sustains, not a cold start); each benchmark stops repeating once its
share of the time budget (`--budget-s`, 5 s by default) is spent, after at least one timed run.

- `matmul_tflops`: dense `torch.matmul` of two n x n matrices, counted as 2·n³ floating-point
  operations each (the multiply-adds of the plain algorithm), in 10¹² FLOP/s per device.
  CUDA: device 0 (a host's GPUs are taken to be alike; `devices` is their count), n = 8192,
  "bf16" and "fp32" (fp32 under torch's current TF32 setting, which is what training gets),
  10 matmuls per timed repeat between synchronisations. CPU: n = 1024 with up to 2 threads,
  2048 with more, "fp32" with `torch.set_num_threads(threads)`, the cap every job child gets;
  "bf16" as well when a 256 x 256 trial shows the CPU computes it fast enough to fit in its
  share of the budget (many CPUs emulate bf16 and would take seconds).
- `mem_bw_gbps`: `dst.copy_(src)` of a 256 MiB fp32 tensor (1 GiB in device memory on CUDA,
  10 copies per repeat), counted as read + write = 2 x size bytes per copy, in 10⁹ bytes/s.
- `disk_write_mbps`: 64 MiB of random bytes written to the work dir in 4 MiB blocks, then
  `fsync`; the time includes the fsync; the file is deleted. In 10⁶ bytes/s.
- `upload_mbps` (agent side): an 8 MiB random blob put into the artifacts object store under
  `_calibration/<agent_id>` through `Bus.put_artifact`, the path job artifacts take, timed until
  the store has acknowledged the last chunk, then deleted. In 10⁶ bytes/s.
- `threads`: the torch CPU thread count the benchmarks ran with (`--threads`, or torch's
  default when 0); `job_threads`: the agent's cap for jobs (`--threads`; 0: none set).
  `duration_s`: wall time of the whole calibration as the agent saw it (child start and torch
  import included). `measured_at`: when the benchmarks started.

A benchmark that cannot run (no torch, a read-only work dir, no object store yet) leaves its
figure None and says why in `Capacity.error`; the others still report. Calibrating while a job
trains would measure contention, so the agent refuses the command while its devices are held.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from schemas.base import utc_now
from schemas.telemetry import Capacity

if TYPE_CHECKING:
    from stratosd.bus import Bus

log = structlog.stdlib.get_logger(__name__)

CAPACITY_DECODER = msgspec.json.Decoder(Capacity)
DEFAULT_BUDGET_S = 5.0
CHILD_TIMEOUT_S = 120.0  # torch import and CUDA start-up come on top of the budget
UPLOAD_PREFIX = "_calibration"  # object-store keys of the upload benchmark (never a run id)
UPLOAD_BYTES = 8 * 2**20
DISK_BYTES = 64 * 2**20
DISK_BLOCK = 4 * 2**20
CPU_COPY_BYTES = 256 * 2**20
CUDA_COPY_BYTES = 2**30
REPEATS = 5


def _best_rate(fn: Callable[[], None], work: float, budget_s: float,
               repeats: int = REPEATS) -> float:
    """work / the fastest of up to `repeats` timed calls of fn, after one warm-up call."""
    start = time.perf_counter()
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return work / best


def _matmul_rate(torch: Any, n: int, dtype: Any, device: str, per_repeat: int,
                 budget_s: float) -> float:
    """Dense n x n matmul FLOP/s (2·n³ per matmul)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    cuda = device.startswith("cuda")

    def once() -> None:
        for _ in range(per_repeat):
            torch.matmul(a, b, out=c)
        if cuda:
            torch.cuda.synchronize(device)

    return _best_rate(once, 2.0 * n**3 * per_repeat, budget_s)  # tensors freed on return


def _copy_rate(torch: Any, nbytes: int, device: str, per_repeat: int, budget_s: float) -> float:
    """Bytes/s of dst.copy_(src), counting read + write."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    cuda = device.startswith("cuda")

    def once() -> None:
        for _ in range(per_repeat):
            dst.copy_(src)
        if cuda:
            torch.cuda.synchronize(device)

    return _best_rate(once, 2.0 * nbytes * per_repeat, budget_s)


def disk_write_rate(work_dir: Path, nbytes: int = DISK_BYTES, block: int = DISK_BLOCK) -> float:
    """Bytes/s of a sequential write of nbytes with fsync into work_dir (file removed)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f".calibrate-disk-{os.getpid()}.bin"
    chunk = os.urandom(block)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            t0 = time.perf_counter()
            written = 0
            while written < nbytes:
                written += os.write(fd, chunk[: min(block, nbytes - written)])
            os.fsync(fd)
            elapsed = time.perf_counter() - t0
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    return written / elapsed


def measure(threads: int, work_dir: Path, budget_s: float = DEFAULT_BUDGET_S) -> Capacity:
    """Run the compute, memory and disk benchmarks here (imports torch: child process only)."""
    started = utc_now()
    errors: list[str] = []
    fields: dict[str, Any] = {"measured_at": started, "threads": threads, "job_threads": threads}
    try:
        fields.update(_measure_torch(threads, budget_s * 0.8, errors))
    except ImportError:
        errors.append("torch is not installed: no compute or memory figures "
                      "(install stratos[train] on this host)")
    except Exception as exc:  # noqa: BLE001 - one benchmark failing must not hide the others
        errors.append(f"compute: {type(exc).__name__}: {exc}")
    try:
        fields["disk_write_mbps"] = round(disk_write_rate(work_dir) / 1e6, 1)
    except OSError as exc:
        errors.append(f"disk: {exc}")
    return Capacity(source="measured", error="; ".join(errors) or None, **fields)


def _measure_torch(threads: int, budget_s: float, errors: list[str]) -> dict[str, Any]:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    tflops: dict[str, float] = {}
    if torch.cuda.is_available():
        dev = "cuda:0"
        out.update(device="cuda", devices=torch.cuda.device_count())
        for name, dtype, share in (("bf16", torch.bfloat16, 0.35), ("fp32", torch.float32, 0.4)):
            try:
                tflops[name] = _matmul_rate(torch, 8192, dtype, dev, 10, budget_s * share) / 1e12
            except RuntimeError as exc:  # e.g. bf16 on a GPU without it
                errors.append(f"matmul {name}: {exc}")
        out["mem_bw_gbps"] = _copy_rate(torch, CUDA_COPY_BYTES, dev, 10, budget_s * 0.25) / 1e9
    else:
        n = 1024 if torch.get_num_threads() <= 2 else 2048
        out.update(device="cpu", devices=1)
        tflops["fp32"] = _matmul_rate(torch, n, torch.float32, "cpu", 1, budget_s * 0.5) / 1e12
        bf16_budget = budget_s * 0.25
        # a quick trial: bf16 emulated in software would take seconds at full size
        trial = _matmul_rate(torch, 256, torch.bfloat16, "cpu", 1, 0.05)
        if 2.0 * n**3 * (1 + REPEATS) / trial < bf16_budget:
            tflops["bf16"] = _matmul_rate(torch, n, torch.bfloat16, "cpu", 1, bf16_budget) / 1e12
        out["mem_bw_gbps"] = _copy_rate(torch, CPU_COPY_BYTES, "cpu", 1, budget_s * 0.25) / 1e9
    out["matmul_tflops"] = {k: round(v, 4) for k, v in tflops.items()}
    out["mem_bw_gbps"] = round(out["mem_bw_gbps"], 2)
    return out


# --- agent side (no torch) -------------------------------------------------------------------


async def run_benchmarks(threads: int, work_dir: Path, *, budget_s: float = DEFAULT_BUDGET_S,
                         timeout_s: float = CHILD_TIMEOUT_S) -> Capacity:
    """Run `measure` in a child process (job env, same thread cap); failures become `error`."""
    from agents.runner import worker_env

    started = utc_now()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents.calibrate", "--threads", str(threads),
        "--work-dir", str(work_dir), "--budget-s", str(budget_s),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True, env=worker_env(threads),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        _kill(proc)
        await proc.wait()
        return Capacity(measured_at=started, job_threads=threads,
                        error=f"benchmarks did not finish within {timeout_s:.0f} s")
    except asyncio.CancelledError:
        _kill(proc)  # the agent is stopping: never leave a benchmark behind
        await proc.wait()
        raise
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return Capacity(measured_at=started, job_threads=threads,
                        error=f"benchmark child exited with code {proc.returncode}: {tail[0]}")
    try:
        return CAPACITY_DECODER.decode(lines[-1])
    except msgspec.DecodeError as exc:
        return Capacity(measured_at=started, job_threads=threads,
                        error=f"benchmark child printed no Capacity: {exc}")


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def measure_upload(bus: Bus, agent_id: str, work_dir: Path,
                         nbytes: int = UPLOAD_BYTES) -> float:
    """Bytes/s of an artifact upload to the bus object store (the blob is deleted after)."""
    key = f"{UPLOAD_PREFIX}/{agent_id}"
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f".calibrate-upload-{os.getpid()}.bin"
    await asyncio.to_thread(path.write_bytes, os.urandom(nbytes))
    # bind the store first (the agent's own bucket on a secured bus): not part of the upload
    await bus.has_artifact(key)
    try:
        t0 = time.perf_counter()
        await bus.put_artifact(key, path)
        elapsed = time.perf_counter() - t0
    finally:
        path.unlink(missing_ok=True)
    try:
        await bus.delete_artifact(key)
    except Exception:  # noqa: BLE001 - a leftover 8 MiB blob is overwritten next time
        log.debug("calibration_blob_not_deleted", key=key, exc_info=True)
    return nbytes / elapsed


async def calibrate(bus: Bus, agent_id: str, work_dir: Path, *, threads: int = 0,
                    budget_s: float = DEFAULT_BUDGET_S) -> Capacity:
    """All benchmarks: the child's compute/memory/disk figures plus the upload, merged."""
    t0 = time.monotonic()
    started: datetime = utc_now()
    cap = await run_benchmarks(threads, work_dir, budget_s=budget_s)
    errors = [cap.error] if cap.error else []
    upload: float | None = None
    try:
        upload = round(await measure_upload(bus, agent_id, work_dir) / 1e6, 1)
    except Exception as exc:  # noqa: BLE001 - no object store yet, no permission, bus away
        errors.append(f"upload: {type(exc).__name__}: {exc}")
    return msgspec.structs.replace(
        cap, upload_mbps=upload, measured_at=cap.measured_at or started,
        duration_s=round(time.monotonic() - t0, 2), error="; ".join(errors) or None)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: run the benchmarks, print one JSON Capacity line on stdout."""
    p = argparse.ArgumentParser(prog="python -m agents.calibrate",
                                description="Measure this host's capacity (see the module doc).")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: its default)")
    p.add_argument("--work-dir", type=Path, required=True, help="where the disk test writes")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds the benchmarks may take together (default 5)")
    args = p.parse_args(argv)
    cap = measure(args.threads, args.work_dir, args.budget_s)
    sys.stdout.write(msgspec.json.encode(cap).decode() + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
