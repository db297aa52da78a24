"""One built-in server for every tenant: one base model, each tenant's tuned weights by name.

`MultiAdapterServer` is the built-in OpenAI-compatible server (`http_builtin.OpenAIServer`,
same HTTP layer and wire format) over one base model plus named variants: each variant is a
peft adapter directory or a full model directory of the same base (a tenant's merged model).
Only what differs from the base is kept per variant (the LoRA target modules' ΔW: a tenant's
training touches nothing else), so N tenants cost one base plus N sets of deltas. A request's
`model` picks the variant; generation is serialised anyway (one model on CPU or one GPU), and
under that lock the variant's weights are put in place: W = W_base + ΔW_name. `GET /v1/models`
lists every name. The base itself is served under `base_name` (the first name by default
when it is not given).

Run by hand: `python -m plugins.deployers.multi_adapter --base config:tiny
--adapter t1=/path/to/t1/model --adapter t2=/path/to/t2/adapter`.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Generator, Mapping
from typing import Any, ClassVar

import structlog

from plugins.deployers.http_builtin import OpenAIServer
from plugins.deployers.openai_http import Handler
from plugins.deployers.openai_wire import ApiError
from stratosd import hookimpl
from stratosd.api import DeployContext, Deployer
from stratosd.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)


class MultiHandler(Handler):
    """The built-in routes; /v1/models and /health list every served name."""

    app: ClassVar[MultiAdapterServer]

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        app = self.app
        path = self.path.rstrip("/")
        if path == "/health":
            self._json(200, {"status": "ok", "models": app.names()})
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "stratos",
                 "root": app.model_ref, "parent": None if n == app.base_name else app.base_name}
                for n in app.names()]})
        else:
            super().do_GET()


class MultiAdapterServer(OpenAIServer):
    """The built-in server over one base and named variants of it, routed by `model`."""

    def __init__(self, base: str, adapters: Mapping[str, str], *, base_name: str | None = None,
                 **kw: Any) -> None:
        if not adapters:
            raise ConfigError("no adapters to serve", hint="name at least one NAME=PATH",
                              field="params.adapters")
        self.base_name = base_name or base
        if self.base_name in adapters:
            raise ConfigError(f"adapter name {self.base_name!r} is the base's name",
                              hint="give the base another base_name", field="params.adapters")
        self.adapter_refs = dict(adapters)
        self._local = threading.local()
        super().__init__(base, served_name=self.base_name, **kw)
        self._gen_lock = threading.RLock()  # type: ignore[assignment]  # held across a swap
        self.deltas: dict[str, dict[str, Any]] = {}
        self._base_weights: dict[str, Any] = {}
        self._active = self.base_name

    # the name a reply carries is the one its request asked for
    @property
    def served_name(self) -> str:
        """The model name of the current request (the base's outside a request)."""
        return str(getattr(self._local, "name", self.base_name))

    @served_name.setter
    def served_name(self, value: str) -> None:
        self._local = getattr(self, "_local", threading.local())
        self._local.name = value

    def __enter__(self) -> MultiAdapterServer:
        self.start()
        return self

    def names(self) -> list[str]:
        """Every name this server answers to, the base first."""
        return [self.base_name, *sorted(self.adapter_refs)]

    handler_class = MultiHandler

    def load(self) -> None:
        """Load the base and every variant's deltas."""
        from plugins.models.hf import load_model

        self.model, self.tokenizer = load_model(self.model_ref, seed=self.seed)
        base = dict(self.model.named_parameters())
        for name, ref in sorted(self.adapter_refs.items()):
            variant, _tok = load_model(ref, seed=self.seed)
            merge = getattr(variant, "merge_and_unload", None)
            if callable(merge):  # a peft adapter: its ΔW merged into the base's weights
                variant = merge()
            deltas: dict[str, Any] = {}
            for pname, p in variant.named_parameters():
                b = base.get(pname)
                if b is None or tuple(b.shape) != tuple(p.shape):
                    raise ConfigError(f"adapter {name} ({ref}) is not a variant of "
                                      f"{self.model_ref}: parameter {pname} differs in shape",
                                      hint="serve only tenants on the same student together",
                                      field="params.adapters")
                d = p.detach().to(b.dtype) - b.detach()
                if bool(d.abs().max() > 0):
                    deltas[pname] = d
            self.deltas[name] = deltas
            log.info("adapter_loaded", adapter=name, ref=ref, changed_params=len(deltas))
            del variant
        self._base_weights = {p: base[p].detach().clone()
                              for p in {k for d in self.deltas.values() for k in d}}

    def check_model(self, body: Mapping[str, Any]) -> None:
        """400 without `model`, 404 for a name this server does not serve; else route."""
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "missing required field `model`", param="model")
        if name != self.base_name and name not in self.adapter_refs:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves "
                           f"{', '.join(f'`{n}`' for n in self.names())}", param="model",
                           code="model_not_found")
        self.served_name = name

    def _activate(self, name: str) -> None:
        """Put name's weights in place (the caller holds the generation lock)."""
        if name == self._active:
            return
        import torch

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for pname, base in self._base_weights.items():
                delta = self.deltas.get(name, {}).get(pname)
                params[pname].copy_(base if delta is None else base + delta)
        self._active = name

    def generate(self, prompts: list[str], opts: Mapping[str, Any], *,
                 add_special_tokens: bool = True) -> list[dict[str, Any]]:
        """The built-in generation, on the requested variant's weights."""
        with self._gen_lock:
            self._activate(self.served_name)
            return super().generate(prompts, opts, add_special_tokens=add_special_tokens)

    def stream(self, prompt_ids: list[int], opts: Mapping[str, Any], usage: dict[str, Any],
               cancelled: threading.Event) -> Generator[str, None, None]:
        """The built-in streaming, on the requested variant's weights."""
        with self._gen_lock:
            self._activate(self.served_name)
            yield from super().stream(prompt_ids, opts, usage, cancelled)


