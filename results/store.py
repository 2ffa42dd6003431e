"""Local SQLite MLflow stores (`sqlite:///PATH`): created by one writer at a time, read untouched.

MLflow creates a store's schema (an Alembic migration, dozens of steps) the first time a client
opens an empty database. Two drivers opening the same new `mlflow.db` at once both migrate, and
the second dies in Alembic (`table _alembic_tmp_experiments already exists`).
`prepare_local_store` makes the schema while holding an exclusive lock on `<db>.lock`, so
concurrent drivers take turns and the later ones find it made.

A reader (results/leaderboard.py) must never create or migrate a store: `check_readable_store`
refuses a file that is missing, empty or not an SQLite database, and `read_only_uri` opens the
database read-only, so MLflow cannot write to it even where it would like to.
"""

from __future__ import annotations

import fcntl
import urllib.parse
from pathlib import Path

SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database
SQLITE_PREFIX = "sqlite:///"
STORE_ACCEPTED = ("accepted: the mlflow.db of a tailtune --storage (an SQLite database MLflow "
                  "wrote) or --mlflow-uri sqlite:///ABS/PATH/mlflow.db | http://HOST:PORT")


class StoreError(ValueError):
    """A local store that cannot be used; the message names the file and what is accepted."""


def local_tracking_uri(folder: str | Path) -> str:
    """The default local store: an SQLite file at an absolute path. Here, not in
    results.mlflow_logging, so the sweep's checks name it without importing MLflow (seconds)."""
    return f"sqlite:///{Path(folder).expanduser().resolve() / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (four slashes: absolute; three:
    relative to the working folder), or None for any other URI."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    return Path(tracking_uri.removeprefix(SQLITE_PREFIX).split("?", 1)[0])


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


def prepare_local_store(tracking_uri: str) -> None:
    """Create the schema of a local SQLite store (nothing to do once it exists) under an
    exclusive flock on `<db>.lock`. Other URIs are left alone: a server or a shared database
    migrates itself once, when it is set up."""
    from mlflow.tracking import MlflowClient

    database = sqlite_path(tracking_uri)
    if database is None:
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    # The lock file stays: removing it while another driver waits on it would let a third
    # lock a new file of the same name and migrate alongside the second.
    with lock_path(database).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        # Opening the store is what migrates it; one query makes the client open it.
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)


def check_readable_store(database: Path) -> None:
    """The file is an SQLite database a reader may open: it exists, is a regular file, is not
    empty and starts with the SQLite header. MLflow would turn an empty (or missing) file into
    a new store, and fail with a traceback on anything else."""
    if not database.exists():
        raise StoreError(f"no MLflow store at {database}; {STORE_ACCEPTED}")
    if not database.is_file():
        raise StoreError(f"MLflow store {database} is not a file; {STORE_ACCEPTED}")
    try:
        with database.open("rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise StoreError(f"cannot read the MLflow store {database}: "
                         f"{exc.strerror or exc}; {STORE_ACCEPTED}") from None
    if not head:
        raise StoreError(f"MLflow store {database} is empty (0 bytes): no sweep has recorded "
                         f"there; {STORE_ACCEPTED}")
    if head != SQLITE_HEADER:
        raise StoreError(f"MLflow store {database} is not an SQLite database (it does not start "
                         f"with the SQLite header); {STORE_ACCEPTED}")


def read_only_uri(tracking_uri: str) -> str:
    """The same local SQLite store opened read-only (SQLite's URI filename, mode=ro): what reads
    it cannot create, migrate or change it. Other URIs are returned as they are."""
    database = sqlite_path(tracking_uri)
    if database is None:
        return tracking_uri
    quoted = urllib.parse.quote(str(database.resolve()), safe="/")
    return f"{SQLITE_PREFIX}file:{quoted}?mode=ro&uri=true"


__all__ = ["SQLITE_HEADER", "StoreError", "check_readable_store", "lock_path",
           "prepare_local_store", "read_only_uri", "sqlite_path"]
