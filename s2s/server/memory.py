"""Memory settings that must be made before any thread starts."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MALLOC_ARENAS = 2
"""glibc gives threads malloc arenas of their own (up to 8 per core). Each session starts and
ends a handful of threads, and memory freed in one arena is not reused by the others, so RSS
crept up: +168 MiB over the second half of a 104-turn soak (four sessions, random barge-ins
and disconnects); with two arenas +5.5 MiB, and no slower."""
M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas() -> None:
    """Before any thread exists: glibc fixes its arena limit the first time a thread needs an
    arena, so this runs when ``s2s.server`` is first imported, before the model libraries
    (which start threads). ``MALLOC_ARENA_MAX`` set by the user wins."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass  # not glibc (musl has no arenas to limit)
