"""Row files: one (n, d) ``.npy`` array on disk, written a block of rows at a time and pickled
as ``{token_id: its rows}`` from its memory map, so that neither writing nor pickling holds the
rows in memory. The gather writes its rank pickle this way, the combine ``combined.pkl``.

Such a pickle is read back the same way (:func:`open_stored_pickle`): its arrays stay in the
file as :class:`StoredRows`, whose rows are read a block at a time (:func:`row_blocks`).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import RestrictedGlobals, atomic_open, read_pickle
from ..errors import UserError

# The rows read at once from a StoredRows (row_blocks): what a reader holds of them.
ROW_BLOCK_BYTES = 4 << 20


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
        fh.write(np.ascontiguousarray(rows[a:b]))  # its buffer, not a copy (tobytes)


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


class StoredRows:
    """A C-ordered (n, d) array left in its pickle file: its shape, dtype and where its bytes
    start; ``rows[a:b]`` reads rows a to b (a new array)."""

    ndim = 2

    def __init__(self, file, offset: int, dtype: np.dtype, shape: tuple[int, int]):
        self.file, self.offset, self.dtype, self.shape = file, offset, dtype, shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        width = self.shape[1] * self.dtype.itemsize
        data = os.pread(self.file.fileno(), (stop - start) * width, self.offset + start * width)
        if len(data) != (stop - start) * width:
            raise UserError(f"{self.file.name}: truncated while it was being read; gather it again")
        return np.frombuffer(data, self.dtype).reshape(stop - start, self.shape[1])


def row_blocks(rows: np.ndarray | StoredRows) -> Iterator[tuple[int, np.ndarray]]:
    """``rows`` a block of at most ROW_BLOCK_BYTES at a time (at least a row): (first row, block)."""
    step = max(1, ROW_BLOCK_BYTES // max(1, rows.shape[1] * rows.dtype.itemsize))
    for start in range(0, len(rows), step):
        yield start, rows[start:start + step]


class StoredBytes:
    """A bytearray of the pickle left in the file: where it starts, its size."""

    def __init__(self, offset: int, size: int):
        self.offset, self.size = offset, size


class StoredRowsUnpickler(RestrictedGlobals, pickle._Unpickler):
    """The restricted unpickler (our artefacts' globals only), in pickle's pure-Python version so
    that it can leave bytes in the file. Protocol 5 pickles a writable array's data in-band as a
    bytearray (BYTEARRAY8), which numpy's ``_frombuffer`` then wraps: each bytearray is skipped
    and recorded where it is (:class:`StoredBytes`; inside a frame from the frame's start, a
    large one outside the frames from the file's position), and ``_frombuffer`` given one makes
    :class:`StoredRows` of a C-ordered 2-d array of a plain dtype, or reads the bytes and makes
    the array as numpy would. Everything else (another protocol's arrays, read-only arrays
    pickled as bytes) is read as pickle reads it. A bytearray that is not an array's data stays
    a StoredBytes, which the states checks refuse like any value that is not an array."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file):
        super().__init__(file)
        self.file, self.frame = file, (0, 0)  # the current frame: (its first byte in the file, size)

    def find_class(self, module: str, name: str):
        found = super().find_class(module, name)
        if name != "_frombuffer":
            return found
        self.numpy_frombuffer = found  # numpy's (numpy.core's or numpy._core's): the allow-list's
        return self.frombuffer

    def load_frame(self):
        size, = struct.unpack("<Q", self.read(8))
        self.frame = (self.file.tell(), size)
        self._unframer.load_frame(size)
    dispatch[pickle.FRAME[0]] = load_frame

    def load_bytearray8(self):
        size, = struct.unpack("<Q", self.read(8))
        frame = self._unframer.current_frame  # None once read past its end
        if frame is not None:
            start, frame_size = self.frame
            offset, end, room = start + frame.tell(), frame.tell() + size, frame_size
            frame.seek(size, os.SEEK_CUR)
        else:
            offset = self.file.tell()
            end, room = offset + size, os.fstat(self.file.fileno()).st_size
            self.file.seek(size, os.SEEK_CUR)
        if end > room:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(StoredBytes(offset, size))
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def frombuffer(self, buffer, dtype, shape, order, *axis_order):
        if not isinstance(buffer, StoredBytes):
            return self.numpy_frombuffer(buffer, dtype, shape, order, *axis_order)
        plain = isinstance(dtype, np.dtype) and not dtype.hasobject and order == "C" and not axis_order
        if plain and len(shape) == 2 and all(type(n) is int and n >= 0 for n in shape):
            if math.prod(shape) * dtype.itemsize != buffer.size:
                raise ValueError(f"an array of shape {shape} and {dtype} in {buffer.size} bytes")
            return StoredRows(self.file, buffer.offset, dtype, shape)
        data, resume = bytearray(buffer.size), self.file.tell()
        self.file.seek(buffer.offset)
        if self.file.readinto(data) != buffer.size:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.file.seek(resume)
        return self.numpy_frombuffer(data, dtype, shape, order, *axis_order)


@contextlib.contextmanager
def open_stored_pickle(path: Path) -> Iterator[Any]:
    """The pickle ``path`` read with :class:`StoredRowsUnpickler` (the restricted rules of
    :func:`embdistill.artifacts.load_pickle`, its one-line errors): its arrays pickled as
    :func:`save_mapped_pickle` and :func:`embdistill.artifacts.save_pickle` write them are
    :class:`StoredRows`, read from the file, which stays open, while the context lasts."""
    if not path.is_file():
        raise UserError(f"missing file: {path}")
    with open(path, "rb") as fh:
        yield read_pickle(fh, path, StoredRowsUnpickler)
