"""vLLM deployer: vLLM's OpenAI-compatible server as a child process on a CUDA host.

Needs the `vllm` extra and a CUDA GPU; `unavailable_reason()` says which is missing, and
`serve()` raises MissingDependency. LoRA adapters are served by name on one base model
(`--enable-lora --lora-modules NAME=DIR ...`); a request picks one with its `model` field:

- the run's adapter (ctx.adapter) answers to the served name, its base to `NAME-base`;
- `params.adapters` adds more adapters of the same base: `{name: dir}` or `["name=dir"]`;
  each answers to its own name (without ctx.adapter the base answers to the served name).

`--max-lora-rank` is the largest adapter rank rounded up to a rank vLLM accepts;
`--max-loras` (adapters in one batch) is their number, at most 8 unless `params.max_loras`.
Other params: max_model_len, gpu_memory_utilization, dtype, enforce_eager (true: no CUDA
graphs, a faster start), startup_timeout_s, seed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import structlog

from stratosd import hookimpl
from stratosd.api import DeployContext, Deployer
from stratosd.errors import ConfigError, JobFailed, MissingDependency

log = structlog.stdlib.get_logger(__name__)

# the ranks vLLM's LoRAConfig.max_lora_rank accepts
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# an adapter's name is the `model` of a request: no `=` (it splits NAME=DIR), no spaces
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_MAX_LORAS = 8


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
        adapters = lora_modules(ctx)
        if adapters:
            base_ref = ctx.model
            if ctx.adapter is not None:
                base_ref = adapter_base(ctx.adapter) or ctx.model
            base = resolve_model(base_ref, seed=base_seed(ctx.adapter, seed))
            for name, path in adapters.items():
                check_same_base(name, path, base_ref, base, seed)
            base_name = f"{ctx.served_name}-base" if ctx.adapter is not None else ctx.served_name
            rank = max(adapter_rank(path) for path in adapters.values())
            max_loras = ctx.params.get("max_loras", min(len(adapters), DEFAULT_MAX_LORAS))
            if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1:
                raise ConfigError(f"params.max_loras must be an integer >= 1, got {max_loras!r}",
                                  hint="how many adapters vLLM batches together, e.g. 4",
                                  field="params.max_loras")
            cmd += ["--model", base, "--served-model-name", base_name, "--enable-lora",
                    "--lora-modules", *(f"{n}={p}" for n, p in adapters.items()),
                    "--max-lora-rank", str(vllm_lora_rank(rank)),
                    "--max-loras", str(max_loras)]
        else:
            cmd += ["--model", resolve_model(ctx.model, seed=seed),
                    "--served-model-name", ctx.served_name]
        for key in ("max_model_len", "gpu_memory_utilization", "dtype"):
            if key in ctx.params:
                cmd += ["--" + key.replace("_", "-"), str(ctx.params[key])]
        if ctx.params.get("enforce_eager") is True:  # no CUDA graphs: starts in seconds
            cmd.append("--enforce-eager")
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
        log.info("vllm_started", pid=proc.pid, url=base_url, log=str(log_path),
                 adapters=sorted(lora_modules(ctx)))
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


def _read_adapter_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a LoRA adapter: no readable adapter_config.json "
                          f"({type(exc).__name__})",
                          hint="pass the directory a lora-sft run wrote (stratosctl export "
                          "RUN --to DIR writes it to DIR/adapter)", field="params.adapters") \
            from exc
    return cfg if isinstance(cfg, dict) else {}


def adapter_base(path: Path) -> str:
    """The base model ref an adapter names ("" when none)."""
    return str(_read_adapter_config(path).get("base_model_name_or_path") or "")


def adapter_rank(path: Path) -> int:
    """The LoRA rank of an adapter (its largest, with per-module ranks)."""
    cfg = _read_adapter_config(path)
    ranks = [int(cfg.get("r") or 8), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())]
    return max(ranks)


def base_seed(adapter: Path | None, default: int) -> int:
    """The seed a config: base was built with (the trainer's card), else default."""
    if adapter is None:
        return default
    from plugins.models.hf import _adapter_base_seed

    return _adapter_base_seed(adapter, default)


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that holds rank."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ConfigError(f"LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})",
                      hint="retrain with a smaller lora_r, or export a merged model "
                      "(stratosctl export) and serve that", field="params.adapters")


def lora_modules(ctx: DeployContext) -> dict[str, Path]:
    """Adapter name → directory: ctx.adapter as the served name, then params.adapters."""
    out: dict[str, Path] = {}
    if ctx.adapter is not None:
        out[ctx.served_name] = Path(ctx.adapter)
    raw = ctx.params.get("adapters") or {}
    items: list[tuple[str, str]] = []
    if isinstance(raw, dict):
        items = [(str(k), str(v)) for k, v in raw.items()]
    elif isinstance(raw, list | tuple):
        for entry in raw:
            name, sep, path = str(entry).partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"params.adapters entry {entry!r} must look like NAME=DIR",
                                  hint="e.g. adapters = [\"support=/srv/adapters/support\"]",
                                  field="params.adapters")
            items.append((name, path))
    else:
        raise ConfigError("params.adapters must be a table {name = dir} or a list of "
                          f"\"NAME=DIR\", got {type(raw).__name__}",
                          hint="e.g. adapters = {support = \"/srv/adapters/support\"}",
                          field="params.adapters")
    reserved = {f"{ctx.served_name}-base"} if ctx.adapter is not None else {ctx.served_name}
    for name, path in items:
        if not ADAPTER_NAME.fullmatch(name):
            raise ConfigError(f"adapter name {name!r} is not a valid model name",
                              hint="use 1-64 of [A-Za-z0-9._-], starting with a letter or "
                              "digit", field="params.adapters")
        if name in out or name in reserved:
            raise ConfigError(f"adapter name {name!r} is used twice",
                              hint=f"{ctx.served_name!r} and {ctx.served_name + '-base'!r} "
                              "name the run's own model; give every adapter its own name",
                              field="params.adapters")
        folder = Path(path).expanduser()
        _read_adapter_config(folder)  # a clear error now, not in vLLM's log
        out[name] = folder
    return out


def check_same_base(name: str, adapter: Path, base_ref: str, base: str, seed: int) -> None:
    """vLLM serves adapters of one base: refuse an adapter trained on another."""
    from plugins.models.hf import resolve_model

    ref = adapter_base(adapter)
    if not ref or ref == base_ref:
        return
    try:
        if resolve_model(ref, seed=base_seed(adapter, seed)) == base:
            return
    except ConfigError:
        pass
    raise ConfigError(f"adapter {name!r} was trained on {ref!r}, but this endpoint serves "
                      f"{base_ref!r}", hint="one vLLM server holds one base model: deploy "
                      "adapters of other bases on their own endpoint", field="params.adapters")


@hookimpl
def stratos_deployers() -> list[type[Deployer]]:
    """The vLLM deployer."""
    return [VllmDeployer]
