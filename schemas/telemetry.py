"""What agents report every few seconds: hardware, price and measured latency."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from schemas import SCHEMA_VERSION
from schemas.base import Message


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU as NVML sees it."""

    index: int
    model: str
    mem_total_mib: Annotated[int, Meta(ge=0)]
    mem_used_mib: Annotated[int, Meta(ge=0)] = 0
    util_pct: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0


class Capacity(msgspec.Struct, frozen=True, kw_only=True):
    """What a server can do, from the agent's micro-benchmarks (or a documented table).

    Speeds are per device: one GPU, or the CPU with the thread count jobs get. `source` says
    whether the agent measured them or they come from `stratosd.costmodel.capacity`'s table.
    """

    source: Literal["measured", "estimated"] = "measured"
    device: Literal["cpu", "cuda"] = "cpu"
    devices: Annotated[int, Meta(ge=0)] = 1  # GPUs measured, or 1 for the CPU
    threads: Annotated[int, Meta(ge=0)] = 0  # CPU threads the benchmarks (and jobs) used
    job_threads: Annotated[int, Meta(ge=0)] = 0  # the agent's cap for jobs; 0: none set
    matmul_tflops: dict[str, float] = {}  # dtype ("fp32", "bf16", "fp16") -> dense TFLOP/s
    mem_bw_gbps: float | None = None  # device memory bandwidth, GB/s
    disk_write_mbps: float | None = None  # sequential write with fsync, MB/s
    upload_mbps: float | None = None  # object-store upload to the bus, MB/s
    measured_at: datetime | None = None
    duration_s: float = 0.0  # how long the benchmarks took
    error: str | None = None  # why a benchmark could not run


class AgentTelemetry(Message, frozen=True, kw_only=True, tag="agent_telemetry"):
    """An agent's heartbeat: who it is, what it has, what it costs, how far it is."""

    agent_id: str
    schema_version: int = SCHEMA_VERSION
    agent_version: str = ""
    seq: int = 0
    hostname: str = ""
    region: str = ""
    cpu_count: int = 0
    cpu_pct: float = 0.0
    ram_total_mib: int = 0
    ram_used_mib: int = 0
    gpus: list[GpuInfo] = []
    price_usd_per_hour: Annotated[float, Meta(ge=0.0)] = 0.0
    latency_ms: float | None = None
    probe_latency_ms: float | None = None
    running_jobs: list[str] = []
    endpoints: list[str] = []
    steps: list[str] = []
    interval_s: float = 5.0
    capacity: Capacity | None = None  # None until the first calibration finishes
    user_latency_ms: dict[str, float] = {}  # probe target (URL or region label) -> ms RTT
    training_jobs: list[str] = []  # jobs holding the agent's device set (one at a time)


TELEMETRY_DECODER = msgspec.json.Decoder(AgentTelemetry)
