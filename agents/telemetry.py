"""Hardware, price and latency probes for the agent's heartbeat. No torch here.

Latency is what users see: each `--probe-url` target (`URL` or `LABEL=URL`) is timed with a few
HTTP GETs, its median goes into `user_latency_ms[label]`, and `latency_ms` is the worst of them.
Nothing configured, or nothing answered: latency is unknown (None), never 0.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import statistics
import time
from typing import Any
from urllib.parse import urlsplit

import psutil
import structlog

from schemas.telemetry import GpuInfo
from stratosd.errors import ConfigError

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


_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PROBE_GETS = 3


def parse_probe_target(value: str) -> tuple[str, str]:
    """`LABEL=URL` or `URL` → (label, url); the label defaults to the URL itself.

    A `=` only separates a label when what precedes it is a plain label (no `://`), so URLs
    with query strings (`https://h/p?a=b`) stay whole.
    """
    label, sep, rest = value.strip().partition("=")
    if sep and "://" not in label and _LABEL.match(label):
        label, url = label, rest.strip()
    else:
        label, url = value.strip(), value.strip()
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(
            f"probe target {value!r} is not an http(s) URL",
            hint="use --probe-url URL or --probe-url LABEL=URL, e.g. us-east=https://example.com",
            field="probe_url")
    return label, url


def parse_probe_targets(values: list[str]) -> dict[str, str]:
    """Every configured target as {label: url}; a label given twice is a ConfigError."""
    out: dict[str, str] = {}
    for value in values:
        label, url = parse_probe_target(value)
        if label in out:
            raise ConfigError(f"probe label {label!r} is given twice",
                              hint="give each --probe-url target its own label",
                              field="probe_url")
        out[label] = url
    return out


async def probe_url(url: str, timeout_s: float = 3.0, gets: int = PROBE_GETS) -> float | None:
    """Median round trip in ms of `gets` HTTP GETs over one connection (the first pays the
    connect, as a user's first request does); any HTTP answer counts. None when none answered.
    """
    import httpx

    times: list[float] = []
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for _ in range(gets):
            t0 = time.perf_counter()
            try:
                await client.get(url)
            except httpx.HTTPError as exc:
                log.debug("probe_url_failed", url=url, error=str(exc) or type(exc).__name__)
                break  # a dead target is not asked again this round
            times.append((time.perf_counter() - t0) * 1000.0)
    return round(statistics.median(times), 3) if times else None


async def user_latency(targets: dict[str, str]) -> dict[str, float]:
    """{label: median ms} for the targets that answered (all probed concurrently); a target
    that failed is left out, never reported as 0."""
    labels = list(targets)
    results = await asyncio.gather(*(probe_url(targets[label]) for label in labels))
    return {label: ms for label, ms in zip(labels, results, strict=True)
            if ms is not None and ms > 0}


def worst_latency(measured: dict[str, float]) -> float | None:
    """The figure telemetry reports as `latency_ms`: the worst (max) user-facing latency over
    the targets that answered, so a server is never shown nearer than its farthest users;
    None when no target is configured or none answered."""
    return max(measured.values()) if measured else None
