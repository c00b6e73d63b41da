"""Row files: one (n, d) ``.npy`` array on disk, written a block of rows at a time and pickled
as ``{token_id: its rows}`` from its memory map, so that neither writing nor pickling holds the
rows in memory. The gather writes its rank pickle this way, the combine ``combined.pkl``.
"""

from __future__ import annotations

import mmap
import pickle
from pathlib import Path

import numpy as np

from ..artifacts import atomic_open


def rows_path(states_pickle: Path) -> Path:
    """The row file of a states pickle ``<name>.pkl``: ``<name>.rows.npy``."""
    return states_pickle.with_suffix(".rows.npy")


def start_row_file(fh, shape: tuple[int, int], dtype: np.dtype) -> int:
    """Write the ``.npy`` header of a ``shape`` array of ``dtype`` to ``fh`` and size the file
    for its rows (left as a hole for :func:`write_rows` to fill); returns the header's length."""
    np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                              "fortran_order": False, "shape": shape})
    header = fh.tell()
    fh.truncate(header + shape[0] * shape[1] * dtype.itemsize)
    return header


def write_rows(fh, header: int, rows: np.ndarray, places: np.ndarray) -> None:
    """Write ``rows`` as rows ``places`` (ascending) of the row file ``fh``, whose data start
    at byte ``header``: one write per run of consecutive places."""
    row_bytes = rows.dtype.itemsize * rows.shape[1]
    runs = np.flatnonzero(np.diff(places) != 1) + 1
    for a, b in zip([0, *runs], [*runs, len(places)]) if len(places) else ():  # all capped away
        fh.seek(header + int(places[a]) * row_bytes)
        fh.write(np.ascontiguousarray(rows[a:b]).tobytes())


def save_mapped_pickle(output: Path, rows_file: Path, header: int, shape: tuple, dtype: np.dtype,
                       table: np.ndarray) -> None:
    """``output`` = ``{token_id: its rows}`` (``table``: (T, 3) token id, first row, end row),
    pickled from views of the mapped row file: the rows are never all in memory. Mapped
    copy-on-write, the views are writable arrays, which pickle exactly as the arrays of a dict
    in memory (read-only ones pickle as other opcodes); the pages the pickler has read are
    dropped from this process as it goes (they stay in the page cache), so resident memory
    stays bounded too."""
    with open(rows_file, "rb") as fh:
        mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if shape[0] else None
    rows = np.frombuffer(mapping, dtype, shape[0] * shape[1], offset=header).reshape(shape) if mapping else None
    with atomic_open(output, "wb") as fh:  # save_pickle's protocol
        pickle.dump({int(t): rows[a:b] for t, a, b in table}, ReleasingWriter(fh, mapping), protocol=5)


class ReleasingWriter:
    """A file to pickle into that drops ``mapping``'s pages from this process after every
    ``every`` bytes written (the pickler has copied them to the file by then)."""

    def __init__(self, fh, mapping: mmap.mmap | None, every: int = 16 << 20):
        self.fh, self.mapping, self.every, self.pending = fh, mapping, every, 0

    def write(self, data) -> int:
        written = self.fh.write(data)
        self.pending += written
        if self.mapping is not None and self.pending >= self.every:
            self.mapping.madvise(mmap.MADV_DONTNEED)
            self.pending = 0
        return written
