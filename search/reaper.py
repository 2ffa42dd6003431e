"""Ends a local Ray when the driver that started it is gone, however it went (SIGKILL included).

Ray cleans up in the driver (ray.shutdown, at exit) and by process group. A driver killed alone
with SIGKILL runs neither, and some of Ray's processes (the runtime-env and dashboard agents,
which ignore SIGTERM) are in no group that dies with it: they stayed for ever.

The watchdog is this file run as its own small process (`python -I search/reaper.py MARKER
DRIVER_PID INSTANCE_DIR`), in a session of its own so that signals to the driver's process
group do not reach it. Its stdin is a pipe whose only writer is the driver: it blocks reading
it, and end of file means the driver is gone (or released it after ray.shutdown()). It then
ends every process of that Ray instance, SIGTERM first, SIGKILL after GRACE_S for those still
there, and exits quietly; after a clean ray.shutdown() it finds nothing.

A process belongs to the instance when
- its initial environment holds MARKER_VARIABLE=MARKER: the driver sets it just before ray.init
  and Ray's processes inherit it; or
- it runs the driver's Python and has a file open under INSTANCE_DIR (or names it on its
  command line): the instance's own Ray temp folder, made for it alone, where every Ray process
  writes its logs. This finds the agents, whose process title overwrites the memory
  /proc/<pid>/environ and cmdline show.
Each local Ray has a fresh random marker and folder, so another sweep's Ray is never touched.

It reads nothing but end of file from the pipe (no data, nothing unpickled) and imports only
the standard library (-I: no site-packages, no environment variables, no script folder on the
path).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER_VARIABLE = "TAILTUNE_RAY_INSTANCE"
GRACE_S = 2.0  # between SIGTERM and SIGKILL
DEADLINE_S = 15.0  # for the whole clean-up (a raylet may start a worker while it runs)
POLL_S = 0.1
_MARKER = re.compile(r"[0-9a-f]{32}")
DIR_PREFIX = "tailtune-ray-"

_watching: subprocess.Popen | None = None  # the reaper of this process's local Ray


# ------------------------------------------------------------------ the driver's side
def watch() -> tuple[str, str]:
    """Start a reaper for the local Ray this process is about to start: makes the instance's
    Ray temp folder (for ray.init's _temp_dir) and puts the marker in os.environ, for Ray's
    processes to inherit. Returns (marker, folder)."""
    global _watching
    release()  # a previous local Ray of this process was shut down
    marker = secrets.token_hex(16)
    folder = _instance_dir()
    env = {key: value for key, value in os.environ.items() if key != MARKER_VARIABLE}
    # The pipe's write end stays in this process only (Python's pipes are close-on-exec): its
    # end of file is this process's end, whatever ends it.
    _watching = subprocess.Popen(
        [sys.executable, "-I", str(Path(__file__).resolve()), marker, str(os.getpid()), folder],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, start_new_session=True)
    os.environ[MARKER_VARIABLE] = marker
    return marker, folder


def _instance_dir() -> str:
    """A new folder in Ray's usual place (RAY_TMPDIR or the system's temp folder, then ray/),
    short enough for the Unix socket paths Ray makes in it; the system temp folder itself when
    that one is not ours to write."""
    root = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()).resolve() / "ray"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix=DIR_PREFIX, dir=root)
    except OSError:
        return str(Path(tempfile.mkdtemp(prefix=DIR_PREFIX)).resolve())


def release() -> None:
    """Let the reaper go: it ends what is left of the local Ray (nothing after ray.shutdown())
    and exits. Not waited for (subprocess reaps it later)."""
    global _watching
    if _watching is not None:
        with contextlib.suppress(OSError):
            _watching.stdin.close()
        _watching = None
    os.environ.pop(MARKER_VARIABLE, None)


# ------------------------------------------------------------------ the reaper's side
class Instance:
    """How to tell the processes of one Ray instance (see the module's docstring)."""

    def __init__(self, marker: str, folder: str) -> None:
        self.entry = f"{MARKER_VARIABLE}={marker}".encode()
        self.folder = folder.rstrip(os.sep) + os.sep
        self.python = _identity(Path("/proc/self/exe"))

    def owns(self, proc: Path) -> bool:
        try:
            if self.entry in (proc / "environ").read_bytes().split(b"\0"):
                return True
            if _identity(proc / "exe") != self.python:
                return False
            if self.folder.encode() in (proc / "cmdline").read_bytes():
                return True
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith(self.folder):
                        return True
        except OSError:  # gone, or not ours to read
            return False
        return False

    def processes(self, exclude: set[int] = frozenset()) -> list[int]:
        """Live (not zombie) processes of the instance."""
        return [int(proc.name) for proc in Path("/proc").iterdir()
                if proc.name.isdigit() and int(proc.name) not in exclude
                and self.owns(proc) and _state(proc) not in ("Z", "X", None)]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _state(proc: Path) -> str | None:
    try:
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _signal(instance: Instance, pid: int, sig: int) -> None:
    """Send `sig` to `pid` if it is still the instance's. A pidfd pins the process while that
    is checked again, so a pid reused by another process in between is never hit."""
    proc = Path(f"/proc/{pid}")
    try:
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):  # gone, or a kernel before 5.3
        if instance.owns(proc):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        return
    try:
        if instance.owns(proc):
            signal.pidfd_send_signal(handle, sig)
    except OSError:
        pass
    finally:
        os.close(handle)


def reap(instance: Instance, exclude: set[int], grace_s: float = GRACE_S,
         deadline_s: float = DEADLINE_S) -> int:
    """End every process of the instance: SIGTERM, then SIGKILL after grace_s; again for any
    that appeared meanwhile, until none is left or deadline_s passed. Returns how many were
    signalled."""
    deadline = time.monotonic() + deadline_s
    signalled: set[int] = set()
    while time.monotonic() < deadline:
        alive = instance.processes(exclude)
        if not alive:
            break
        for pid in alive:
            _signal(instance, pid, signal.SIGTERM if pid not in signalled else signal.SIGKILL)
        signalled.update(alive)
        until = min(deadline, time.monotonic() + grace_s)
        while time.monotonic() < until and instance.processes(exclude):
            time.sleep(POLL_S)
        for pid in instance.processes(exclude):
            _signal(instance, pid, signal.SIGKILL)
    return len(signalled)


def _wait_for_end_of_file() -> None:
    while True:
        try:
            if not os.read(0, 65536):
                return
        except InterruptedError:
            continue
        except OSError:  # no stdin at all: nothing to watch, clean up now
            return


def _valid_folder(text: str) -> bool:
    """Only a folder made by watch(): absolute, no link, named DIR_PREFIX + random (never "/"
    or a home folder, whose open files would match every process)."""
    path = Path(text)
    return (path.is_absolute() and path.name.startswith(DIR_PREFIX)
            and len(path.name) > len(DIR_PREFIX) + 4 and str(path.resolve()) == text
            and path.is_dir())


def main(argv: list[str]) -> int:
    if (len(argv) != 3 or not _MARKER.fullmatch(argv[0]) or not argv[1].isdigit()
            or not _valid_folder(argv[2])):
        print("usage: reaper.py MARKER(32 hex digits) DRIVER_PID INSTANCE_DIR", file=sys.stderr)
        return 2
    instance, driver = Instance(argv[0], argv[2]), int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe says when to act
    _wait_for_end_of_file()
    reap(instance, exclude={os.getpid(), driver})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
