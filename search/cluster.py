"""Connecting to Ray and fitting trials to what the cluster has.

Trials that ask for GPUs on a cluster without any would wait forever; asking for them there is
refused up front, and the default GPU share is 0 without GPUs (the trial runs on the CPU).

A local Ray (no --address) is always a new instance of the sweep's own, never one found on the
machine (RAY_ADDRESS, or the file a `ray start` left in Ray's temp folder, even one whose cluster
is gone). It listens on 127.0.0.1 only, is started lean (no dashboard; token authentication on
with a token for this run alone unless the user configured one: Ray otherwise warns on every
start and writes ~/.ray/auth_token), and a watchdog process (search/reaper.py) ends it when the
driver ends, SIGKILL included. A cluster (--address) is joined with the user's own Ray settings;
ray.init's failures there become one-line SetupErrors.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from search import reaper
from search.environment import SetupError, check_address
from search.options import SweepOptions, UsageError
from search.ray_adapter import loopback_node

AUTH_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


# Members of a fused trial on a GPU when --fuse is not given: a CIFAR ResNet-32 at batch 128
# leaves a GPU mostly idle; a CPU gains nothing from more than it has cores (so: unfused).
GPU_FUSE = 8


@dataclass(frozen=True)
class TrialResources:
    cpus: float
    gpus: float
    max_concurrent: int  # Tune trials at once (a fused one trains `fuse` members)
    fuse: int = 1
    # CPUs of a fused Tune trial (a group of members); an unfused trial asks for `cpus`
    fused_cpus: float | None = None

    def cpus_for(self, fused: bool) -> float:
        return self.fused_cpus if fused and self.fused_cpus is not None else self.cpus


def check_local_gpus(options: SweepOptions) -> None:
    """Refuse GPUs on a machine without, before paying for a Ray start (a local Ray sees the
    same devices as torch: both honour CUDA_VISIBLE_DEVICES)."""
    if options.address is not None or not options.gpus_per_trial:
        return
    import torch

    if torch.cuda.device_count() == 0:
        raise UsageError(_no_gpu(options.gpus_per_trial, "this machine"))


def _no_gpu(gpus: float, where: str) -> str:
    return (f"--gpus-per-trial {gpus:g} asked for, but {where} has no GPU; "
            "accepted here: 0 (trials run on the CPU)")


def local_auth_settings(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a local Ray the sweep starts: token authentication, silently.

    Settings the user made (RAY_AUTH_MODE, a token or token file) are kept. Otherwise the token
    is made for this run only and handed to Ray's processes through the environment.
    """
    environ = os.environ if environ is None else environ
    if "RAY_AUTH_MODE" in environ:
        return {}
    settings = {"RAY_AUTH_MODE": "token"}
    has_token = any(environ.get(name) for name in AUTH_VARIABLES) or (
        Path.home() / ".ray" / "auth_token").exists()
    if not has_token:
        settings["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return settings


def connect(address: str | None) -> dict[str, float]:
    """Start a local Ray (address None) or join a cluster; returns its total resources.

    Raises SetupError when no cluster answers at `address` or it refuses this driver.
    """
    # Ray's new console output ignores verbose=0; the sweep prints its own progress.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A trial's error reaches the user through Tune (its ledger entry, the sweep's one-line
    # reason). The futures Tune drops when it stops a sweep early (the disk is full) would print
    # the same error again, as a worker traceback, whenever the driver collects them. Ray only
    # asks whether the variable exists.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if address is None and "ray" not in sys.modules:  # Ray reads these once, at import
        os.environ.update(local_auth_settings())
    import ray

    if ray.is_initialized():
        return dict(ray.cluster_resources())
    if address is None:
        return _start_local(ray)
    head = check_address(address)
    with _stderr_kept() as kept:  # Ray's core logs each failed attempt: a page, not a line
        try:
            ray.init(address=head, log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=True)
        except Exception as exc:  # ConnectionError, AuthenticationError, version mismatch
            kept.discard = True
            raise SetupError(_refusal(address, head, exc)) from None
    return dict(ray.cluster_resources())


def _start_local(ray) -> dict[str, float]:
    """A new Ray for this driver alone, on 127.0.0.1, ended by a reaper when the driver ends."""
    # A signal to the whole process group (a scheduler ending the job) ends this Ray with
    # the driver: without its GCS the driver would wait 60 s before giving up.
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "10")
    # address="local" starts a new instance whatever RAY_ADDRESS or ray_current_cluster say;
    # RAY_ADDRESS is dropped too, so that no process of this Ray reads it.
    os.environ.pop("RAY_ADDRESS", None)
    # Before ray.init: the marker goes into the environment Ray's processes get, the folder
    # becomes this Ray's own temp folder (how the reaper tells its processes from others').
    _, folder = reaper.watch()
    try:
        with loopback_node() as loopback:
            ray.init(address="local", _node_ip_address=loopback, _temp_dir=folder,
                     include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, configure_logging=True)
        node_ip = ray.util.get_node_ip_address()
        if node_ip != loopback:  # Ray changed how it picks the node address: refuse to listen
            ray.shutdown()
            raise SetupError(f"the local Ray took {node_ip} as its address, not {loopback}; "
                             "a local sweep listens on loopback only (see search/ray_adapter.py)")
    except BaseException:
        reaper.release()  # the reaper ends whatever of this Ray had started
        raise
    return dict(ray.cluster_resources())


