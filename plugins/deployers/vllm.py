"""vLLM deployer: `vllm serve` (vLLM's OpenAI-compatible server) as a child process on a CUDA host.

Needs the `vllm` extra and a CUDA GPU; `unavailable_reason()` says which is missing, and
`serve()` raises MissingDependency. LoRA adapters are served by name on one base model
(`--enable-lora --lora-modules '{"name": NAME, "path": DIR, ...}' ...`); a request picks one
with its `model` field:

- the run's adapter (ctx.adapter) answers to the served name, its base to `NAME-base`;
- `params.adapters` adds more adapters of the same base: `{name: dir}` or `["name=dir"]`;
  each answers to its own name (without ctx.adapter the base answers to the served name).
  An entry whose dir is the base model itself (a tenant whose weights never changed) makes
  the base answer to that name too (`--served-model-name` takes several names).

`--max-lora-rank` is the largest adapter rank rounded up to a rank vLLM accepts;
`--max-loras` (adapters in one batch) is their number, at most 8 unless `params.max_loras`;
adapters past that wait in host memory (`--max-cpu-loras`). Other params: max_model_len,
gpu_memory_utilization, dtype, enforce_eager (true: no torch.compile and no CUDA graphs, a
faster start), startup_timeout_s, seed (builds `config:` bases).

Checked against vLLM 0.27 and 0.34 (vllm/entrypoints/cli/, the serve parser in
entrypoints/*/cli_args.py, engine/arg_utils.py, lora/peft_helper.py); readiness is GET
/health, which answers only once the engine and every adapter are loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import structlog

from stratosd import hookimpl
from stratosd.api import DeployContext, Deployer
from stratosd.errors import ConfigError, JobFailed, MissingDependency

log = structlog.stdlib.get_logger(__name__)

# vLLM's LoRAConfig.max_lora_rank choices (MaxLoRARanks, the same in 0.27 and 0.34)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's ModelConfig.dtype choices (ModelDType)
VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# the weight files vLLM's LoRAModel.from_local_checkpoint reads, in its order
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
# an adapter's name is the `model` of a request: no spaces, no `=`, not starting with `-`
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
    """Serves a model (and optionally LoRA adapters) with vLLM on a CUDA GPU."""

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
        """The `vllm serve` command line for this deployment."""
        from plugins.models.hf import resolve_model

        seed = int(ctx.params.get("seed", 0))
        adapters = lora_modules(ctx)
        aliases = base_aliases(ctx)
        if adapters:
            base_ref = ctx.model
            if ctx.adapter is not None:
                base_ref = adapter_base(ctx.adapter) or ctx.model
            base = resolve_model(base_ref, seed=base_seed(ctx.adapter, seed))
            for name, path in adapters.items():
                check_same_base(name, path, base_ref, base, seed)
        else:
            base = resolve_model(ctx.model, seed=seed)
        base_name = f"{ctx.served_name}-base" if ctx.adapter is not None else ctx.served_name
        # `vllm serve MODEL`: the api_server module and `--model` are deprecated in 0.34 (both
        # warn that they will be removed); the model must be the first positional argument.
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", base,
               "--host", ctx.host, "--port", str(port), "--served-model-name", base_name,
               *aliases]
        if adapters:
            rank = max(adapter_rank(path) for path in adapters.values())
            max_loras = ctx.params.get("max_loras", min(len(adapters), DEFAULT_MAX_LORAS))
            if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1:
                raise ConfigError(f"params.max_loras must be an integer >= 1, got {max_loras!r}",
                                  hint="how many adapters vLLM batches together, e.g. 4",
                                  field="params.max_loras")
            # JSON, not NAME=DIR: vLLM reads an item holding a comma as JSON, so a DIR with a
            # comma would fail to parse; base_model_name sets the adapter's /v1/models parent.
            cmd += ["--enable-lora", "--lora-modules",
                    *(json.dumps({"name": n, "path": str(p.absolute()),
                                  "base_model_name": base_name}) for n, p in adapters.items()),
                    "--max-lora-rank", str(vllm_lora_rank(rank)),
                    "--max-loras", str(max_loras)]
            if len(adapters) > max_loras:  # keep every adapter in host memory, not on disk
                cmd += ["--max-cpu-loras", str(len(adapters))]
        cmd += engine_flags(ctx.params)
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
        adapters = lora_modules(ctx)
        check_servable(adapters, vllm_reads_lora_patterns)
        cmd = self.command(ctx, port)
        log_path = Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        startup_s = float(ctx.params.get("startup_timeout_s", 900))
        with log_path.open("wb") as out:
            # Its own process group: vLLM's engine-core and worker children go with it on kill.
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,  # noqa: S603
                                    start_new_session=True)
        log.info("vllm_started", pid=proc.pid, url=base_url, log=str(log_path),
                 adapters=sorted(adapters))
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    raise JobFailed(f"vLLM exited with status {proc.returncode} during startup "
                                    f"(log: {log_path})", hint=_log_tail(log_path))
                if ctx.should_stop():
                    return
                try:
                    if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise JobFailed(f"vLLM was not healthy after {startup_s:.0f}s "
                                    f"(log: {log_path})",
                                    hint="raise params.startup_timeout_s, or read the log")
                time.sleep(1.0)
            ctx.ready(url=base_url + "/v1", model=ctx.served_name)
            while not ctx.should_stop():
                if proc.poll() is not None:
                    raise JobFailed(f"vLLM exited with status {proc.returncode} "
                                    f"(log: {log_path})", hint=_log_tail(log_path))
                time.sleep(0.5)
        finally:
            stop_process_group(proc)
            log.info("vllm_stopped", pid=proc.pid, returncode=proc.returncode)


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the leader (vLLM then shuts its engine down), wait up to grace_s, then SIGKILL
    whatever is left of its process group (started with start_new_session)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # children left behind would hold the GPU's memory
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def engine_flags(params: dict[str, Any]) -> list[str]:
    """`--max-model-len`, `--gpu-memory-utilization`, `--dtype`, `--enforce-eager` from params,
    checked here so a bad value fails with its field, not as a usage error in vLLM's log."""
    flags: list[str] = []
    if "max_model_len" in params:
        value = params["max_model_len"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"params.max_model_len must be an integer >= 1, got {value!r}",
                              hint="the longest prompt + answer in tokens, e.g. 4096",
                              field="params.max_model_len")
        flags += ["--max-model-len", str(value)]
    if "gpu_memory_utilization" in params:
        value = params["gpu_memory_utilization"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ConfigError("params.gpu_memory_utilization must be a fraction in (0, 1], "
                              f"got {value!r}", hint="the share of GPU memory vLLM may take, "
                              "e.g. 0.9", field="params.gpu_memory_utilization")
        flags += ["--gpu-memory-utilization", str(float(value))]
    if "dtype" in params:
        value = params["dtype"]
        if value not in VLLM_DTYPES:
            raise ConfigError(f"params.dtype {value!r} is not a dtype vLLM knows",
                              hint=f"one of: {', '.join(VLLM_DTYPES)}", field="params.dtype")
        flags += ["--dtype", str(value)]
    if params.get("enforce_eager") is True:  # no torch.compile, no CUDA graphs: starts fast
        flags.append("--enforce-eager")
    return flags


def _read_adapter_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a LoRA adapter: no readable adapter_config.json "
                          f"({type(exc).__name__})",
                          hint="pass the directory a lora-sft run wrote (stratosctl export "
                          "RUN --to DIR writes it to DIR/adapter); a full model of the same "
                          "base is served only by `builtin-multi`", field="params.adapters") \
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
    for name, path in _named_adapters(ctx):
        if path == ctx.model:
            continue  # the base itself: base_aliases
        folder = Path(path).expanduser()
        _read_adapter_config(folder)  # a clear error now, not in vLLM's log
        out[name] = folder
    return out