class MultiAdapterDeployer(Deployer):
    """Serves a base and every tenant's variant of it from one built-in server process."""

    name: ClassVar[str] = "builtin-multi"
    description: ClassVar[str] = ("built-in OpenAI-compatible server: one base, each tenant's "
                                  "adapter by name (params.adapters = {name: path})")

    def serve(self, ctx: DeployContext) -> None:
        """Start the server, self-check /health, report ready, serve until should_stop()."""
        adapters = ctx.params.get("adapters")
        if not isinstance(adapters, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in adapters.items()):
            raise ConfigError("builtin-multi needs params.adapters = {name: path}",
                              hint="name each tenant's model directory on this host",
                              field="params.adapters")
        server = MultiAdapterServer(
            ctx.model, adapters, base_name=ctx.served_name or None, host=ctx.host,
            port=ctx.port, seed=int(ctx.params.get("seed", 0)),
            max_new_tokens_cap=int(ctx.params.get("max_new_tokens_cap", 512)))
        # `model` is a name the server answers to (the deploy step's latency probe asks for
        # it); `served` lists them all
        server.serve_deployment(ctx, model=server.base_name, served=server.names())


@hookimpl
def stratos_deployers() -> list[type[Deployer]]:
    """The multi-adapter built-in server."""
    return [MultiAdapterDeployer]


def main(argv: list[str] | None = None) -> None:
    """Serve a base and named adapters by hand until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m plugins.deployers.multi_adapter")
    parser.add_argument("--base", required=True, help="the base model ref")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="a tenant's adapter or merged model (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    adapters = dict(a.split("=", 1) for a in args.adapter)
    server = MultiAdapterServer(args.base, adapters, host=args.host, port=args.port)
    server.serve_forever(f"serving {', '.join(server.names())}")


if __name__ == "__main__":
    main()
