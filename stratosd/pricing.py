"""Operator-set prices: what an agent costs is the operator's word, not the agent's.

`stratosctl auth add-agent ID --price-per-hour P` (or `auth init --price-per-hour P`) records
P in `agent-prices.json`, written beside the credentials. The daemon reads that file from the
directory of its own password file (`nats_password_file`, e.g. /etc/stratos/), so installing
it with `daemon.password` is all it takes; a changed file is picked up within RELOAD_S.
For an agent with an operator price, the price in its telemetry is ignored for offers,
selection and cost estimates, and a differing one is logged once per declared value
(`agent_price_overridden`); an agent without one keeps its declared price.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import structlog

from stratosd.config import StratosConfig

log = structlog.stdlib.get_logger(__name__)
PRICES_FILE = "agent-prices.json"
PRICE_KEY = "price_usd_per_hour"
RELOAD_S = 5.0  # how often the file's mtime is looked at


def prices_path(config: StratosConfig | None) -> Path | None:
    """Where the daemon finds the operator's prices: beside its password file."""
    if config is None or not config.nats_password_file:
        return None
    return Path(config.nats_password_file).expanduser().parent / PRICES_FILE


def read_prices(path: Path) -> dict[str, float]:
    """agent id → operator price from a prices file ({} when absent)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    out: dict[str, float] = {}
    for agent_id, entry in dict(data).items():
        price = entry.get(PRICE_KEY) if isinstance(entry, dict) else None
        if isinstance(price, int | float) and price >= 0:
            out[str(agent_id)] = float(price)
    return out


class OperatorPrices:
    """The prices file, re-read when it changes, and the once-per-value override warning."""

    def __init__(self, path: Path, reload_s: float = RELOAD_S) -> None:
        self.path = path
        self.reload_s = reload_s
        self.prices: dict[str, float] = {}
        self._mtime: float | None = None
        self._checked = float("-inf")
        self._warned: dict[str, float] = {}  # agent → the declared price last warned about

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_s:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            mtime = None
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            self.prices = read_prices(self.path) if mtime is not None else {}
        except (OSError, ValueError, AttributeError):
            log.error("operator_prices_unreadable", path=str(self.path), exc_info=True)
            return  # keep the prices read before
        self._warned.clear()
        log.info("operator_prices_loaded", path=str(self.path), agents=len(self.prices))

    def price(self, agent_id: str, declared: float) -> float:
        """The operator's price for agent_id, else the one it declared."""
        self._refresh()
        set_price = self.prices.get(agent_id)
        if set_price is None:
            return declared
        if declared != set_price and self._warned.get(agent_id) != declared:
            self._warned[agent_id] = declared
            log.warning("agent_price_overridden", agent_id=agent_id,
                        declared_usd_per_hour=declared, price_usd_per_hour=set_price,
                        hint=f"the operator set this agent's price in {self.path}; the price "
                        "in its telemetry is ignored")
        return set_price


_tables: dict[str, OperatorPrices] = {}


def agent_price(config: StratosConfig | None, agent_id: str, declared: float) -> float:
    """The price an agent's offer carries: the operator's, else its telemetry's."""
    key = config.nats_password_file if config is not None else None
    if not key:
        return declared
    table = _tables.get(key)
    if table is None:
        path = prices_path(config)
        if path is None:
            return declared
        table = _tables[key] = OperatorPrices(path)
    return table.price(agent_id, declared)
