"""Test-wide settings: keep Ray on loopback and out of the user's home."""

import os
import tempfile

# A single-node Ray runtime binds to 127.0.0.1 with this (design.md); tests never leave loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# No usage reporting from test clusters.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Decoded image folders and verified list files are cached per test session, not in ~/.cache.
os.environ.setdefault("TAILTUNE_CACHE_DIR", tempfile.mkdtemp(prefix="tailtune-cache-"))
