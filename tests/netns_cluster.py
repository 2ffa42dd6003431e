"""A real multi-node Ray cluster on one machine, one network namespace per node.

Why namespaces: Ray on Linux binds to the machine's outward interface, and the loopback-only
setting tests use for single-node runs (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) refuses a
second node. Here every node gets its own namespace with its own address on a random private
/24, each worker joined to the head namespace by a veth pair (through a bridge there when
there are several workers), so the nodes talk to each other and to nothing else.

Every process is started by this module and stopped by it, by process id: never ``ray stop``,
which would end every Ray process on the machine. Needs root and iproute2's ``ip``.

Usage::

    with ray_netns_cluster(num_nodes=2) as cluster:
        done = cluster.run_in_head([cluster.python, "search/run.py", "--address", "auto", ...])
        ips_by_node_id = cluster.alive_nodes()

Drivers run inside the head namespace (`run_in_head`, `popen_in_head`) with `cluster.env`,
which names the head in RAY_ADDRESS, so `--address auto` and `--address cluster.head_address`
both reach this cluster and no other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv running the tests has `ray` beside python
RAY_BIN = str(VENV_BIN / "ray") if (VENV_BIN / "ray").exists() else (shutil.which("ray") or "ray")
HEAD_PORT = 6379
READY_LINE = "Ray runtime started."
LOG_TAIL_CHARS = 3000

# Environment variables that must not leak from the test process into the nodes: the first
# refuses a second node, the others would point a node or driver at another cluster or token.
_SCRUBBED_ENV = (
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_TMPDIR",
)

# Run by the head's driver to wait for the nodes and report them; prints one JSON line.
_NODES_SCRIPT = """
import json, sys, time
import ray
want, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
while True:
    alive = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print("NODES=" + json.dumps(alive))
"""


class ClusterError(RuntimeError):
    """The test cluster could not be set up; the message says which step and shows logs."""


def netns_available() -> tuple[bool, str]:
    """Whether this process can build namespace clusters, and if not, why (a skip reason)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root (euid is not 0)"
    if shutil.which("ip") is None:
        return False, "iproute2's `ip` is not installed (apt-get install -y iproute2)"
    probe = f"ttprobe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return False, f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


