"""A sweep without --address: always a new Ray of its own, listening on loopback only, and gone
within seconds of its driver, however the driver ended.

Real Ray processes throughout. Ray starts once per process, so each local Ray is started by
search.cluster.connect(None) in a subprocess (PROBE) that prints what it joined. Every process a
test starts carries TAILTUNE_TEST_MARK=<its own marker> (inherited by Ray's processes): that is
how the test finds them, and the only processes it ever signals. Ray's temp folder is the
test's own (RAY_TMPDIR), so the ray_current_cluster file of this machine is never read or
written.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from processes import marked as _marked

from search import ray_adapter
from search.reaper import MARKER_VARIABLE

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
# connect(None) in a process of its own; prints what it joined, then holds it until its stdin
# closes. Ray is imported after connect, as search/run.py does.
PROBE = """
import json, sys
from search.cluster import connect
resources = connect(None)
import ray
context = ray.get_runtime_context()
print(json.dumps({"resources": resources, "node_id": context.get_node_id(),
                  "gcs": context.gcs_address}), flush=True)
sys.stdin.read()
"""
GONE_WITHIN_S = 15.0
CONNECT_TIMEOUT_S = 90.0
AGENTS = ("DashboardAgent", "RuntimeEnvAgent")


# ---------------------------------------------------------------- helpers
@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """Ray's temp folder for this test: short (Ray's socket paths must fit 107 bytes), never
    the machine's /tmp/ray."""
    folder = Path(tempfile.mkdtemp(prefix="ttray-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _env(marker: str, ray_tmp: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no test-wide loopback switch (conftest sets it), no RAY_ADDRESS."""
    env = {key: value for key, value in os.environ.items()
           if key not in (ray_adapter.CLUSTER_SWITCH, "RAY_ADDRESS", MARKER_VARIABLE)}
    env.update(RAY_TMPDIR=str(ray_tmp), TAILTUNE_TEST_MARK=marker, RAY_USAGE_STATS_ENABLED="0")
    env.update(extra)
    return env


def _kill_marked(marker: str, session: int | None = None) -> None:
    """SIGTERM, then SIGKILL, to this test's processes only (never a bare `ray stop`)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _marked(marker, session):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while _marked(marker, session) and time.monotonic() < deadline:
            time.sleep(0.1)


def _poll(condition: Callable[[], object], timeout: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def _gone(marker: str, session: int | None = None) -> dict[int, str]:
    """What is left of the marker's processes GONE_WITHIN_S from now ({} when none)."""
    deadline = time.monotonic() + GONE_WITHIN_S
    left = _marked(marker, session)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _marked(marker, session)
    return left


@dataclass
class Probe:
    proc: subprocess.Popen
    joined: dict  # what connect(None) joined: resources, node_id, gcs
    left: dict[int, str] | None = None  # what was alive GONE_WITHIN_S after the probe ended


@contextlib.contextmanager
def _local_ray(env: dict[str, str], log: Path) -> Iterator[Probe]:
    """A probe that ran connect(None). Leaving the block closes its stdin (a normal end, or
    nothing if it was killed), records what of it is left after that, and kills the rest."""
    marker = env["TAILTUNE_TEST_MARK"]
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True)
    try:
        # Bounded: a connect that tries to join a head that is gone retries for minutes.
        ready, _, _ = select.select([proc.stdout], [], [], CONNECT_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        if not line:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
            pytest.fail(f"connect(None) gave no answer within {CONNECT_TIMEOUT_S:g} s (exit "
                        f"{proc.returncode}):\n{log.read_text()[-3000:]}")
        probe = Probe(proc, json.loads(line))
        yield probe
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.wait(timeout=60)
        probe.left = _gone(marker, proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_marked(marker, proc.pid)


def _agents_started(marker: str, session: int) -> bool:
    commands = " ".join(_marked(marker, session).values())
    return all(agent in commands for agent in AGENTS)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(marker: str, session: int) -> list[tuple[str, int, str]]:
    """(address, port, command) of every TCP socket in LISTEN state that a marked process
    holds: its socket inodes (/proc/<pid>/fd -> socket:[inode]) looked up in /proc/net/tcp*."""
    owners = {}
    for pid, command in _marked(marker, session).items():
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        owners.update({link[8:-1]: command for link in links if link.startswith("socket:[")})
    found = []
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in owners:  # 0A: LISTEN
                host, port = fields[1].split(":")
                found.append((str(_address(host)), int(port, 16), owners[fields[9]][:60]))
    return found


def _address(hex_host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp* print an address as 32-bit words in the machine's byte order."""
    raw = bytes.fromhex(hex_host)
    words = [raw[i:i + 4] for i in range(0, len(raw), 4)]
    if sys.byteorder == "little":
        words = [word[::-1] for word in words]
    address = ipaddress.ip_address(b"".join(words))
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
    return mapped or address


# ---------------------------------------------------------------- the adapter
def test_the_ray_internals_the_adapter_relies_on_still_behave(ray_tmp: Path,
                                                              monkeypatch) -> None:
    # If this fails, Ray changed a private internal tailtune uses: update search/ray_adapter.py.
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_adapter.canonical_address("10.1.2.3:6379") == "10.1.2.3:6379", \
        "canonicalize_bootstrap_address no longer returns a HOST:PORT unchanged"
    host, _, port = ray_adapter.canonical_address("127.0.0.1:6379").rpartition(":")
    assert port == "6379" and ipaddress.ip_address(host), \
        "canonicalize_bootstrap_address no longer resolves a loopback HOST:PORT to an address"
    assert ray_adapter.canonical_address("local") is None, \
        "canonicalize_bootstrap_address('local') no longer means: start a new Ray"
    with pytest.raises(ValueError):
        ray_adapter.canonical_address("head-without-port")
    # auto: RAY_ADDRESS first, then the file `ray start` leaves in Ray's temp folder, then
    # (Ray's legacy) any Ray running on this machine, other tests' included; with none of them,
    # ConnectionError (search.environment says "no Ray cluster found").
    monkeypatch.setenv("RAY_ADDRESS", "10.9.8.7:1234")
    assert ray_adapter.canonical_address("auto") == "10.9.8.7:1234", \
        "canonicalize_bootstrap_address('auto') no longer reads RAY_ADDRESS"
    monkeypatch.delenv("RAY_ADDRESS")
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("10.78.0.1:6391")
    assert ray_adapter.canonical_address(None) == "10.78.0.1:6391", \
        "canonicalize_bootstrap_address no longer reads ray_current_cluster"
    found = ray_adapter.canonical_address("auto")
    assert found == "10.78.0.1:6391" or _gcs_running(), \
        f"canonicalize_bootstrap_address('auto') found {found!r}, not ray_current_cluster"
    (ray_tmp / "ray" / "ray_current_cluster").unlink()
    try:
        found = ray_adapter.canonical_address("auto")
    except ConnectionError:
        found = None
    assert found is None or _gcs_running(), \
        f"canonicalize_bootstrap_address('auto') found {found!r} with no Ray to find"

    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    with ray_adapter.loopback_node() as loopback:
        assert loopback == "127.0.0.1"
        assert os.environ[ray_adapter.CLUSTER_SWITCH] == "0"
        from ray._private.services import resolve_ip_for_localhost

        assert resolve_ip_for_localhost(loopback) == loopback, \
            "with ENABLE_RAY_CLUSTER off, Ray no longer keeps a loopback node address"
    assert ray_constants.ENABLE_RAY_CLUSTER == before


def _gcs_running() -> bool:
    """Some Ray runs on this machine (another test's, another user's)."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and b"gcs_server" in (proc / "cmdline").read_bytes():
                return True
    return False


# ---------------------------------------------------------------- what the driver prints
# A task's error that nobody fetched, in a driver after connect(None) and then with Ray's own
# default (the control: that the probe provokes the message at all).
DROPPED_ERROR = """
import gc, os, sys, time
from search.cluster import connect
connect(None)
import ray

@ray.remote
def fail():
    raise ZeroDivisionError("dropped on purpose")

def drop():
    ref = fail.remote()
    time.sleep(2)  # finished, never fetched (ray.wait would count as fetching)
    del ref
    gc.collect()
    time.sleep(2)

drop()
print("-- RAY DEFAULT --", file=sys.stderr, flush=True)
os.environ.pop("RAY_IGNORE_UNHANDLED_ERRORS", None)
drop()
ray.shutdown()
"""


def test_a_trial_error_tune_dropped_prints_no_worker_traceback(ray_tmp: Path) -> None:
    # What a sweep stopped early (the disk is full) left on its stderr: a page of worker
    # traceback for each trial future Tune had not fetched, after the one-line reason.
    marker = uuid.uuid4().hex
    try:
        done = subprocess.run([sys.executable, "-c", DROPPED_ERROR], cwd=REPO, text=True,
                              env=_env(marker, ray_tmp), capture_output=True, timeout=180,
                              start_new_session=True)
    finally:
        _kill_marked(marker)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, _, default = done.stderr.partition("-- RAY DEFAULT --")
    assert "Unhandled error" in default and "dropped on purpose" in default, \
        f"the probe no longer provokes Ray's unhandled-error message:\n{done.stderr[-3000:]}"
    assert "dropped on purpose" not in ours and "Traceback" not in ours, ours[-3000:]


# ---------------------------------------------------------------- always a Ray of its own
def test_a_local_connect_ignores_a_stale_ray_current_cluster(ray_tmp: Path,
                                                             tmp_path: Path) -> None:
    # What an unclean `ray stop` (or a crashed head) leaves: the file names a head that is gone.
    dead = f"127.0.0.1:{_free_port()}"
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    log = tmp_path / "probe.log"
    with _local_ray(_env(uuid.uuid4().hex, ray_tmp), log) as probe:
        assert probe.joined["gcs"] != dead and probe.joined["resources"]["CPU"] >= 1
    assert probe.proc.returncode == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    # A normal end after ray.shutdown(): nothing left, the reaper included.
    assert probe.left == {}


def test_a_local_connect_never_joins_a_running_cluster(ray_tmp: Path, tmp_path: Path) -> None:
    port, token = _free_port(), uuid.uuid4().hex
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}  # a user with a token set up
    cluster_marker = uuid.uuid4().hex
    # The cluster stays on loopback too (the switch a single-node `ray start` accepts).
    cluster_env = _env(cluster_marker, ray_tmp, **auth, **{ray_adapter.CLUSTER_SWITCH: "0"})
    log = tmp_path / "ray-start.log"
    with log.open("w") as out:  # in a session of its own: how its daemons are found
        starter = subprocess.Popen(
            [str(RAY), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
             "--num-cpus", "1", "--resources", '{"tailtune_test_cluster": 1}',
             "--include-dashboard", "false", "--disable-usage-stats"],
            env=cluster_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert starter.wait(timeout=120) == 0, log.read_text()[-3000:]
        head = f"127.0.0.1:{port}"
        # `ray start` recorded it where ray.init() without an address looks first.
        assert (ray_tmp / "ray" / "ray_current_cluster").read_text().strip() == head
        # The switch as tests set it (conftest): without it, Ray before this fix turned the
        # recorded 127.0.0.1 into this machine's outward address and hung instead of joining.
        switch = {ray_adapter.CLUSTER_SWITCH: "0"}
        for extra in ({}, {"RAY_ADDRESS": head}):
            with _local_ray(_env(uuid.uuid4().hex, ray_tmp, **auth, **switch, **extra),
                            tmp_path / f"probe-{len(extra)}.log") as probe:
                joined = probe.joined
                assert joined["gcs"] != head, f"joined the running cluster ({extra or 'file'})"
                assert "tailtune_test_cluster" not in joined["resources"], joined["resources"]
            assert probe.left == {}
        cluster = _marked(cluster_marker, starter.pid).values()
        assert any("gcs_server" in command for command in cluster), \
            "the local sweep's end took the cluster down"
    finally:
        if starter.poll() is None:
            starter.kill()
        _kill_marked(cluster_marker, starter.pid)


# ---------------------------------------------------------------- loopback only
def test_a_local_ray_listens_on_loopback_only(ray_tmp: Path, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    with _local_ray(_env(marker, ray_tmp), tmp_path / "probe.log") as probe:
        joined = probe.joined
        session = probe.proc.pid
        _poll(lambda: _agents_started(marker, session), 60, "Ray's agents to start")
        # The runtime-env agent is the last to open its port.
        _poll(lambda: any("RuntimeEnvAgent" in command or "runtime_env" in command
                          for *_, command in _listening(marker, session)), 30,
              "the runtime-env agent to listen")
        listening = _listening(marker, session)
        gcs_port = int(joined["gcs"].rpartition(":")[2])
        assert gcs_port in {port for _, port, _ in listening}, listening
        exposed = [s for s in listening if not ipaddress.ip_address(s[0]).is_loopback]
        assert exposed == [], f"listening beyond loopback: {exposed}"
        assert joined["gcs"].startswith("127.0.0.1:")


# ---------------------------------------------------------------- nothing outlives the driver
def test_nothing_of_a_local_sweep_outlives_its_driver_killed_with_sigkill(
        ray_tmp: Path, tmp_path: Path) -> None:
    storage, marker, log = tmp_path / "runs", uuid.uuid4().hex, tmp_path / "sweep.log"
    command = [sys.executable, "search/run.py", "--space", "ce", "--epochs", "6",
               "--num-samples", "2", "--storage", str(storage), "--name", "x", "--no-plots"]
    with log.open("w") as out:
        driver = subprocess.Popen(command, cwd=REPO, env=_env(marker, ray_tmp), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def trial_running() -> bool:
            if driver.poll() is not None:
                pytest.fail(f"the sweep ended (exit {driver.returncode}) before the kill:\n"
                            f"{log.read_text()[-3000:]}")
            return (_agents_started(marker, driver.pid)
                    and re.search(r"trial \S+ started", log.read_text()))

        _poll(trial_running, 240, "a trial to start")
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, not its process group
        driver.wait(timeout=30)
        left = _gone(marker, driver.pid)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        _kill_marked(marker, driver.pid)
    assert left == {}, f"alive {GONE_WITHIN_S:g} s after the driver's SIGKILL: {left}"


def test_the_reaper_ends_only_its_own_ray(ray_tmp: Path, tmp_path: Path) -> None:
    # Two local sweeps on one machine: killing one driver must not touch the other's Ray.
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    with _local_ray(_env(second, ray_tmp), tmp_path / "second.log") as other:
        with _local_ray(_env(first, ray_tmp), tmp_path / "first.log") as killed:
            _poll(lambda: (_agents_started(first, killed.proc.pid)
                           and _agents_started(second, other.proc.pid)), 60,
                  "both Rays' agents to start")
            before = {pid: command for pid, command in _marked(second, other.proc.pid).items()
                      if "IDLE" not in command}  # idle workers come and go
            os.kill(killed.proc.pid, signal.SIGKILL)
            killed.proc.wait(timeout=30)
        assert killed.left == {}, f"alive {GONE_WITHIN_S:g} s after the SIGKILL: {killed.left}"
        assert other.proc.poll() is None
        lost = set(before) - set(_marked(second, other.proc.pid))
        assert not lost, f"the other sweep's Ray lost {[before[pid] for pid in lost]}"
    assert other.left == {}
