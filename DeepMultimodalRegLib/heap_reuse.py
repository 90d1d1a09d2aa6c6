"""Keep freed heap memory for reuse (glibc), so large tensors are not faulted in afresh on every allocation.

Why: glibc serves an allocation above its mmap threshold (at most 32 MB) with a fresh memory mapping
and unmaps it when it is freed.  The DISA network's full-resolution activations are 100-300 MB each,
allocated and freed on every layer of every pass, so the kernel faults each of them in again page by
page.  On the 2-core VM of docs/benchmarks.md four chest-CT global registrations spent a fifth of their
CPU time in the kernel (1 min 48 s of 8 min 49 s); twelve network passes over that CT's grid took
14.4 s of kernel time with the default settings and 1.3 s with these (ad hoc measurements,
2026-12-07).  Not every block is reused (the heap still grows when no free block fits):
Testing/test_heap_reuse.py measures 4-5x fewer page faults on a network-like pattern.

With memory mappings off and trimming raised, freed blocks stay in the heap and are reused.  The cost:
the process keeps its peak heap until it exits.  That suits a command-line run or a benchmark, which is
where it is switched on (``deepmmreg`` run as a program, ``benchmarks/disa_capture_range.py`` unless
``--system-malloc``); a library import never does it, so a long-lived host such as Slicer keeps its own
allocator settings.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: free memory at the top of the heap beyond which glibc gives it back (the largest C int, ~2 GiB)
TRIM_THRESHOLD_BYTES = 2 ** 31 - 1


def reuse_freed_memory() -> bool:
    """Ask glibc to serve large allocations from the heap and keep freed memory; True if it accepted both.

    A no-op returning False where there is no glibc ``mallopt`` (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