def _ip(*args: str) -> None:
    """Run one `ip` command; a failure names the command and ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _in_ns(ns: str, *args: str) -> None:
    _ip("netns", "exec", ns, "ip", *args)


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def namespace_pids(ns: str) -> list[int]:
    """Live process ids inside network namespace `ns` (empty once it is gone)."""
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    if done.returncode != 0:
        return []
    return [int(p) for p in done.stdout.split() if pid_alive(int(p))]


def list_namespaces() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


@dataclass
class ClusterNode:
    name: str  # "head" or "worker1", ...
    namespace: str
    ip: str
    log: Path
    proc: subprocess.Popen | None = None


@dataclass
class NetnsCluster:
    """A running cluster. Addresses are only reachable from inside its namespaces."""

    head_address: str
    nodes: list[ClusterNode]
    root: Path
    env: dict[str, str]  # what a driver needs: auth mode (and token path), RAY_ADDRESS
    python: str = str(VENV_BIN / "python")
    _extra: list[subprocess.Popen] = field(default_factory=list)

    @property
    def head_ip(self) -> str:
        return self.nodes[0].ip

    @property
    def head_namespace(self) -> str:
        return self.nodes[0].namespace

    @property
    def node_ips(self) -> list[str]:
        """Head first, then the workers."""
        return [node.ip for node in self.nodes]

    @property
    def namespaces(self) -> list[str]:
        return [node.namespace for node in self.nodes]

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        merged = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        merged.update(self.env)
        merged.update(env or {})
        return merged

    def run_in_head(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        timeout: float = 300,
        cwd: str | Path = REPO_ROOT,
        check: bool = False,
    ) -> subprocess.CompletedProcess:
        """Run `cmd` in the head namespace (repo root as cwd), capturing text output.

        The environment is the test's, minus Ray settings that could point elsewhere, plus
        `self.env` (so `ray.init(address="auto")` reaches this cluster), plus `env`.
        """
        return subprocess.run(
            ["ip", "netns", "exec", self.head_namespace, *cmd],
            env=self._env(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def popen_in_head(
        self,
        cmd: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path = REPO_ROOT,
    ) -> subprocess.Popen:
        """Start a background process (an mlflow server, a driver) in the head namespace.

        Its output goes to `log`; the cluster stops it at teardown if it still runs.
        """
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.head_namespace, *cmd],
                env=self._env(env),
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._extra.append(proc)
        return proc

    def kill_node(self, index: int) -> None:
        """SIGKILL node `index` (0 is the head) and everything in its namespace: a node crash."""
        node = self.nodes[index]
        if node.proc is not None:
            _signal_group(node.proc, signal.SIGKILL)
            node.proc.wait(timeout=10)
        _kill_namespace(node.namespace)

    def alive_nodes(self, want: int = 0, timeout: float = 60) -> dict[str, str]:
        """Node id (hex) -> node ip for the alive nodes, as the cluster itself reports them.

        With `want`, first waits (up to `timeout` seconds) until at least that many are alive.
        """
        done = self.run_in_head(
            [self.python, "-c", _NODES_SCRIPT, str(want), str(timeout)], timeout=timeout + 60
        )
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("NODES=")]
        if done.returncode != 0 or not lines:
            raise ClusterError(
                f"driver in {self.head_namespace} could not list nodes (exit "
                f"{done.returncode}):\n{done.stdout[-LOG_TAIL_CHARS:]}\n"
                f"{done.stderr[-LOG_TAIL_CHARS:]}"
            )
        return json.loads(lines[-1].removeprefix("NODES="))


def _make_network(nodes: list[ClusterNode]) -> None:
    """Namespaces with `lo` up, and one veth pair from each worker into the head namespace.

    Two nodes need nothing more: the head end of the pair carries the head's address. With
    more, the head ends join a bridge that carries it, so workers also reach each other. A
    lone head keeps its address on `lo`.
    """
    head, workers = nodes[0], nodes[1:]
    for node in nodes:
        _ip("netns", "add", node.namespace)
        _in_ns(node.namespace, "link", "set", "lo", "up")
    head_dev = {0: "lo", 1: "eth0"}.get(len(workers), "br0")
    if len(workers) > 1:
        _in_ns(head.namespace, "link", "add", "br0", "type", "bridge")
    for index, node in enumerate(workers, start=1):
        peer = head_dev if len(workers) == 1 else f"v{index}"
        # Created straight into the two namespaces, so no name ever lives in the root one.
        _ip("link", "add", "eth0", "netns", node.namespace, "type", "veth",
            "peer", "name", peer, "netns", head.namespace)  # fmt: skip
        if peer != head_dev:
            _in_ns(head.namespace, "link", "set", peer, "master", head_dev)
            _in_ns(head.namespace, "link", "set", peer, "up")
        _in_ns(node.namespace, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        _in_ns(node.namespace, "link", "set", "eth0", "up")
    _in_ns(head.namespace, "addr", "add", f"{head.ip}/24", "dev", head_dev)
    _in_ns(head.namespace, "link", "set", head_dev, "up")


def _start_node(node: ClusterNode, ray_args: list[str], env: dict[str, str]) -> None:
    with open(node.log, "ab") as out:
        node.proc = subprocess.Popen(
            ["ip", "netns", "exec", node.namespace, RAY_BIN, "start", *ray_args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so teardown can end all of it
        )


def _wait_ready(nodes: list[ClusterNode], timeout: float) -> None:
    """Wait until each node's `ray start` says it started; fail fast if one exits."""
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending:
        for node in list(pending):
            if READY_LINE in _tail(node.log, 100_000):
                pending.remove(node)
            elif node.proc is not None and node.proc.poll() is not None:
                raise ClusterError(
                    f"`ray start` for the {node.name} node ({node.ip} in {node.namespace}) "
                    f"exited with {node.proc.returncode}; log tail:\n{_tail(node.log)}"
                )
        if pending and time.monotonic() > deadline:
            node = pending[0]
            raise ClusterError(
                f"the {node.name} node ({node.ip} in {node.namespace}) did not start within "
                f"{timeout:.0f}s; log tail:\n{_tail(node.log)}"
            )
        time.sleep(0.2)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop(nodes: list[ClusterNode], extra: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every group we started, SIGKILL after `grace`, then whatever is left inside."""
    procs = [p for p in extra if p is not None] + [n.proc for n in reversed(nodes) if n.proc]
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)  # the group may outlive its leader
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    # Ray workers and helpers may have left the group (setsid); the namespace still holds them.
    for node in nodes:
        _kill_namespace(node.namespace)


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process inside `ns` until none is left (bounded: about 5 s)."""
    for _ in range(50):
        pids = namespace_pids(ns)
        if not pids:
            return
        logger.debug("killing %d leftover processes in %s", len(pids), ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _delete_network(nodes: list[ClusterNode]) -> None:
    """Delete the namespaces; the veths and the bridge go with them."""
    existing = list_namespaces()
    for node in nodes:
        if node.namespace in existing:
            subprocess.run(["ip", "netns", "del", node.namespace], capture_output=True)


def _plan(num_nodes: int, auth: str) -> tuple[NetnsCluster, dict[str, str]]:
    """Names, addresses, a fresh directory (and token); returns the cluster and the nodes' env."""
    tag = secrets.token_hex(3)
    subnet = f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}"
    root = Path(tempfile.mkdtemp(prefix=f"ttrc-{tag}-", dir="/tmp"))  # short: socket paths
    nodes = [
        ClusterNode(
            name="head" if i == 0 else f"worker{i}",
            namespace=f"ttray-{tag}-n{i}",
            ip=f"{subnet}.{i + 1}",
            log=root / f"node{i}.log",
        )
        for i in range(num_nodes)
    ]
    head_address = f"{nodes[0].ip}:{HEAD_PORT}"
    cluster_env = {"RAY_AUTH_MODE": auth, "RAY_ADDRESS": head_address}
    if auth == "token":
        token_path = root / "auth_token"
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
        cluster_env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    node_env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    node_env.update({k: v for k, v in cluster_env.items() if k != "RAY_ADDRESS"})
    node_env["RAY_USAGE_STATS_ENABLED"] = "0"
    # On SIGTERM a node otherwise drains for up to 30 s before stopping; a test has no use for it.
    node_env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    cluster = NetnsCluster(head_address=head_address, nodes=nodes, root=root, env=cluster_env)
    return cluster, node_env


def _start(
    cluster: NetnsCluster, node_env: dict[str, str], common: list[str], timeout: float
) -> None:
    """Network, head, workers; then check that the cluster reports every node alive."""
    head, workers = cluster.nodes[0], cluster.nodes[1:]
    _make_network(cluster.nodes)
    head_args = ["--head", "--node-ip-address", head.ip, "--port", str(HEAD_PORT),
                 "--include-dashboard=false", "--temp-dir", str(cluster.root / "n0")]  # fmt: skip
    _start_node(head, [*head_args, *common], node_env)
    _wait_ready([head], timeout)
    for i, node in enumerate(workers, start=1):
        worker_args = ["--address", cluster.head_address, "--node-ip-address", node.ip,
                       "--temp-dir", str(cluster.root / f"n{i}")]  # fmt: skip
        _start_node(node, [*worker_args, *common], node_env)
    _wait_ready(workers, timeout)
    alive = cluster.alive_nodes(want=len(cluster.nodes), timeout=timeout)
    if sorted(alive.values()) != sorted(cluster.node_ips):
        logs = "\n".join(f"--- {n.name}:\n{_tail(n.log)}" for n in cluster.nodes)
        raise ClusterError(
            f"expected alive nodes at {cluster.node_ips}, the cluster reports "
            f"{sorted(alive.values())}\n{logs}"
        )


@contextlib.contextmanager
def ray_netns_cluster(
    num_nodes: int = 2,
    cpus_per_node: int = 1,
    auth: str = "disabled",
    start_timeout: float = 120,
    grace: float = 5,
    keep_logs: bool = False,
    ray_args: Sequence[str] = (),
) -> Iterator[NetnsCluster]:
    """Start a Ray cluster of `num_nodes` nodes, each in its own network namespace.

    auth: "disabled" (RAY_AUTH_MODE=disabled on every node) or "token" (one random token,
    given to every node and to drivers through RAY_AUTH_TOKEN_PATH). `ray_args` are added to
    every node's `ray start` (e.g. ["--object-store-memory", "100000000"]). Logs and Ray temp
    dirs live under one fresh directory, removed at the end unless `keep_logs`.
    Raises ClusterError (after cleaning up) when a step fails.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes={num_nodes} is not allowed: use 1 or more")
    if auth not in ("disabled", "token"):
        raise ValueError(f"auth={auth!r} is not allowed: use 'disabled' or 'token'")
    cluster, node_env = _plan(num_nodes, auth)
    common = ["--num-cpus", str(cpus_per_node), "--num-gpus", "0", "--block",
              "--disable-usage-stats", *ray_args]  # fmt: skip
    began = time.monotonic()
    try:
        _start(cluster, node_env, common, start_timeout)
        logger.info("%d-node cluster up in %.1f s", num_nodes, time.monotonic() - began)
        yield cluster
    finally:
        began = time.monotonic()
        try:
            _stop(cluster.nodes, cluster._extra, grace)
        finally:
            _delete_network(cluster.nodes)
            if not keep_logs:
                shutil.rmtree(cluster.root, ignore_errors=True)
        logger.info("cluster torn down in %.1f s", time.monotonic() - began)
