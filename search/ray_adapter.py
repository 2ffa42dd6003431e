"""Every use of Ray's private internals (ray._private) in tailtune, in one place.

Ray 2.60 has no public API for two things the sweep needs:

- resolving `--address` (auto, RAY_ADDRESS, the file `ray start` leaves, HOST:PORT) to the
  head's host:port without connecting, so that a head that does not answer is refused in
  seconds instead of after ray.init's minutes of retries;
- keeping a local Ray on the loopback interface: ray.init(_node_ip_address="127.0.0.1") passes
  the address through services.resolve_ip_for_localhost, which replaces a loopback address by
  the machine's outward one unless Ray's single-machine switch is off (ENABLE_RAY_CLUSTER, read
  from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when Ray is imported).

Ray may change or drop these between versions: each use fails here with RayInternalsChanged,
which names what is missing, and tests/test_local_ray.py checks that they still behave as this
module expects.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

LOOPBACK = "127.0.0.1"
# Ray's single-machine switch: "0" makes Ray's own idea of this node's address the loopback one.
CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
WRITTEN_FOR = "2.60"


class RayInternalsChanged(RuntimeError):
    """A Ray internal this module relies on is gone or behaves differently."""


def _changed(what: str, exc: BaseException | None = None) -> RayInternalsChanged:
    import ray

    detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return RayInternalsChanged(
        f"Ray {ray.__version__} no longer provides {what}{detail}, which search/ray_adapter.py "
        f"relies on (written for Ray {WRITTEN_FOR}); install ray=={WRITTEN_FOR}.* or update "
        "search/ray_adapter.py")


def canonical_address(address: str | None) -> str | None:
    """host:port of the Ray cluster `address` names (auto, local, HOST:PORT, or None: the
    file `ray start` left), as ray.init would resolve it; None for "local" (or nothing found for
    None). Raises ConnectionError when auto finds no cluster and
    ValueError for an address Ray cannot parse."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError as exc:
        raise _changed("ray._private.services.canonicalize_bootstrap_address", exc) from None
    try:
        resolved = canonicalize_bootstrap_address(address)
    except TypeError as exc:  # its signature changed, not the user's address
        raise _changed("canonicalize_bootstrap_address(address)", exc) from None
    if resolved is not None and not isinstance(resolved, str):
        raise _changed(f"canonicalize_bootstrap_address returning host:port (got {resolved!r})")
    return resolved


@contextlib.contextmanager
def loopback_node() -> Iterator[str]:
    """While active, a Ray started by ray.init(address="local", _node_ip_address=LOOPBACK)
    takes 127.0.0.1 as its node address: its GCS, raylet, object manager, agents and workers
    then bind there and nowhere else. Yields LOOPBACK."""
    try:
        from ray._private import ray_constants
    except ImportError as exc:
        raise _changed("ray._private.ray_constants", exc) from None
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise _changed("ray._private.ray_constants.ENABLE_RAY_CLUSTER")
    saved_switch = os.environ.get(CLUSTER_SWITCH)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    # The variable for the processes ray.init starts, the constant for this one (read at import,
    # perhaps before this driver chose to start a local Ray).
    os.environ[CLUSTER_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield LOOPBACK
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_switch is None:
            os.environ.pop(CLUSTER_SWITCH, None)
        else:
            os.environ[CLUSTER_SWITCH] = saved_switch
