"""What agents report every few seconds: hardware, price and measured latency."""

from __future__ import annotations

from typing import Annotated

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
    util_pct: Annotated[float, Meta(ge=0, le=100)] = 0.0


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
    price_usd_per_hour: Annotated[float, Meta(ge=0)] = 0.0
    latency_ms: float | None = None
    probe_latency_ms: float | None = None
    running_jobs: list[str] = []
    endpoints: list[str] = []
    steps: list[str] = []
    interval_s: float = 5.0


TELEMETRY_DECODER = msgspec.json.Decoder(AgentTelemetry)
