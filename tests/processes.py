"""Finding the processes a test started (its driver, the driver's Ray) and what they left."""

from __future__ import annotations

from pathlib import Path


def marked(marker: str, session: int | None = None) -> dict[int, str]:
    """Live (not zombie) processes carrying the environment entry TAILTUNE_TEST_MARK=`marker`,
    or in `session` (the session a test started with start_new_session): pid -> command line.
    Both, because Ray's agents retitle themselves over the memory /proc/<pid>/environ shows:
    no marker to read there, but they stay in the driver's session."""
    found = {}
    entry = f"TAILTUNE_TEST_MARK={marker}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[3]) != session and \
                    entry not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, IndexError, ValueError):
            continue
        if stat[0] != "Z":
            found[int(proc.name)] = command[:160]
    return found
