"""Built-in OpenAI-compatible server on transformers (stdlib HTTP, no extra dependencies).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (with `stream`),
`POST /v1/completions`. Generation is serialised by a lock (one model, CPU or one GPU).
Testing aids: `faults={429: 0.2, 500: 0.1}` fails that share of POSTs (seeded; 429 carries
`Retry-After`), `delay_s` adds latency per request outside the lock (a remote API).
Run by hand: `python -m plugins.deployers.http_builtin --model config:tiny --port 8000`.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import random
import socket
import threading
import time
import uuid
from collections.abc import Generator, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import structlog

from stratosd import hookimpl
from stratosd.api import DeployContext, Deployer
from stratosd.errors import StratosError

log = structlog.stdlib.get_logger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool")
FAULT_TYPES = {
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "overloaded"),
}


class ApiError(Exception):
    """An OpenAI-shaped error reply."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, err_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, err_type)

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any,
           *, lo: float | None = None, hi: float | None = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ApiError(400, f"`{name}` has the wrong type: {value!r}", param=name)
    number: float = value if isinstance(value, int | float) else 0.0
    if lo is not None and number < lo or hi is not None and number > hi:
        raise ApiError(400, f"`{name}` must be between {lo} and {hi}, got {value!r}", param=name)
    return value


