"""Freed memory kept for the next film in a decode worker (glibc's malloc thresholds).

Why: a film's decode makes a dozen arrays of 1-40 MB (codec buffers, stored values, float
images). glibc serves blocks that large by mmap, or trims them from the heap when freed,
so every film's arrays land on fresh pages and page-fault: on the 1955x1841 J2K lossy CR
(pydicom-data RG1_J2KI) the reduced decode took 65 ms a film, 60 ms with the thresholds
raised (bench/decode.py runs every path under them). The cost is that a worker keeps up to
`TRIM_BYTES` of freed heap instead of returning it to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
MMAP_BYTES = 128 << 20  # blocks up to this come from the heap, where freed ones are reused
TRIM_BYTES = 256 << 20  # free heap kept before any is returned to the system


@functools.cache
def keep_freed_memory() -> bool:
    """Raise this process's mmap and trim thresholds (once); False where the C library has no mallopt."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
