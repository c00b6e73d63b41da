"""Hand the heap's free pages back to the system between a stage's rounds of work.

glibc's malloc serves blocks of up to 32 MiB from its heap once it has seen such blocks freed
(its mmap threshold rises with them), and a heap that batches of varied shapes have fragmented
keeps its free pages: on the CPU, a gather of 16k tweets grew from about 600 to 890 MB of peak
memory in steps, on its batches alone, with nothing of ours held longer (BENCHMARKS.md).
``malloc_trim(0)`` returns every free page, from the middle of the heap too. A fixed threshold
(``MALLOC_MMAP_THRESHOLD_``) bounded the growth as well, but cost the gather 22-25 % more time:
every batch's tensors mapped and zeroed anew.
"""

from __future__ import annotations

import ctypes
import sys

# glibc only (musl and macOS have no malloc_trim): elsewhere a no-op
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None


def release_free_heap() -> None:
    """Return the heap's free pages to the system (``malloc_trim(0)``); a no-op without glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