def _content(message: Any, i: int) -> str:
    if not isinstance(message, dict):
        raise ApiError(400, f"`messages[{i}]` must be an object", param=f"messages[{i}]")
    if message.get("role") not in ROLES:
        raise ApiError(400, f"`messages[{i}].role` must be one of {', '.join(ROLES)}",
                       param=f"messages[{i}].role")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"`messages[{i}].content` must be a string or a list of text parts",
                   param=f"messages[{i}].content")


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class _HTTPServer(ThreadingHTTPServer):
    """Tracks open connections so stop() also ends idle keep-alive ones."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut every open client connection (their handler threads then exit)."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


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
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> str:
        """Load the model, listen, serve in a thread; return `http://host:port/v1`."""
        from plugins.models.hf import load_model

        self.model, self.tokenizer = load_model(self.model_ref, seed=self.seed)
        handler = type("Handler", (_Handler,), {"app": self})
        self._httpd = _HTTPServer((self.host, self.port), handler)
        host, port = self._httpd.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        self.port = int(port)
        self.url = f"http://{host}:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-server",
                                        daemon=True)
        self._thread.start()
        log.info("builtin_server_started", url=self.url, model=self.served_name)
        return self.url

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.close_connections()
            self._httpd = None
            log.info("builtin_server_stopped", url=self.url)

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
        max_tokens = _field({name: max_tokens}, name, int, self.max_new_tokens_cap, lo=1)
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, "`stop` must be a string or a list of strings", param="stop")
        if _field(body, "n", int, 1) != 1:
            raise ApiError(400, "only `n` = 1 is supported", param="n")
        return {
            "max_new_tokens": min(max_tokens, self.max_new_tokens_cap),
            "temperature": float(_field(body, "temperature", (int, float), 0.0, lo=0, hi=2)),
            "seed": _field(body, "seed", int, self.seed),
            "stops": stops,
        }

    def chat_prompt(self, body: Mapping[str, Any]) -> str:
        """The prompt text of a chat request (the tokenizer's chat template)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "`messages` must be a non-empty list", param="messages")
        contents = [_content(m, i) for i, m in enumerate(messages)]
        if getattr(self.tokenizer, "chat_template", None):
            msgs = [{"role": m["role"], "content": c}
                    for m, c in zip(messages, contents, strict=True)]
            return str(self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                          add_generation_prompt=True))
        return "\n".join(contents)

    def generate(self, prompts: list[str], opts: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Generate for a batch under the lock; text cut at stop strings."""
        from plugins.models.hf import generate_batch

        with self._gen_lock:
            outs = generate_batch(self.model, self.tokenizer, prompts,
                                  max_new_tokens=opts["max_new_tokens"],
                                  temperature=opts["temperature"], seed=opts["seed"])
        results = []
        for out in outs:
            text, stopped = _cut_at_stop(out.text, opts["stops"])
            results.append({"text": text, "finish_reason": "stop" if stopped
                            else out.finish_reason, "prompt_tokens": out.prompt_tokens,
                            "completion_tokens": out.completion_tokens})
        return results

    def stream(self, prompt: str, opts: Mapping[str, Any], usage: dict[str, Any],
               cancelled: threading.Event) -> Generator[str, None, None]:
        """Yield text pieces as they are generated (held back near a possible stop string)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from plugins.models.hf import eos_token_ids

        class _Cancel(StoppingCriteria):
            def __call__(self, *_a: Any, **_k: Any) -> bool:
                return cancelled.is_set()

        tok = self.tokenizer
        enc = tok([prompt], return_tensors="pt")
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
                    text, stopped = _cut_at_stop(full, stops)
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


class _Handler(BaseHTTPRequestHandler):
    app: ClassVar[OpenAIServer]
    protocol_version = "HTTP/1.1"
    server_version = "stratos-builtin/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        log.debug("http_request", line=format % args)

    def _json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, exc: ApiError, headers: Mapping[str, str] | None = None) -> None:
        self._json(exc.status, exc.body(), headers)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        app = self.app
        if self.path.rstrip("/") == "/health":
            self._json(200, {"status": "ok", "model": app.served_name})
        elif self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": app.served_name, "object": "model", "created": 0,
                 "owned_by": "stratos"}]})
        else:
            self._error(ApiError(404, f"unknown path {self.path}", code="not_found"))

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        app = self.app
        try:
            route, body = self._parse()
            fault = app.draw_fault()
            if fault is not None:
                self._fault(fault)
                return
            if app.delay_s > 0:
                time.sleep(app.delay_s)  # outside the lock: emulates network/queue latency
            route(body)
        except ApiError as exc:
            self._error(exc)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client_disconnected", path=self.path)
        except StratosError as exc:
            self._error(ApiError(400, exc.message))
        except Exception as exc:  # noqa: BLE001 - a request must never kill the server
            log.exception("request_failed", path=self.path)
            self._error(ApiError(500, f"internal error: {type(exc).__name__}",
                                 err_type="server_error", code="internal_error"))

    def _parse(self) -> tuple[Any, dict[str, Any]]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        route = {"/v1/chat/completions": self._chat,
                 "/v1/completions": self._completions}.get(self.path.rstrip("/"))
        if route is None:
            raise ApiError(404, f"unknown path {self.path}", code="not_found")
        try:
            body = json.loads(raw or b"null")
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return route, body

    def _fault(self, status: int) -> None:
        err_type, code = FAULT_TYPES.get(status, ("server_error", "injected_fault"))
        headers = {}
        if status == 429:
            headers = {"Retry-After": str(max(1, math.ceil(self.app.retry_after_s))),
                       "retry-after-ms": str(int(self.app.retry_after_s * 1000))}
        self._error(ApiError(status, f"injected fault {status}", err_type=err_type, code=code),
                    headers)

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": f"{kind}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.app.served_name}

    def _chat(self, body: dict[str, Any]) -> None:
        app = self.app
        app.check_model(body)
        prompt = app.chat_prompt(body)
        opts = app.sampling(body)
        if _field(body, "stream", bool, False):
            self._stream(prompt, opts, "chatcmpl", body)
            return
        out = app.generate([prompt], opts)[0]
        self._json(200, {**self._envelope("chatcmpl"), "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": out["text"]},
             "finish_reason": out["finish_reason"], "logprobs": None}],
            "usage": _usage([out])})

    def _completions(self, body: dict[str, Any]) -> None:
        app = self.app
        app.check_model(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(
                isinstance(p, str) for p in prompts):
            raise ApiError(400, "`prompt` must be a string or a non-empty list of strings",
                           param="prompt")
        opts = app.sampling(body)
        if _field(body, "stream", bool, False):
            if len(prompts) != 1:
                raise ApiError(400, "`stream` needs a single prompt", param="stream")
            self._stream(prompts[0], opts, "cmpl", body)
            return
        outs = app.generate(prompts, opts)
        self._json(200, {**self._envelope("cmpl"), "object": "text_completion", "choices": [
            {"index": i, "text": o["text"], "finish_reason": o["finish_reason"],
             "logprobs": None} for i, o in enumerate(outs)], "usage": _usage(outs)})

    def _stream(self, prompt: str, opts: Mapping[str, Any], kind: str,
                body: Mapping[str, Any]) -> None:
        chat = kind == "chatcmpl"
        env = {**self._envelope(kind), "object": "chat.completion.chunk" if chat
               else "text_completion"}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

        def send(payload: Any) -> None:
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        usage: dict[str, Any] = {}
        cancelled = threading.Event()
        if chat:
            send({**env, "choices": [choice("", None, first=True)]})
        pieces = self.app.stream(prompt, opts, usage, cancelled)
        try:
            for piece in pieces:
                send({**env, "choices": [choice(piece, None)]})
        finally:
            cancelled.set()  # a vanished client stops the generation early
            pieces.close()  # releases the generation lock now, not at garbage collection
        send({**env, "choices": [choice(None, usage.get("finish_reason", "stop"))],
              "usage": _usage([usage])})
        if include_usage:
            send({**env, "choices": [], "usage": _usage([usage])})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _usage(outs: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    prompt = sum(int(o.get("prompt_tokens", 0)) for o in outs)
    completion = sum(int(o.get("completion_tokens", 0)) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


# --- the plugin ----------------------------------------------------------------------------


class BuiltinDeployer(Deployer):
    """Serves a model (or adapter) with the built-in OpenAI-compatible server."""

    name: ClassVar[str] = "builtin"
    description: ClassVar[str] = "built-in OpenAI-compatible server on transformers (CPU/GPU)"

    def serve(self, ctx: DeployContext) -> None:
        """Start the server, self-check /health, report ready, serve until should_stop()."""
        import httpx

        model = str(ctx.adapter) if ctx.adapter else ctx.model
        server = OpenAIServer(
            model, host=ctx.host, port=ctx.port, served_name=ctx.served_name,
            seed=int(ctx.params.get("seed", 0)),
            max_new_tokens_cap=int(ctx.params.get("max_new_tokens_cap", 512)),
        )
        url = server.start()
        try:
            health = httpx.get(url.removesuffix("/v1") + "/health", timeout=10)
            health.raise_for_status()
            ctx.ready(url=url, model=server.served_name)
            while not ctx.should_stop():
                time.sleep(0.2)
        finally:
            server.stop()


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
    url = server.start()
    print(f"serving {server.served_name} at {url}", flush=True)  # noqa: T201 - CLI output
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
