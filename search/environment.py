"""Checks of the machines a sweep will use, made before anything is written.

Input checks (names, ranges) live in search.options; these look at the world: can the results
storage be written, does the MLflow server answer, does a Ray cluster answer at --address. Each
failure is a SetupError whose one-line message names the value and what is accepted; every probe
is bounded by PROBE_TIMEOUT_S, so a wrong address fails in seconds instead of hanging.
"""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

PROBE_TIMEOUT_S = 5.0
TRACKING_SCHEMES = ("http(s)://HOST:PORT of an `mlflow server`, sqlite:///ABSOLUTE/PATH.db, "
                    "or a database URI (postgresql://, mysql://)")


class SetupError(ValueError):
    """An environment the sweep cannot use; the message names it and what is accepted."""


def check_storage(storage: str | Path, what: str | None = None) -> None:
    """The folder exists and takes files, or can be created; nothing is left behind. `what`
    names it in messages (default: --storage and the path)."""
    path = Path(storage)
    what = what or f"--storage {path}"
    existing = path
    while not existing.exists():  # the nearest ancestor that exists
        existing = existing.parent
    if not existing.is_dir():
        raise SetupError(f"{what} cannot be created: {existing} is not a folder; "
                         "accepted: a folder path this user can write")
    try:  # os.access says yes to root even on a read-only file system: try for real
        handle, probe = tempfile.mkstemp(prefix=".tailtune-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise SetupError(f"{what} is not writable (cannot create a file in {existing}: "
                         f"{_reason(exc)}); "
                         "accepted: a folder this user can write (on a cluster, one every "
                         "node reaches at the same path)") from None


def check_tracking(uri: str) -> None:
    """The MLflow tracking URI is usable: a server answers /health, an SQLite file can be
    written. Other database URIs are left to MLflow (the parent run is made first)."""
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _probe_server(uri)
    elif scheme == "sqlite":
        database = uri.split("://", 1)[1].lstrip("/") if "://" in uri else ""
        if not database or database == ":memory:":
            raise SetupError(f"--mlflow-uri {uri} names no database file; accepted: "
                             f"{TRACKING_SCHEMES}")
        # sqlite:////abs/path (four slashes) is absolute; sqlite:///rel/path is relative
        path = Path("/" + database) if uri.startswith("sqlite:////") else Path(database)
        check_storage(path.parent, what=f"--mlflow-uri {uri}")
    elif scheme in ("", "file"):
        raise SetupError(f"--mlflow-uri {uri} is a file store, which MLflow 3.13+ refuses; "
                         f"accepted: {TRACKING_SCHEMES}")


def _probe_server(uri: str) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as answer:
            if answer.status == 200:
                return
            reason = f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} from /health"
    except (OSError, ValueError) as exc:
        reason = _reason(exc)
    raise SetupError(f"--mlflow-uri {uri}: no MLflow server answers there ({reason}); "
                     "accepted: the URL of a running `mlflow server` (see docs/cluster.md)")


def resolve_address(address: str) -> tuple[str, int]:
    """(host, port) of the Ray cluster `address` names: auto (RAY_ADDRESS, or the cluster
    `ray start` began on this machine) or HOST:PORT."""
    from search.ray_adapter import RayInternalsChanged, canonical_address

    accepted = ("accepted: auto (RAY_ADDRESS, or the cluster `ray start` began on this "
                "machine) or the head's HOST:PORT")
    try:
        resolved = canonical_address(address)
    except ConnectionError:  # auto, and nothing to find
        resolved = None
    except RayInternalsChanged:  # not the user's address: say what changed
        raise
    except Exception as exc:  # a malformed address, an unresolvable host name
        raise SetupError(f"--address {address} is not a Ray address ({_reason(exc)}); "
                         f"{accepted}") from None
    if resolved is None:
        raise SetupError(f"--address {address}: no Ray cluster found (RAY_ADDRESS is unset and "
                         f"`ray start` has not run on this machine); {accepted}")
    host, _, port = resolved.rpartition(":")
    if not port.isdigit():
        raise SetupError(f"--address {address} has no port; {accepted}")
    return host.strip("[]"), int(port)


def check_address(address: str) -> str:
    """A Ray head answers at `address` (a TCP connection within PROBE_TIMEOUT_S: ray.init
    itself waits minutes for a head that is not there). Returns host:port."""
    host, port = resolve_address(address)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise SetupError(f"--address {address}: no Ray cluster answers at {host}:{port} "
                         f"({_reason(exc)}); accepted: the address of a running head "
                         "(`ray start --head` prints it), or auto") from None
    return f"{host}:{port}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and exc.reason is not None:
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer within {PROBE_TIMEOUT_S:g} s"
    text = (getattr(exc, "strerror", None) or str(exc)).strip()
    if not text:
        return type(exc).__name__
    first = text.splitlines()[0].rstrip(".")
    return first[0].lower() + first[1:]
