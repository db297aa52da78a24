"""vLLM deployer: vLLM's OpenAI-compatible server as a child process on a CUDA host.

Needs the `vllm` extra and a CUDA GPU; `unavailable_reason()` says which is missing. A LoRA
adapter is served with `--enable-lora --lora-modules NAME=DIR` on top of its base model: the
adapter answers to the served name, the base model to `NAME-base`.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import structlog

from stratosd import hookimpl
from stratosd.api import DeployContext, Deployer
from stratosd.errors import JobFailed, MissingDependency

log = structlog.stdlib.get_logger(__name__)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class VllmDeployer(Deployer):
    """Serves a model (and optionally a LoRA adapter) with vLLM on a CUDA GPU."""

    name: ClassVar[str] = "vllm"
    description: ClassVar[str] = "vLLM OpenAI-compatible server (extra [vllm], CUDA GPU)"

    def unavailable_reason(self) -> str | None:
        """Why vLLM cannot run here: package missing or no CUDA GPU; None when it can."""
        if importlib.util.find_spec("vllm") is None:
            return "vllm is not installed: install `stratos[vllm]`"
        try:
            import torch
        except ImportError:
            return "torch is not installed: install `stratos[vllm]`"
        if not torch.cuda.is_available():
            return "no CUDA GPU on this host: use the `builtin` deployer"
        return None

    def command(self, ctx: DeployContext, port: int) -> list[str]:
        """The vLLM server command line for this deployment."""
        from plugins.models.hf import resolve_model

        seed = int(ctx.params.get("seed", 0))
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--host", ctx.host, "--port", str(port)]
        if ctx.adapter is not None:
            adapter_cfg = json.loads((Path(ctx.adapter) / "adapter_config.json").read_text())
            base = resolve_model(str(adapter_cfg.get("base_model_name_or_path") or ctx.model),
                                 seed=seed)
            rank = int(adapter_cfg.get("r", 16))
            cmd += ["--model", base, "--served-model-name", f"{ctx.served_name}-base",
                    "--enable-lora", "--lora-modules", f"{ctx.served_name}={ctx.adapter}",
                    "--max-lora-rank", str(max(rank, 8))]
        else:
            cmd += ["--model", resolve_model(ctx.model, seed=seed),
                    "--served-model-name", ctx.served_name]
        for key in ("max_model_len", "gpu_memory_utilization", "dtype"):
            if key in ctx.params:
                cmd += ["--" + key.replace("_", "-"), str(ctx.params[key])]
        return cmd

    def serve(self, ctx: DeployContext) -> None:
        """Launch vLLM, wait for /health, report ready, stop the process on should_stop()."""
        import httpx

        reason = self.unavailable_reason()
        if reason is not None:
            raise MissingDependency(f"the vllm deployer cannot run: {reason}",
                                    hint="install `stratos[vllm]` on a CUDA host, or deploy "
                                    "with `builtin`")
        port = ctx.port or _free_port(ctx.host)
        base_url = f"http://{ctx.host}:{port}"
        cmd = self.command(ctx, port)
        log_path = Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        startup_s = float(ctx.params.get("startup_timeout_s", 900))
        with log_path.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603
        log.info("vllm_started", pid=proc.pid, url=base_url, log=str(log_path))
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    raise JobFailed(f"vLLM exited with status {proc.returncode} during startup",
                                    hint=_log_tail(log_path))
                if ctx.should_stop():
                    return
                try:
                    if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise JobFailed(f"vLLM was not healthy after {startup_s:.0f}s",
                                    hint="raise params.startup_timeout_s or check the GPU")
                time.sleep(1.0)
            ctx.ready(url=base_url + "/v1", model=ctx.served_name)
            while not ctx.should_stop():
                if proc.poll() is not None:
                    raise JobFailed(f"vLLM exited with status {proc.returncode}",
                                    hint=_log_tail(log_path))
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.info("vllm_stopped", pid=proc.pid, returncode=proc.returncode)


@hookimpl
def stratos_deployers() -> list[type[Deployer]]:
    """The vLLM deployer."""
    return [VllmDeployer]
