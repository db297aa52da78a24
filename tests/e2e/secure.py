"""Helpers for the bus-security tests: generated credentials and raw clients per identity.

`stratosctl auth init` writes the nats-server config and one password file per identity;
`Creds` points clients at it, `client()` connects as one identity and records the server's
permission errors (how nats reports a denied publish or subscribe).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import nats

from stratosd.auth import SERVER_CONFIG, agent_user
from stratosd.bus import Bus
from stratosd.config import StratosConfig

OPERATOR = "alice"


def server_config(auth_out: Path, dest_dir: Path) -> Path:
    """The generated nats-server.conf copied into dest_dir, JetStream stored in dest_dir/store.

    NatsServer passes no -sd with a config file, so the store dir must be in the file: each
    test gets its own, or a run left in one test's KV would be resumed by a later daemon
    (a bare `jetstream: enabled` would share nats-server's default /tmp/nats across tests).
    """
    store = json.dumps(str(dest_dir / "store"))
    text, n = re.subn(r"(?m)^jetstream \{.*\}$", f"jetstream {{ store_dir: {store} }}",
                      (auth_out / SERVER_CONFIG).read_text(), count=1)
    assert n == 1, "auth init wrote no `jetstream { store_dir }` line"
    conf = dest_dir / SERVER_CONFIG
    conf.write_text(text)
    return conf


class Creds:
    """The directory auth init wrote, and configs for each identity."""

    def __init__(self, out: Path, url: str = "") -> None:
        self.out = out
        self.url = url

    def password(self, user: str) -> str:
        """The plain password of user."""
        return (self.out / f"{user}.password").read_text().strip()

    def config(self, user: str, **kw: Any) -> StratosConfig:
        """A client config logging in as user (password from its 0600 file)."""
        return StratosConfig(nats_url=self.url, nats_user=user,
                             nats_password_file=str(self.out / f"{user}.password"), **kw)

    def agent_kw(self, agent_id: str) -> dict[str, Any]:
        """Extra AgentConfig fields for start_agent."""
        user = agent_user(agent_id)
        return {"nats_user": user, "nats_password_file": str(self.out / f"{user}.password")}


def auth_init(out: Path, *extra: str) -> int:
    """Run `stratosctl auth init` in-process."""
    from stratosd.ctl import main

    return main(["auth", "init", "--out", str(out), "--agents", "gpu-1,gpu-2",
                 "--operator", OPERATOR, *extra])


class Client:
    """A raw connection as one identity that records the server's permission errors."""

    def __init__(self, bus: Bus, errors: list[str]) -> None:
        self.bus = bus
        self.errors = errors

    async def violation(self, text: str) -> None:
        """Wait until the server reported a permissions violation mentioning text."""
        try:
            await self._violation(text)
        except TimeoutError:
            raise AssertionError(f"no violation for {text!r} in {self.errors}") from None

    async def _violation(self, text: str) -> None:
        await until(lambda: any("permissions violation" in e.lower() and text.lower() in e.lower()
                                 for e in self.errors))


async def client(creds: Creds, user: str) -> Client:
    """Connect as user, collecting async errors (how nats reports denied publish/subscribe)."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(creds.url, user=user, password=creds.password(user),
                            error_cb=on_error, max_reconnect_attempts=0)
    return Client(Bus(nc), errors)


async def until(pred: Any, timeout: float = 10.0) -> None:
    async def loop() -> None:
        while not pred():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(loop(), timeout)


def password_of(out: Path, user: str) -> str:
    """A password from an auth init directory."""
    return (out / f"{user}.password").read_text().strip()
