"""`vllm` teacher: vLLM's offline engine (`vllm.LLM` + `SamplingParams`) on a GPU host.

The engine runs in a child process (same JSON-lines worker as the `hf` teacher), so the
caller's event loop never blocks and never imports torch or vllm. Without vllm or CUDA the
backend refuses to start with MissingDependency.

Checked against vLLM 0.27 and 0.34 (vllm/entrypoints/llm.py, sampling_params.py,
outputs.py): `LLM.chat(conversations, [SamplingParams, ...])` renders each conversation with
the tokenizer's chat template and encodes it without adding special tokens again, as
`plugins.models.prompting` does; `LLM.generate` encodes raw prompts with them. Each
`RequestOutput` gives `prompt_token_ids` and `outputs[0].text` / `.token_ids` (the eos token
included, as the `hf` teacher counts it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from plugins.deployers.vllm import VLLM_DTYPES
from plugins.teachers.common import param
from plugins.teachers.hf_local import WorkerTeacher, open_protocol
from schemas.specs import TeacherSpec
from stratosd import hookimpl
from stratosd.api import TaskPack, TeacherBackend
from stratosd.errors import ConfigError, MissingDependency

_HINT = "install stratos[vllm] on a GPU host, or use the `hf` or `openai` teacher backend"


def vllm_unavailable_reason() -> str | None:
    """Why the vLLM engine cannot run here, or None (cheap: no vllm or torch import)."""
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    return None


def engine_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """`vllm.LLM(...)` keyword arguments from teacher params, checked (field-named errors)."""
    engine: dict[str, Any] = {
        "tensor_parallel_size": param(params, "tensor_parallel_size", int, 1, minimum=1),
        "gpu_memory_utilization": param(params, "gpu_memory_utilization", float, 0.9,
                                        minimum=0.05),
        "seed": param(params, "seed", int, 0),
    }
    if engine["gpu_memory_utilization"] > 1:
        raise ConfigError(f"teacher param gpu_memory_utilization="
                          f"{params['gpu_memory_utilization']!r} is above 1",
                          hint="the share of GPU memory vLLM may take, e.g. 0.9",
                          field="teacher.params.gpu_memory_utilization")
    if "max_model_len" in params:
        engine["max_model_len"] = param(params, "max_model_len", int, 4096, minimum=16)
    if "dtype" in params:
        engine["dtype"] = param(params, "dtype", str, "auto")
        if engine["dtype"] not in VLLM_DTYPES:
            raise ConfigError(f"teacher param dtype={engine['dtype']!r} is not a dtype vLLM "
                              "knows", hint=f"one of: {', '.join(VLLM_DTYPES)}",
                              field="teacher.params.dtype")
    if param(params, "enforce_eager", bool, False):  # no torch.compile, no CUDA graphs
        engine["enforce_eager"] = True
    return engine


class VLLMTeacher(WorkerTeacher):
    """A vLLM engine in a worker process: chat template, continuous batching, seeds."""

    name: ClassVar[str] = "vllm"
    description: ClassVar[str] = "vLLM offline engine (extra [vllm], CUDA GPU)"
    worker_module: ClassVar[str] = "plugins.teachers.vllm"
    known_params = WorkerTeacher.known_params | {
        "chat", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype",
        "seed", "enforce_eager",
    }

    def __init__(self, spec: TeacherSpec, task: TaskPack | None = None) -> None:
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise MissingDependency(f"vllm teacher {spec.model!r}: {reason}", hint=_HINT)
        super().__init__(spec, task)
        p = spec.params
        # vLLM schedules its own batches; hand it everything queued at once.
        self.batch_size = param(p, "batch_size", int, 256, minimum=1)
        self.engine = engine_kwargs(p)
        # As the `hf` teacher: instruct models want their chat template, config: models
        # read the raw prompt (the same answers from either backend).
        self.chat = param(p, "chat", bool, not spec.model.startswith("config:"))

    def worker_argv(self) -> list[str]:
        """Model, engine kwargs as JSON, chat on/off."""
        return ["--model", self.spec.model, "--engine", json.dumps(self.engine),
                *(["--chat"] if self.chat else [])]


def sampling_kwargs(msg: dict[str, Any]) -> list[dict[str, Any]]:
    """`SamplingParams(...)` keyword arguments for each prompt of a batch message.

    vLLM's defaults for the rest (top_p 1, top_k off, no penalties) are the `hf` teacher's
    plain temperature sampling; temperature 0 is greedy. One per prompt: distinct seeds keep
    sampled tries of one question distinct.
    """
    seed = msg["seed"]
    return [{"temperature": float(msg["temperature"]), "max_tokens": int(msg["max_new_tokens"]),
             "seed": None if seed is None else int(seed) + i}
            for i in range(len(msg["prompts"]))]


def output_rows(outs: Sequence[Any]) -> list[dict[str, Any]]:
    """The protocol's rows from `vllm.RequestOutput`s (first completion of each)."""
    return [{"text": o.outputs[0].text, "prompt_tokens": len(o.prompt_token_ids or []),
             "completion_tokens": len(o.outputs[0].token_ids)} for o in outs]


def answer(llm: Any, sampling_params: Any, msg: dict[str, Any],
           chat: bool) -> list[dict[str, Any]]:
    """Run one batch message through the engine (`sampling_params` is vLLM's class)."""
    from plugins.models.prompting import user_messages

    sps = [sampling_params(**kw) for kw in sampling_kwargs(msg)]
    if chat:
        outs = llm.chat([user_messages(p) for p in msg["prompts"]], sps, use_tqdm=False)
    else:
        outs = llm.generate(msg["prompts"], sps, use_tqdm=False)
    return output_rows(outs)


def _worker(model: str, engine: dict[str, Any], chat: bool) -> int:
    """Child process: build the vLLM engine, then answer one JSON line per batch."""
    send, stdin = open_protocol()
    # vLLM forks its engine process unless it sees CUDA initialised, and it cannot see the
    # driver init that a cuda-availability check does: spawn is safe either way.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    try:
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        if not current_platform.is_cuda_alike():  # NVML-based: initialises no CUDA
            send({"error": f"no CUDA GPU visible ({_HINT})"})
            return 1
        if model.startswith("config:"):
            from plugins.models.hf import resolve_model

            model = resolve_model(model, seed=int(engine.get("seed", 0)))
        llm = LLM(model=model, **engine)
        device = str(current_platform.get_device_name())
    except ImportError as exc:
        send({"error": f"{exc} ({_HINT})"})
        return 1
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        send({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    send({"ready": True, "device": device})
    for line in stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        try:
            send({"outputs": answer(llm, SamplingParams, msg, chat)})
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the engine
            send({"error": f"{type(exc).__name__}: {exc}"})
    return 0


@hookimpl
def stratos_teacher_backends() -> list[type[TeacherBackend]]:
    """Register the `vllm` teacher backend."""
    return [VLLMTeacher]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="stratos vllm teacher worker (internal)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--engine", default="{}")
    ap.add_argument("--chat", action="store_true")
    ns = ap.parse_args()
    sys.exit(_worker(ns.model, json.loads(ns.engine), ns.chat))
