"""The built-in server's HTTP layer: routes, JSON and SSE replies, injected faults.

`Handler` turns requests into calls on its `app` (an `OpenAIServer`, set on a subclass per
server) and replies in the OpenAI format; `ConnTrackingServer` lets stop() end idle
keep-alive connections too.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from plugins.deployers.openai_wire import FAULT_TYPES, ApiError, field_value, usage_of
from stratosd.errors import StratosError

if TYPE_CHECKING:
    from plugins.deployers.http_builtin import OpenAIServer

log = structlog.stdlib.get_logger(__name__)


class ConnTrackingServer(ThreadingHTTPServer):
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


class Handler(BaseHTTPRequestHandler):
    """OpenAI routes over `app`; every error is an OpenAI-shaped JSON reply."""

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
        ids = field_value(body, "return_token_ids", bool, False)
        if field_value(body, "stream", bool, False):
            self._stream(app.encode(prompt.text, prompt.add_special_tokens), opts, "chatcmpl",
                         body)
            return
        out = app.generate([prompt.text], opts, add_special_tokens=prompt.add_special_tokens)[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]},
                  "finish_reason": out["finish_reason"], "logprobs": None}
        extra: dict[str, Any] = {}
        if ids:  # vLLM's extension: prompt ids on the response, generated ids per choice
            choice["token_ids"] = out["token_ids"]
            extra["prompt_token_ids"] = out["prompt_token_ids"]
        self._json(200, {**self._envelope("chatcmpl"), "object": "chat.completion",
                         "choices": [choice], "usage": usage_of([out]), **extra})

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
        ids = field_value(body, "return_token_ids", bool, False)
        if field_value(body, "stream", bool, False):
            if len(prompts) != 1:
                raise ApiError(400, "`stream` needs a single prompt", param="stream")
            # Raw text prompts get the tokenizer's special tokens, as vLLM gives them.
            self._stream(app.encode(prompts[0], True), opts, "cmpl", body)
            return
        outs = app.generate(prompts, opts)
        choices = []
        for i, o in enumerate(outs):
            choice = {"index": i, "text": o["text"], "finish_reason": o["finish_reason"],
                      "logprobs": None}
            if ids:
                choice.update(prompt_token_ids=o["prompt_token_ids"], token_ids=o["token_ids"])
            choices.append(choice)
        self._json(200, {**self._envelope("cmpl"), "object": "text_completion",
                         "choices": choices, "usage": usage_of(outs)})

    def _stream(self, prompt_ids: list[int], opts: Mapping[str, Any], kind: str,
                body: Mapping[str, Any]) -> None:
        chat = kind == "chatcmpl"
        env = {**self._envelope(kind), "object": "chat.completion.chunk" if chat
               else "text_completion"}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        # vLLM sends the prompt ids with the first chunk (generated ids are not streamed here).
        first_extra = ({"prompt_token_ids": prompt_ids}
                       if field_value(body, "return_token_ids", bool, False) else {})
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
        if chat or first_extra:
            send({**env, "choices": [choice("", None, first=True)], **first_extra})
        pieces = self.app.stream(prompt_ids, opts, usage, cancelled)
        try:
            for piece in pieces:
                send({**env, "choices": [choice(piece, None)]})
        finally:
            cancelled.set()  # a vanished client stops the generation early
            pieces.close()  # releases the generation lock now, not at garbage collection
        send({**env, "choices": [choice(None, usage.get("finish_reason", "stop"))],
              "usage": usage_of([usage])})
        if include_usage:
            send({**env, "choices": [], "usage": usage_of([usage])})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
