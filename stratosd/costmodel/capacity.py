"""What a server can do: the agent's measurements, else a documented table (marked estimated).

Speeds are per device in the dtype training uses there: bf16 on GPUs (fp16 on T4/V100, which
lack bf16), fp32 on CPUs. Table values (`GPU_TABLE`) are the vendors' dense (no sparsity)
tensor throughput and memory bandwidth; real kernels reach a fraction of them, and that
fraction is what `learn.EfficiencyBook` learns per kind of job, so a table value is a prior,
not a promise. CPU figures: `CPU_FP32_TFLOPS_PER_THREAD` was measured on the project's 2-core
development machine (fp32 matmul, n=1024, one thread: 73 GFLOP/s, bench_train's note); an
agent's own calibration replaces it as soon as it has run.

Threads: a CPU job uses the agent's job thread cap (`Capacity.threads`, `--threads`), and
tiny models train on one thread by default (`plugins.trainers.hparams.size_defaults`), so the
CPU speed a job sees is the measured speed scaled by threads used / threads measured
(linear, an assumption the learned efficiency corrects).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import msgspec

from schemas.specs import ServerOffer

# (canonical name, regex on the normalised model string, dense bf16 TFLOP/s, fp32 (TF32 where
# the GPU has it) TFLOP/s, memory GB/s). First match wins: longer names before their prefixes.
GPU_TABLE: tuple[tuple[str, str, float, float, float], ...] = (
    ("B200", r"\bb200\b", 2250.0, 1100.0, 8000.0),
    ("MI300X", r"\bmi300x\b", 1307.0, 654.0, 5300.0),
    ("H200", r"\bg?h200\b", 989.0, 495.0, 4800.0),
    ("H100 PCIe", r"\bh100 (?:\w+ )*pcie\b", 756.0, 378.0, 2000.0),
    ("H100", r"\bh100\b", 989.0, 495.0, 3350.0),
    ("A100", r"\ba100\b", 312.0, 156.0, 2039.0),
    ("RTX 6000 Ada", r"\b6000 ada\b", 364.0, 91.0, 960.0),
    ("L40S", r"\bl40s\b", 362.0, 183.0, 864.0),
    ("L40", r"\bl40\b", 181.0, 90.0, 864.0),
    ("L4", r"\bl4\b", 121.0, 60.0, 300.0),
    ("RTX A6000", r"\ba6000\b", 155.0, 77.0, 768.0),
    ("A40", r"\ba40\b", 150.0, 75.0, 696.0),
    ("A10G", r"\ba10g\b", 70.0, 35.0, 600.0),
    ("A10", r"\ba10\b", 125.0, 62.0, 600.0),
    ("V100", r"\bv100\b", 125.0, 15.7, 900.0),
    ("T4", r"\bt4\b", 65.0, 8.1, 320.0),
    ("RTX 4090", r"\b4090\b", 165.0, 82.0, 1008.0),
    ("RTX 3090", r"\b3090\b", 71.0, 35.0, 936.0),
)
UNKNOWN_GPU = ("", 30.0, 15.0, 500.0)
CPU_FP32_TFLOPS_PER_THREAD = 0.073
CPU_MEM_BW_GBPS = 10.0
DISK_WRITE_MBPS = 500.0
UPLOAD_MBPS = 100.0
GPU_DTYPE = "bf16"
CPU_DTYPE = "fp32"

_PATTERNS = [(name, re.compile(p), bf16, fp32, bw) for name, p, bf16, fp32, bw in GPU_TABLE]
_VENDOR_WORDS = re.compile(r"\b(?:nvidia|geforce|tesla|amd|instinct|radeon)\b")


@lru_cache(maxsize=4096)
def gpu_entry(model: str) -> tuple[str, float, float, float]:
    """(canonical name, bf16 TFLOP/s, fp32 TFLOP/s, GB/s) of a GPU model string."""
    norm = _VENDOR_WORDS.sub(" ", re.sub(r"[^a-z0-9]+", " ", model.lower()))
    norm = " ".join(norm.split())
    for name, pattern, bf16, fp32, bw in _PATTERNS:
        if pattern.search(norm):
            return name, bf16, fp32, bw
    return UNKNOWN_GPU


@dataclass(frozen=True)
class Speed:
    """The speeds the cost model uses for one server, per device, and where they came from."""

    hw_class: str  # learned-efficiency key part: "cpu-1t", "gpu-a100"
    dtype: str
    tflops: float  # per device, in dtype, at the threads a job gets
    mem_bw_gbps: float
    disk_mbps: float
    upload_mbps: float
    devices: int  # devices the server has (GPUs; 1 for a CPU host)
    source: str  # "measured" or "estimated"

    def describe(self) -> str:
        """'0.073 TFLOP/s fp32 (measured)'."""
        return f"{self.tflops:.3g} TFLOP/s {self.dtype} per device ({self.source})"


def offer_speed(offer: ServerOffer, job_threads: int | None = None) -> Speed:
    """Per-device speeds of an offer: its agent's measurements, else the table.

    job_threads: CPU threads the job will use (None: what the agent measured with, else all
    cores).
    """
    cap = offer.capacity
    # a benchmark that failed leaves its own figure None (and says why in error): the others
    # still count as measured
    measured = cap is not None and cap.source == "measured" and bool(cap.matmul_tflops)
    if offer.hardware_score is not None:  # a catalog's own figure replaces the table
        base = offer_speed(msgspec.structs.replace(offer, hardware_score=None), job_threads)
        return Speed(hw_class=base.hw_class, dtype=base.dtype,
                     tflops=max(offer.hardware_score, 1e-6), mem_bw_gbps=base.mem_bw_gbps,
                     disk_mbps=base.disk_mbps, upload_mbps=base.upload_mbps,
                     devices=base.devices, source="estimated")
    if offer.gpu_count > 0:
        name, bf16, fp32, bw = gpu_entry(offer.gpu_model)
        tflops = bf16
        if measured and cap is not None:
            tflops = cap.matmul_tflops.get(GPU_DTYPE) or cap.matmul_tflops.get("fp16") or bf16
            bw = cap.mem_bw_gbps or bw
        slug = re.sub(r"[^a-z0-9]+", "-", (name or offer.gpu_model or "gpu").lower()).strip("-")
        return Speed(
            hw_class=f"gpu-{slug}", dtype=GPU_DTYPE, tflops=tflops, mem_bw_gbps=bw,
            disk_mbps=_or(cap.disk_write_mbps if measured and cap else None, DISK_WRITE_MBPS),
            upload_mbps=_or(cap.upload_mbps if measured and cap else None, UPLOAD_MBPS),
            devices=offer.gpu_count, source="measured" if measured else "estimated")
    cores = max(offer.cpu_count, 1)
    measured_threads = (cap.threads if measured and cap and cap.threads else cores)
    threads = min(job_threads or measured_threads, cores)
    if measured and cap is not None and cap.matmul_tflops.get(CPU_DTYPE):
        per_thread = cap.matmul_tflops[CPU_DTYPE] / max(measured_threads, 1)
    else:
        per_thread = CPU_FP32_TFLOPS_PER_THREAD
    return Speed(
        hw_class=f"cpu-{threads}t", dtype=CPU_DTYPE, tflops=per_thread * threads,
        mem_bw_gbps=_or(cap.mem_bw_gbps if measured and cap else None, CPU_MEM_BW_GBPS),
        disk_mbps=_or(cap.disk_write_mbps if measured and cap else None, DISK_WRITE_MBPS),
        upload_mbps=_or(cap.upload_mbps if measured and cap else None, UPLOAD_MBPS),
        # a CPU server is one device; a group of N (stratosd.groups) trains with one rank on
        # each member, so only the training phase is credited, at N ranks' scaling efficiency
        devices=max(1, len(offer.members)), source="measured" if measured else "estimated")


def job_threads(offer: ServerOffer, tiny: bool) -> int:
    """CPU threads a job will use there: the agent's cap when set, else 1 for tiny models
    (size_defaults' cpu_threads) and every core otherwise."""
    cap = offer.capacity
    if cap is not None and cap.job_threads:
        return min(cap.job_threads, max(offer.cpu_count, 1))
    return 1 if tiny else max(offer.cpu_count, 1)


def _or(value: float | None, default: float) -> float:
    return value if value is not None and value > 0 else default