def base_aliases(ctx: DeployContext) -> list[str]:
    """Names in params.adapters whose dir is the base model itself: the base answers to them."""
    return [name for name, path in _named_adapters(ctx) if path == ctx.model]


def _named_adapters(ctx: DeployContext) -> list[tuple[str, str]]:
    """params.adapters as (name, ref) pairs, names checked: valid, unique, not reserved."""
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
    seen = {ctx.served_name}  # the run's adapter's name, else the base's
    if ctx.adapter is not None:
        seen.add(f"{ctx.served_name}-base")
    for name, _path in items:
        if not ADAPTER_NAME.fullmatch(name):
            raise ConfigError(f"adapter name {name!r} is not a valid model name",
                              hint="use 1-64 of [A-Za-z0-9._-], starting with a letter or "
                              "digit", field="params.adapters")
        if name in seen:
            raise ConfigError(f"adapter name {name!r} is used twice",
                              hint=f"{ctx.served_name!r} and {ctx.served_name + '-base'!r} "
                              "name the run's own model; give every adapter its own name",
                              field="params.adapters")
        seen.add(name)
    return items


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


def unservable_features(cfg: dict[str, Any]) -> list[str]:
    """What in an adapter_config vLLM refuses to load (its PEFTHelper checks), as phrases."""
    found = []
    if cfg.get("use_dora"):
        found.append("DoRA (use_dora)")
    if cfg.get("bias", "none") != "none":
        found.append(f"bias={cfg['bias']!r}")
    if cfg.get("lora_bias"):
        found.append("lora_bias")
    if cfg.get("modules_to_save"):  # whole modules, e.g. embeddings or lm_head
        found.append(f"modules_to_save={cfg['modules_to_save']!r}")
    return found


def check_servable(adapters: dict[str, Path],
                   reads_patterns: Callable[[], bool] = lambda: True) -> None:
    """Refuse, before vLLM starts, an adapter vLLM would fail on (or serve wrong)."""
    patterned = []
    for name, path in adapters.items():
        cfg = _read_adapter_config(path)
        if not any((path / f).is_file() for f in ADAPTER_WEIGHTS):
            raise ConfigError(f"adapter {name!r} ({path}) has no weights: none of "
                              f"{', '.join(ADAPTER_WEIGHTS)}", field="params.adapters",
                              hint="pass the whole directory peft's save_pretrained wrote")
        features = unservable_features(cfg)
        if features:
            raise ConfigError(f"adapter {name!r} uses {', '.join(features)}, which vLLM "
                              "cannot serve", field="params.adapters",
                              hint="export a merged model (stratosctl export) and serve "
                              "that, or deploy with `builtin`")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            patterned.append(name)
    if patterned and not reads_patterns():
        raise ConfigError(f"adapter(s) {', '.join(patterned)} set per-module ranks or alphas "
                          "(rank_pattern/alpha_pattern), which this vLLM ignores: it would "
                          "scale them wrong", field="params.adapters",
                          hint="upgrade vllm (0.34 reads them), or export a merged model")


def vllm_reads_lora_patterns() -> bool:
    """True when the installed vLLM applies peft's rank_pattern/alpha_pattern (0.27 did not)."""
    import dataclasses

    try:
        from vllm.lora.peft_helper import PEFTHelper

        return "rank_pattern" in {f.name for f in dataclasses.fields(PEFTHelper)}
    except (ImportError, TypeError):  # moved or reshaped: a newer vLLM than 0.34
        return True


@hookimpl
def stratos_deployers() -> list[type[Deployer]]:
    """The vLLM deployer."""
    return [VllmDeployer]
