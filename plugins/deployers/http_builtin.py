"""Built-in OpenAI-compatible server on transformers (stdlib HTTP, no extra dependencies).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (with `stream`),
`POST /v1/completions`. Generation is serialised by a lock (one model, CPU or one GPU).
Chat messages are rendered by `plugins.models.prompting`, exactly as the student was trained;
vLLM's `return_token_ids` extension returns the prompt and generated token ids.
Testing aids: `faults={429: 0.2, 500: 0.1}` fails that share of POSTs (seeded; 429 carries
`Retry-After`), `delay_s` adds latency per request outside the lock (a remote API).
Run by hand: `python -m plugins.deployers.http_builtin --model config:tiny --port 8000`.
This module is the engine (model, sampling, generation, streaming) and the plugin; the HTTP
layer is `openai_http`, the request/error format `openai_wire`.
"""

from __future__ import annotations

import argparse
import queue
import random
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from typing import Any, ClassVar

import structlog

from plugins.deployers.openai_http import ConnTrackingServer, Handler
from plugins.deployers.openai_wire import ApiError, chat_messages, cut_at_stop, field_value
from plugins.models import prompting
from stratosd import hookimpl
from stratosd.api import DeployContext, Deployer
from stratosd.errors import StratosError

log = structlog.stdlib.get_logger(__name__)


