"""embdistill.heap: the heap's free pages go back to the system (the gather calls it after
every part; without it a CPU gather's peak memory grew with the number of batches)."""

import sys

import pytest

from embdistill.heap import release_free_heap


def anonymous_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_free_pages_between_live_blocks_are_returned():
    blocks = [bytearray(64 << 10) for _ in range(3000)]  # 192 MB of 64 KiB blocks, from the heap
    for block in blocks:
        block[::4096] = b"\1" * len(block[::4096])  # touched: resident
    del blocks[::2]  # every other block freed: free pages between live ones, which free() keeps
    before = anonymous_mb()
    release_free_heap()
    assert anonymous_mb() < before - 60, "malloc_trim returned less than 60 of the 96 MB freed"