class _Kept:
    discard = False


@contextlib.contextmanager
def _stderr_kept() -> Iterator[_Kept]:
    """Hold what is written to file descriptor 2 (Ray's C++ core writes there directly) and
    pass it on at the end, unless told to discard it."""
    kept = _Kept()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold
        yield kept
        return
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        os.dup2(held.fileno(), 2)
        try:
            yield kept
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not kept.discard:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))
                sys.stderr.flush()


def _refusal(address: str, head: str, exc: BaseException) -> str:
    """One line for a cluster that answered but refused this driver (Ray's own message is
    'Failed to connect'; the reason is down its exception chain)."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = " ".join(chain).lower()
    if "invalidauthtoken" in text or "authentication" in text:
        return (f"--address {address}: the Ray cluster at {head} refused this driver's "
                "authentication token; accepted: RAY_AUTH_MODE=token with the cluster's token "
                "in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (see docs/cluster.md)")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return (f"--address {address}: the Ray cluster at {head} refused this driver ({first}); "
            "accepted: a cluster of the same Ray version (2.60) that this machine can join")


def fit_resources(options: SweepOptions, cluster: dict[str, float],
                  fusable: bool = True) -> TrialResources:
    """Per-trial CPUs/GPUs, concurrency and members per fused trial (`--fuse`, else GPU_FUSE
    where the trials share the GPUs and can be fused: a user who packs trials by
    --gpus-per-trial asked for separate processes); UsageError when the cluster cannot run a
    trial."""
    cluster_cpus = cluster.get("CPU", 0.0)
    cluster_gpus = cluster.get("GPU", 0.0)
    if options.cpus_per_trial > cluster_cpus:
        raise UsageError(f"--cpus-per-trial {options.cpus_per_trial:g} is more than the "
                         f"{cluster_cpus:g} CPUs of the Ray cluster; "
                         f"accepted: up to {cluster_cpus:g}")
    by_cpu = max(1, int(cluster_cpus // options.cpus_per_trial))
    gpus = options.gpus_per_trial
    if gpus is not None and gpus > 0 and cluster_gpus == 0:
        raise UsageError(_no_gpu(gpus, "the Ray cluster"))
    if gpus is not None and gpus > cluster_gpus:
        raise UsageError(f"--gpus-per-trial {gpus:g} is more than the {cluster_gpus:g} GPUs of "
                         f"the Ray cluster; accepted: up to {cluster_gpus:g}")
    auto = GPU_FUSE if fusable and gpus is None and cluster_gpus else 1
    fuse = options.fuse or auto
    # fused or not, a trial per CPU: fused groups that fall apart (members of another shape,
    # or that cannot be fused) become more, smaller Tune trials
    wanted = options.max_concurrent or min(options.num_samples, by_cpu)
    if gpus is None:  # share the cluster's GPUs between the concurrent trials
        gpus = 0.0 if cluster_gpus == 0 else min(1.0, cluster_gpus / wanted)
        gpus = math.floor(gpus * 100) / 100  # Ray takes GPU shares in hundredths
    limit = by_cpu if gpus == 0 else min(by_cpu, int(cluster_gpus // gpus))
    return TrialResources(cpus=options.cpus_per_trial, gpus=gpus,
                          max_concurrent=max(1, min(wanted, limit)), fuse=fuse,
                          fused_cpus=_fused_cpus(options, fuse, by_cpu, gpus))


def _fused_cpus(options: SweepOptions, fuse: int, by_cpu: int, gpus: float) -> float | None:
    """CPUs of one fused group on CPUs alone: the trial slots its members would have taken,
    up to an equal share of the cluster between the groups that run at once. One group of 8
    on 2 cores then trains with both (one slot each, it would leave a core idle); on a GPU the
    device does the work and a group keeps one trial's CPUs."""
    if fuse <= 1 or gpus:
        return None
    groups = -(-options.num_samples // fuse)  # ceil
    at_once = max(1, min(groups, by_cpu, options.max_concurrent or by_cpu))
    members = min(fuse, options.num_samples)
    return options.cpus_per_trial * max(1, min(members, by_cpu // at_once))
