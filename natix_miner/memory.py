"""Process memory: glibc allocator settings that keep RSS flat, and what RSS and fds are now.

A miner allocates big, short-lived buffers on many threads (base64 strings and decoded images
on the decode threads, tensors on each tier's worker thread). glibc gives every thread its own
arena (up to 8 per core) and raises its mmap threshold each time a big block is freed, after
which big blocks come from the arenas and are kept: RSS climbs in steps and never comes back.
`tune_malloc` caps the arenas and pins the mmap threshold, so big buffers are mmapped and go
back to the OS when freed; `trim` hands free arena pages back (called after each health line).
Both are no-ops where the C library is not glibc.
"""

import ctypes
import ctypes.util
import os
from typing import Optional

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Blocks this big or bigger are mmapped (and returned to the OS on free); fixing it turns off
# glibc's dynamic threshold, which otherwise climbs to 32 MiB.
MMAP_THRESHOLD = 256 * 1024
TRIM_THRESHOLD = 1024 * 1024

_libc: Optional[ctypes.CDLL] = None
_tuned: Optional[int] = None


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt  # noqa: B018 - glibc only
            libc.malloc_trim  # noqa: B018
        except (OSError, AttributeError):
            return None
        _libc = libc
    return _libc


def tune_malloc(arena_max: int) -> bool:
    """Cap malloc arenas at `arena_max` (0 = leave glibc's defaults) and pin the mmap threshold.

    Call before the process starts its worker threads; arenas that exist already stay. Once per
    process (later calls keep the first setting). True if applied.
    """
    global _tuned
    if arena_max <= 0:
        return False
    if _tuned is not None:
        return True
    libc = _glibc()
    if libc is None:
        return False
    ok = all([libc.mallopt(_M_ARENA_MAX, int(arena_max)) == 1,
              libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1,
              libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1])
    _tuned = int(arena_max)
    return ok


def trim() -> bool:
    """Return free heap pages of every arena to the OS (glibc `malloc_trim(0)`)."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def rss_bytes(pid: Optional[int] = None) -> int:
    """Resident set size of `pid` (default: this process), from /proc; 0 where unavailable."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def open_fds(pid: Optional[int] = None) -> int:
    """Open file descriptors of `pid` (default: this process); -1 where unavailable."""
    try:
        return len(os.listdir(f"/proc/{pid or 'self'}/fd"))
    except OSError:
        return -1


def snapshot() -> dict:
    """RSS (MiB) and open fds, for health lines and the attack suite."""
    return {"rss_mib": round(rss_bytes() / 2**20, 1), "open_fds": open_fds(),
            "malloc_arena_max": _tuned or 0}
