"""Shared by the teacher backends: price table, token/cost accounting, retry policy, params.

Prices are list prices in USD per million tokens, good enough for a budget estimate; a job
overrides them per teacher with `price_in_per_mtok` / `price_out_per_mtok`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stratosd.api import Generation, TeacherRequest
from stratosd.errors import ConfigError

T = TypeVar("T")

# (input, output) USD per million tokens; matched by longest prefix of the model name.
PRICES_USD_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "deepseek-chat": (0.27, 1.10),
    "deepseek-reasoner": (0.55, 2.19),
}


def price_for(model: str, params: Mapping[str, Any] | None = None) -> tuple[float, float]:
    """(input, output) USD per Mtok: params override, else the table, else (0, 0) (self-hosted)."""
    params = params or {}
    name = model.rsplit("/", 1)[-1].lower()
    base = (0.0, 0.0)
    for prefix in sorted(PRICES_USD_PER_MTOK, key=len, reverse=True):
        if name.startswith(prefix):
            base = PRICES_USD_PER_MTOK[prefix]
            break
    p_in = param(params, "price_in_per_mtok", float, base[0], minimum=0.0)
    p_out = param(params, "price_out_per_mtok", float, base[1], minimum=0.0)
    return p_in, p_out


def cost_usd(prompt_tokens: int, completion_tokens: int, price: tuple[float, float]) -> float:
    """Cost of one call from its token counts."""
    return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6


def param(
    params: Mapping[str, Any],
    name: str,
    kind: type[T],
    default: T,
    *,
    minimum: float | None = None,
) -> T:
    """A typed teacher param; ConfigError names `teacher.params.<name>` when it is wrong."""
    value = params.get(name, default)
    if value is None:
        return default
    try:
        bad = kind is bool and not isinstance(value, bool)
        out = kind(value) if not bad else None  # type: ignore[call-arg]
    except (TypeError, ValueError):
        bad = True
    if bad or out is None:
        raise ConfigError(
            f"teacher param {name}={value!r} is not a {kind.__name__}",
            hint=f"set {name} to a {kind.__name__} in the teacher's params",
            field=f"teacher.params.{name}",
        ) from None
    if minimum is not None and out < minimum:  # type: ignore[operator]
        raise ConfigError(
            f"teacher param {name}={value!r} is below {minimum}",
            hint=f"set {name} >= {minimum}",
            field=f"teacher.params.{name}",
        )
    return out


@dataclass
class TeacherStats:
    """What a backend has used so far: calls, retries, failures, tokens, cost."""

    requests: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, gen: Generation) -> None:
        """Count one finished request."""
        self.requests += 1
        self.failures += gen.error is not None
        self.prompt_tokens += gen.prompt_tokens
        self.completion_tokens += gen.completion_tokens
        self.cost_usd += gen.cost_usd


# --- retries -----------------------------------------------------------------------------

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})


def retryable_status(status: int) -> bool:
    """429 and 5xx (plus 408/409/425) are transient; any other 4xx is the request's fault."""
    return status in RETRYABLE_STATUS or status >= 500


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), None when absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter; a server's Retry-After wins (capped at max_s)."""

    max_retries: int = 5
    base_s: float = 0.5
    max_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number attempt+1 (attempt counts from 0)."""
        if retry_after is not None:
            return min(retry_after, self.max_s)
        ceiling = min(self.max_s, self.base_s * 2.0**attempt)
        # "Equal jitter": at least half the ceiling, so a burst of 429s spreads out.
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)


# --- micro-batching (local backends) ------------------------------------------------------


@dataclass
class _Item:
    request: TeacherRequest
    key: tuple[int, float]
    seed: int | None
    future: asyncio.Future[Generation]


BatchFn = Callable[[list[TeacherRequest], int, float, int | None], Awaitable[list[Generation]]]


class MicroBatcher:
    """Gathers concurrent generate() calls into batches of up to batch_size for a local model.

    Requests with the same (max_new_tokens, temperature) share a batch; one batch runs at a
    time, so many small concurrent calls (one per example) still fill the model's batch.
    """

    def __init__(self, run_batch: BatchFn, batch_size: int, linger_s: float = 0.005) -> None:
        self._run_batch = run_batch
        self.batch_size = batch_size
        self.linger_s = linger_s
        self._pending: list[_Item] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(
        self,
        requests: Sequence[TeacherRequest],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> list[Generation]:
        """Queue requests and wait for their generations (in order)."""
        loop = asyncio.get_running_loop()
        items = [
            _Item(r, (max_new_tokens, temperature), seed, loop.create_future()) for r in requests
        ]
        self._pending.extend(items)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return list(await asyncio.gather(*(i.future for i in items)))

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(self.linger_s)
            key = self._pending[0].key
            batch = [i for i in self._pending if i.key == key][: self.batch_size]
            taken = {id(i) for i in batch}
            self._pending = [i for i in self._pending if id(i) not in taken]
            try:
                gens = await self._run_batch(
                    [i.request for i in batch], key[0], key[1], batch[0].seed
                )
            except Exception as exc:  # noqa: BLE001 - every waiter gets the failure as a row
                gens = [Generation(text="", error=f"{type(exc).__name__}: {exc}")] * len(batch)
            for item, gen in zip(batch, gens, strict=True):
                if not item.future.done():
                    item.future.set_result(gen)