class OpenAIServer:
    """A small OpenAI-compatible HTTP server over one transformers model."""

    def __init__(
        self,
        model: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        served_name: str | None = None,
        seed: int = 0,
        max_new_tokens_cap: int = 512,
        faults: Mapping[int, float] | None = None,
        fault_seed: int = 0,
        delay_s: float = 0.0,
        retry_after_s: float = 0.1,
    ) -> None:
        self.model_ref = model
        self.host, self.port = host, port
        self.served_name = served_name or model
        self.seed = seed
        self.max_new_tokens_cap = max_new_tokens_cap
        self.faults = dict(faults or {})
        if sum(self.faults.values()) > 1.0:
            raise ValueError("fault fractions add up to more than 1")
        self.delay_s = delay_s
        self.retry_after_s = retry_after_s
        self._fault_rng = random.Random(fault_seed)
        self._fault_lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._httpd: ConnTrackingServer | None = None
        self._thread: threading.Thread | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------

    handler_class: type[Handler] = Handler  # the routes; a subclass may add to them

    def load(self) -> None:
        """Load the model and tokenizer to serve."""
        from plugins.models.hf import load_model

        self.model, self.tokenizer = load_model(self.model_ref, seed=self.seed)

    def start(self) -> str:
        """Load the model, listen, serve in a thread; return `http://host:port/v1`."""
        self.load()
        handler = type("Handler", (self.handler_class,), {"app": self})
        self._httpd = ConnTrackingServer((self.host, self.port), handler)
        host, port = self._httpd.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        self.port = int(port)
        self.url = f"http://{host}:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-server",
                                        daemon=True)
        self._thread.start()
        log.info("builtin_server_started", url=self.url, model=self.served_name,
                 handler=self.handler_class.__name__)
        return self.url

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.close_connections()
            self._httpd = None
            log.info("builtin_server_stopped", url=self.url)

    def serve_deployment(self, ctx: DeployContext, **ready: Any) -> None:
        """A deployer's life: start, self-check /health, report ready (the url and `ready`),
        serve until ctx.should_stop(), stop."""
        import httpx

        url = self.start()
        try:
            httpx.get(url.removesuffix("/v1") + "/health", timeout=10).raise_for_status()
            ctx.ready(url=url, **ready)
            while not ctx.should_stop():
                time.sleep(0.2)
        finally:
            self.stop()

    def serve_forever(self, what: str) -> None:
        """By hand: start, print `what at URL`, serve until Ctrl-C, stop."""
        url = self.start()
        print(f"{what} at {url}", flush=True)  # noqa: T201 - CLI output
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> OpenAIServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- request logic -----------------------------------------------------------------

    def draw_fault(self) -> int | None:
        """The status this request must fail with, or None (seeded, thread-safe)."""
        if not self.faults:
            return None
        with self._fault_lock:
            r = self._fault_rng.random()
        acc = 0.0
        for status, share in sorted(self.faults.items()):
            acc += share
            if r < acc:
                return int(status)
        return None

    def check_model(self, body: Mapping[str, Any]) -> None:
        """400 when `model` is missing, 404 when it is not the served one."""
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "missing required field `model`", param="model")
        if name != self.served_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves "
                           f"`{self.served_name}`", param="model", code="model_not_found")

    def sampling(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """max_new_tokens, temperature, seed and stop strings from a request body."""
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = field_value({name: max_tokens}, name, int, self.max_new_tokens_cap, lo=1)
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, "`stop` must be a string or a list of strings", param="stop")
        if field_value(body, "n", int, 1) != 1:
            raise ApiError(400, "only `n` = 1 is supported", param="n")
        return {
            "max_new_tokens": min(max_tokens, self.max_new_tokens_cap),
            "temperature": float(field_value(body, "temperature", (int, float), 0.0, lo=0, hi=2)),
            "seed": field_value(body, "seed", int, self.seed),
            "stops": stops,
        }

    def chat_prompt(self, body: Mapping[str, Any]) -> prompting.Prompt:
        """The prompt of a chat request, rendered as in training (see `prompting`)."""
        try:
            return prompting.render_prompt(self.tokenizer, chat_messages(body))
        except StratosError as exc:  # the chat template refused these messages
            raise ApiError(400, exc.message, param="messages") from None

    def encode(self, prompt: str, add_special_tokens: bool) -> list[int]:
        """The token ids generation is fed for a prompt."""
        return prompting.encode_prompt(self.tokenizer, prompting.Prompt(
            prompt, templated=not add_special_tokens))

    def generate(self, prompts: list[str], opts: Mapping[str, Any], *,
                 add_special_tokens: bool = True) -> list[dict[str, Any]]:
        """Generate for a batch under the lock; text cut at stop strings."""
        from plugins.models.hf import generate_batch

        with self._gen_lock:
            outs = generate_batch(self.model, self.tokenizer, prompts,
                                  max_new_tokens=opts["max_new_tokens"],
                                  temperature=opts["temperature"], seed=opts["seed"],
                                  add_special_tokens=add_special_tokens)
        results = []
        for out in outs:
            text, stopped = cut_at_stop(out.text, opts["stops"])
            results.append({"text": text, "finish_reason": "stop" if stopped
                            else out.finish_reason, "prompt_tokens": out.prompt_tokens,
                            "completion_tokens": out.completion_tokens,
                            "prompt_token_ids": out.prompt_token_ids,
                            "token_ids": out.token_ids})
        return results

    def stream(self, prompt_ids: list[int], opts: Mapping[str, Any], usage: dict[str, Any],
               cancelled: threading.Event) -> Generator[str, None, None]:
        """Yield text pieces as they are generated (held back near a possible stop string)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from plugins.models.hf import eos_token_ids

        class _Cancel(StoppingCriteria):
            def __call__(self, *_a: Any, **_k: Any) -> bool:
                return cancelled.is_set()

        tok = self.tokenizer
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        device = next(self.model.parameters()).device
        streamer = _TokenStream(tok)
        eos = eos_token_ids(self.model, tok)
        kwargs: dict[str, Any] = {"do_sample": opts["temperature"] > 0}
        if kwargs["do_sample"]:
            kwargs.update(temperature=opts["temperature"], top_k=0, top_p=1.0)
        out: dict[str, Any] = {}

        def work() -> None:
            try:
                with torch.inference_mode():
                    torch.manual_seed(opts["seed"])
                    out["ids"] = self.model.generate(
                        **{k: v.to(device) for k, v in enc.items()}, streamer=streamer,
                        max_new_tokens=opts["max_new_tokens"], eos_token_id=eos,
                        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
                        stopping_criteria=StoppingCriteriaList([_Cancel()]), **kwargs)
            except Exception:  # noqa: BLE001 - reported by the handler; the stream must end
                log.exception("stream_generation_failed")
                streamer.fail()

        stops: list[str] = opts["stops"]
        hold = max((len(s) for s in stops), default=1) - 1
        with self._gen_lock:
            worker = threading.Thread(target=work, name="generate", daemon=True)
            worker.start()
            full, sent, stopped = "", 0, False
            try:
                for piece in streamer:
                    if stopped:
                        continue  # drain so the worker can finish
                    full += piece
                    text, stopped = cut_at_stop(full, stops)
                    end = len(text) if stopped else max(sent, len(full) - hold)
                    if end > sent:
                        yield text[sent:end]
                        sent = end
                    if stopped:
                        cancelled.set()
                if not stopped and len(full) > sent:
                    yield full[sent:]
            finally:
                cancelled.set()
                worker.join()
        new = out["ids"][0, enc["input_ids"].shape[1]:].tolist() if "ids" in out else []
        n = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        hit_eos = bool(new) and new[n - 1] in eos
        usage.update(prompt_tokens=int(enc["input_ids"].shape[1]), completion_tokens=n,
                     finish_reason="stop" if stopped or hit_eos else "length")


class _TokenStream:
    """A generate() streamer yielding decoded text per token (the prompt is skipped)."""

    _END = object()

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.queue: queue.Queue[Any] = queue.Queue()
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        """Called by generate() with the prompt first, then each new token."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half a multi-byte character: wait for the rest
        if len(text) > self.sent:
            self.queue.put(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        """Called by generate() when it finishes."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.queue.put(text[self.sent:])
        self.queue.put(self._END)

    def fail(self) -> None:
        """End the stream after generate() raised."""
        self.queue.put(self._END)

    def __iter__(self) -> Iterator[str]:
        while (item := self.queue.get()) is not self._END:
            yield item


# --- the plugin ----------------------------------------------------------------------------


class BuiltinDeployer(Deployer):
    """Serves a model (or adapter) with the built-in OpenAI-compatible server."""

    name: ClassVar[str] = "builtin"
    description: ClassVar[str] = "built-in OpenAI-compatible server on transformers (CPU/GPU)"

    def serve(self, ctx: DeployContext) -> None:
        """Start the server, self-check /health, report ready, serve until should_stop()."""
        model = str(ctx.adapter) if ctx.adapter else ctx.model
        server = OpenAIServer(
            model, host=ctx.host, port=ctx.port, served_name=ctx.served_name,
            seed=int(ctx.params.get("seed", 0)),
            max_new_tokens_cap=int(ctx.params.get("max_new_tokens_cap", 512)),
        )
        server.serve_deployment(ctx, model=server.served_name)


@hookimpl
def stratos_deployers() -> list[type[Deployer]]:
    """The built-in server."""
    return [BuiltinDeployer]


def main(argv: list[str] | None = None) -> None:
    """Serve a model by hand until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m plugins.deployers.http_builtin")
    parser.add_argument("--model", required=True, help="config:NAME, local dir, adapter or hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-name", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    server = OpenAIServer(args.model, host=args.host, port=args.port,
                          served_name=args.served_name, seed=args.seed)
    server.serve_forever(f"serving {server.served_name}")


if __name__ == "__main__":
    main()
