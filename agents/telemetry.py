"""Hardware, price and latency probes for the agent's heartbeat. No torch here."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import psutil
import structlog

from schemas.telemetry import GpuInfo

log = structlog.stdlib.get_logger(__name__)


def gpus() -> list[GpuInfo]:
    """GPUs via NVML (nvidia-ml-py) when present; [] on hosts without NVIDIA GPUs."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: a CPU host
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            out.append(GpuInfo(
                index=i, model=name.decode() if isinstance(name, bytes) else str(name),
                mem_total_mib=int(mem.total // 2**20), mem_used_mib=int(mem.used // 2**20),
                util_pct=float(util.gpu)))
    finally:
        pynvml.nvmlShutdown()
    return out


def host() -> dict[str, Any]:
    """CPU and RAM figures."""
    vm = psutil.virtual_memory()
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count() or 1,
        "cpu_pct": psutil.cpu_percent(interval=None),
        "ram_total_mib": int(vm.total // 2**20),
        "ram_used_mib": int((vm.total - vm.available) // 2**20),
    }


async def probe_url(url: str, timeout_s: float = 3.0) -> float | None:
    """Round trip of an HTTP GET in ms (e.g. to the users' region), None on failure."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            t0 = time.perf_counter()
            await client.get(url)
            return (time.perf_counter() - t0) * 1000.0
    except httpx.HTTPError as exc:
        log.debug("probe_url_failed", url=url, error=str(exc))
        return None
