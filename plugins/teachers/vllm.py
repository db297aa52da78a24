"""`vllm` teacher: vLLM's offline engine (`vllm.LLM` + `SamplingParams`) on a GPU host.

The engine runs in a child process (same JSON-lines worker as the `hf` teacher), so the
caller's event loop never blocks and never imports torch or vllm. Without vllm or CUDA the
backend refuses to start with MissingDependency.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any, ClassVar

from plugins.teachers.common import param
from plugins.teachers.hf_local import WorkerTeacher, open_protocol
from schemas.specs import TeacherSpec
from stratosd import hookimpl
from stratosd.api import TaskPack, TeacherBackend
from stratosd.errors import MissingDependency

_HINT = "install stratos[vllm] on a GPU host, or use the `hf` or `openai` teacher backend"


def vllm_unavailable_reason() -> str | None:
    """Why the vLLM engine cannot run here, or None (cheap: no vllm or torch import)."""
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    return None


class VLLMTeacher(WorkerTeacher):
    """A vLLM engine in a worker process: chat template, continuous batching, seeds."""

    name: ClassVar[str] = "vllm"
    description: ClassVar[str] = "vLLM offline engine (extra [vllm], CUDA GPU)"
    worker_module: ClassVar[str] = "plugins.teachers.vllm"
    known_params = WorkerTeacher.known_params | {
        "chat", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype",
        "seed",
    }

    def __init__(self, spec: TeacherSpec, task: TaskPack | None = None) -> None:
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise MissingDependency(f"vllm teacher {spec.model!r}: {reason}", hint=_HINT)
        super().__init__(spec, task)
        p = spec.params
        # vLLM schedules its own batches; hand it everything queued at once.
        self.batch_size = param(p, "batch_size", int, 256, minimum=1)
        self.engine: dict[str, Any] = {
            "tensor_parallel_size": param(p, "tensor_parallel_size", int, 1, minimum=1),
            "gpu_memory_utilization": param(p, "gpu_memory_utilization", float, 0.9,
                                            minimum=0.05),
            "seed": param(p, "seed", int, 0),
        }
        if "max_model_len" in p:
            self.engine["max_model_len"] = param(p, "max_model_len", int, 4096, minimum=16)
        if "dtype" in p:
            self.engine["dtype"] = param(p, "dtype", str, "auto")
        self.chat = param(p, "chat", bool, True)

    def worker_argv(self) -> list[str]:
        """Model, engine kwargs as JSON, chat on/off."""
        return ["--model", self.spec.model, "--engine", json.dumps(self.engine),
                *(["--chat"] if self.chat else [])]


def _worker(model: str, engine: dict[str, Any], chat: bool) -> int:
    """Child process: build the vLLM engine, then answer one JSON line per batch."""
    send, stdin = open_protocol()
    try:
        import torch

        if not torch.cuda.is_available():
            send({"error": f"no CUDA GPU visible ({_HINT})"})
            return 1
        from vllm import LLM, SamplingParams

        if model.startswith("config:"):
            from plugins.models.hf import resolve_model

            model = resolve_model(model, seed=int(engine.get("seed", 0)))
        llm = LLM(model=model, **engine)
    except ImportError as exc:
        send({"error": f"{exc} ({_HINT})"})
        return 1
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        send({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    send({"ready": True, "device": torch.cuda.get_device_name(0)})
    for line in stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        try:
            base_seed = msg["seed"]
            # One SamplingParams per prompt: distinct seeds keep sampled tries distinct.
            sps = [
                SamplingParams(
                    temperature=msg["temperature"], max_tokens=msg["max_new_tokens"],
                    seed=None if base_seed is None else base_seed + i,
                )
                for i in range(len(msg["prompts"]))
            ]
            if chat:
                convs = [[{"role": "user", "content": p}] for p in msg["prompts"]]
                outs = llm.chat(convs, sps, use_tqdm=False)
            else:
                outs = llm.generate(msg["prompts"], sps, use_tqdm=False)
            send({"outputs": [
                {"text": o.outputs[0].text, "prompt_tokens": len(o.prompt_token_ids or []),
                 "completion_tokens": len(o.outputs[0].token_ids)} for o in outs
            ]})
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
