"""Merge gathered states of several ranks and tasks into one ``{token_id: (n, d) array}``.

Inputs are rank files (``rank<R>.pkl``), gather folders, or anything else a caller resolves to
those. Rank files from one folder form one gather: all of its ranks must be present, and their
rows are put in occurrence order (``rank<R>.index.pkl``), so the result does not depend on how
many ranks gathered. Gathers follow each other in the order given. A token with more than
``cap`` rows keeps ``cap`` of them, chosen by an RNG keyed by (seed, token id), in order.

The original's rank pickles (a bare dict, no manifest, no index) are read too: their rows keep
file order, their hidden size and dtype come from the arrays. Inputs whose teacher, hidden size
or dtype differ are refused, and so is every input that is not a dict of non-negative token ids
to finite (n >= 1, d) float arrays (:func:`check_states`): one line naming the file and token.

Output: ``combined.rows.npy`` (every row, token after token in id order, one contiguous array
that ``np.load(mmap_mode="r")`` maps), ``combined.tokens.npy`` ((T, 3) int64: token id, first
row, end row) and, unless skipped (``combined_pickle``: :data:`PICKLE_MODES`), ``combined.pkl``
(``{token_id: (n, d) array}``, the original's format, written from the mapped row file). The
manifest of combined.pkl records the pickle's sha256 and the two files' shapes; without a
pickle the manifest sits beside the row file and records its sha256 instead
(:func:`combined_artifact` names the file that stands for the states). :func:`open_combined`
uses the row file only while it matches, so each clustering process reads just its tokens' rows
and host memory does not grow with the number of processes.

Host memory does not grow with the states either (:func:`combine`): a first pass reads the
gathers' occurrence ids (the original's files: their pickle's layout) and places every input
row in the row file; a second reads each rank file a token at a time, the token's rows a block
of at most 4 MiB at a time (:func:`embdistill.senses.rowfile.row_blocks`), and writes them to
their places. Held at once: one block of rows, 16 bytes per input row (its place and occurrence
id) and a small record per token of each file. A pickle that protocol 5 did not write (the
original's files may be protocol 4) cannot be read this way: its arrays are loaded with it, one
file at a time, as before.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import atomic_open, fingerprint, load_pickle, manifest_path, read_manifest, write_manifest
from ..errors import UserError
from .gather import index_path
from .rowfile import StoredRows, open_stored_pickle, row_blocks, rows_path, save_mapped_pickle, start_row_file, write_rows

log = logging.getLogger("embdistill.combine")

RANK_FILE = re.compile(r"rank(\d+)\.pkl$")


def rank_files(folder: Path) -> list[Path]:
    """The ``rank<R>.pkl`` files of a gather folder, by rank (part and index files excluded)."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := RANK_FILE.fullmatch(p.name))]
    if not found:
        raise UserError(f"{folder}: no rank<R>.pkl files; run scripts/02_gather.py first")
    return [p for _, p in sorted(found)]


def resolve_inputs(inputs: Sequence[str], task_gather_dir: Callable[[str], Path]) -> list[list[Path]]:
    """Group input arguments into gathers: a rank file, a gather folder, or a task name
    (``task_gather_dir`` maps it to its folder). Files of one folder are one gather."""
    groups: dict[Path, list[Path]] = {}
    for arg in inputs:
        path = Path(arg)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = rank_files(path)
        elif arg.endswith(".pkl") or "/" in arg:
            raise UserError(f"missing file or folder: {arg}")
        else:
            folder = task_gather_dir(arg)
            if not folder.is_dir():
                raise UserError(f"task {arg}: nothing gathered in {folder}; run run_gather_sense.sh {arg}")
            files = rank_files(folder)
        for file in files:
            group = groups.setdefault(file.resolve().parent, [])
            if file.resolve() not in group:
                group.append(file.resolve())
    if not groups:
        raise UserError("no inputs to combine")
    return list(groups.values())


@dataclass
class Source:
    """One input file as the first pass sees it: its rows per token, their occurrence ids (when
    gathered by us), and the teacher, hidden size, dtype and gather config it was made with."""

    path: Path
    counts: dict[int, int]
    occurrences: dict[int, np.ndarray] | None
    teacher: str | None
    hidden_size: int
    dtype: str
    gather: Mapping | None  # the gather config of a rank file (None for other inputs)


STATE_DTYPES = ("float16", "float32", "float64")
PICKLE_MODES = ("auto", "always", "never")
# --combined-pickle auto writes combined.pkl up to this size: its readers (the original's
# clustering, other tools) load it whole, and it doubles the disk the states take.
PICKLE_AUTO_BYTES = 16 << 30


def check_rows(path: Path, token, rows) -> None:
    """One entry of a states file: a non-negative token id -> finite (n >= 1, d) float array;
    UserError naming the file and the token otherwise. Rows left in the file (StoredRows) are
    checked to be finite as they are read (:func:`combine`)."""
    if not isinstance(token, (int, np.integer)) or isinstance(token, bool) or token < 0:
        raise UserError(f"{path}: token id {token!r} is not a non-negative integer")
    if not isinstance(rows, (np.ndarray, StoredRows)) or rows.ndim != 2 or not len(rows):
        shape = getattr(rows, "shape", type(rows).__name__)
        raise UserError(f"{path}: expected a dict token_id -> (n, d) array; entry {token!r} is not "
                        f"(it is {shape})")
    if str(rows.dtype) not in STATE_DTYPES:
        raise UserError(f"{path}: the states of token {token} are {rows.dtype}, not one of "
                        f"{', '.join(STATE_DTYPES)}")
    if isinstance(rows, np.ndarray):
        check_finite(path, token, rows)


def check_finite(path: Path, token, rows: np.ndarray) -> None:
    """NaN and infinity are different faults: NaN comes from the teacher (or a file edited by
    hand), infinity from states that overflow their dtype."""
    if np.isfinite(rows).all():
        return
    if np.isnan(rows).any():
        raise UserError(f"{path}: the states of token {token} hold NaN (not an overflow: the teacher "
                        "produced NaN, or the file is damaged); gather them again")
    raise UserError(f"{path}: the states of token {token} hold infinities (values beyond "
                    f"{rows.dtype}'s range); gather them again with --dtype float32")


def check_states(path: Path, states) -> tuple[set[int], set[str]]:
    """A whole states dict (see :func:`check_rows`): its (widths, dtypes)."""
    if not isinstance(states, dict):
        raise UserError(f"{path}: expected a dict token_id -> (n, d) array, got {type(states).__name__}")
    for token, rows in states.items():
        check_rows(path, token, rows)
    widths, dtypes = {r.shape[1] for r in states.values()}, {str(r.dtype) for r in states.values()}
    if len(widths) > 1 or len(dtypes) > 1:
        raise UserError(f"{path}: arrays of several widths or dtypes ({sorted(widths)}, {sorted(dtypes)})")
    return widths, dtypes


def read_source(path: Path) -> tuple[Source, dict[int, np.ndarray]]:
    """Load one gathered file whole and check it (:func:`describe_states`): (what it is, its
    states)."""
    states = load_pickle(path)
    return describe_states(path, states), {int(t): rows for t, rows in states.items()}


@contextlib.contextmanager
def stream_source(path: Path) -> Iterator[tuple[Source, dict[int, np.ndarray | StoredRows]]]:
    """:func:`read_source` without reading the rows: the arrays of a protocol-5 pickle (ours)
    stay in the file (StoredRows, open while the context lasts), any other pickle's are read."""
    with open_stored_pickle(path) as states:
        yield describe_states(path, states), {int(t): rows for t, rows in states.items()}


def describe_states(path: Path, states) -> Source:
    """Check a gathered file's states (:func:`check_states`; a rank file of ours against its
    manifest and index): what it is; UserError naming the file otherwise."""
    widths, dtypes = check_states(path, states)
    manifest = read_manifest(path) or {}
    extra = manifest.get("extra", {})
    hidden_size = extra.get("hidden_size", next(iter(widths), None))
    dtype = extra.get("dtype", next(iter(dtypes), None))
    if widths and (widths != {hidden_size} or dtypes != {dtype}):
        raise UserError(f"{path}: arrays are {widths.pop()}-d {dtypes.pop()}, its manifest says "
                        f"{hidden_size}-d {dtype}")
    if hidden_size is None:
        raise UserError(f"{path}: empty and without a manifest; its hidden size is unknown")
    counts = {int(t): len(rows) for t, rows in states.items()}
    gather = manifest.get("config") if manifest.get("stage") == "gather" else None
    occurrences = None
    if gather is not None:
        occurrences = read_index(path)
        if {t: len(o) for t, o in occurrences.items()} != counts:
            raise UserError(f"{index_path(path)} does not match {path}; rerun the gather with --overwrite")
    return Source(path, counts, occurrences, extra.get("teacher"), int(hidden_size), str(dtype), gather)


def read_index(path: Path) -> dict[int, np.ndarray]:
    """The occurrence ids of a rank file's rows, ``{token_id: (n,) integers}``."""
    occurrences = load_pickle(index_path(path))
    if not isinstance(occurrences, dict) or not all(
        isinstance(o, np.ndarray) and o.ndim == 1 and o.dtype.kind in "iu" for o in occurrences.values()
    ):
        raise UserError(f"{index_path(path)} does not match {path}; rerun the gather with --overwrite")
    return {int(t): o for t, o in occurrences.items()}


def describe_source(path: Path) -> Source:
    """The first pass's view of one file: a rank file of ours from its manifest and index (its
    states are read in the second pass); any other file from its pickle (:func:`stream_source`:
    its arrays' shapes and dtypes, their rows checked in the second pass)."""
    manifest = read_manifest(path) or {}
    extra = manifest.get("extra", {})
    if manifest.get("stage") != "gather" or "hidden_size" not in extra or "dtype" not in extra:
        with stream_source(path) as (source, _):
            return source
    if not path.is_file():
        raise UserError(f"missing file: {path}")
    occurrences = read_index(path)
    return Source(path, {t: len(o) for t, o in occurrences.items()}, occurrences, extra.get("teacher"),
                  int(extra["hidden_size"]), str(extra["dtype"]), manifest["config"])


def check_compatible(sources: Sequence[Source]) -> None:
    """Refuse mixing teachers, hidden sizes or dtypes."""
    for key in ("hidden_size", "dtype", "teacher"):
        first_with = {}  # value -> first input that has it, in input order
        for source in sources:
            value = getattr(source, key)
            if value is not None:  # the original's files name no teacher
                first_with.setdefault(value, source.path)
        if len(first_with) > 1:
            listing = ", ".join(f"{v} ({p})" for v, p in first_with.items())
            raise UserError(f"inputs differ in {key.replace('_', ' ')}: {listing}")


def check_complete(group: Sequence[Source]) -> None:
    """All ranks of a gather, with one config: a missing rank would silently drop texts."""
    gathered = [s for s in group if s.gather is not None]
    if not gathered:
        return
    world_size = gathered[0].gather["world_size"]
    ranks = sorted(s.gather["rank"] for s in gathered)
    if ranks != list(range(world_size)):
        missing = sorted(set(range(world_size)) - set(ranks))
        raise UserError(f"{group[0].path.parent}: gather of {world_size} ranks is incomplete "
                        f"(missing rank {', '.join(map(str, missing)) or '?'}); finish scripts/02_gather.py")
    shared = [{k: v for k, v in s.gather.items() if k != "rank"} for s in gathered]
    if any(c != shared[0] for c in shared) or len(gathered) != len(group):
        raise UserError(f"{group[0].path.parent}: rank files from different gathers; rerun the "
                        "gather with --overwrite")


def token_positions(group: Sequence[Source], token: int) -> list[tuple[int, np.ndarray]]:
    """Where each file's rows of ``token`` fall among the gather's rows of it, which are in
    occurrence order (file order for the original's files): (file's place in the group,
    positions)."""
    having = [f for f, s in enumerate(group) if token in s.counts]
    sizes = [group[f].counts[token] for f in having]
    positions = np.arange(sum(sizes))
    if having and all(group[f].occurrences is not None for f in having):
        order = np.argsort(np.concatenate([group[f].occurrences[token] for f in having]), kind="stable")
        positions[order] = np.arange(len(order))
    return list(zip(having, np.split(positions, np.cumsum(sizes)[:-1]) if having else []))


def place_rows(groups: Sequence[Sequence[Source]], cap: int, seed: int) -> tuple[np.ndarray, list, int]:
    """The row file's layout: its token table ((T, 3): id, first row, end row), each input
    file's ``{token: row of each of its rows}`` (-1: dropped by the cap), tokens capped."""
    places = [[{} for _ in group] for group in groups]
    table, start, capped = [], 0, 0
    for token in sorted({t for group in groups for s in group for t in s.counts}):
        parts, n = [], 0  # gathers follow each other in input order
        for g, group in enumerate(groups):
            for f, positions in token_positions(group, token):
                parts.append((places[g][f], positions + n))
            n += sum(s.counts.get(token, 0) for s in group)
        slot = np.arange(n)
        if n > cap:
            keep = np.sort(np.random.default_rng([seed, token]).choice(n, cap, replace=False))
            slot = np.full(n, -1)
            slot[keep], capped = np.arange(cap), capped + 1
        for file_places, positions in parts:
            file_places[token] = np.where(slot[positions] >= 0, slot[positions] + start, -1)
        table.append((token, start, start + min(n, cap)))
        start += min(n, cap)
    return np.array(table, dtype=np.int64).reshape(-1, 3), places, capped


def combine(groups: Sequence[Sequence[Path]], cap: int, seed: int, output: Path, config: Mapping,
            inputs: Mapping[str, Path], combined_pickle: str = "auto") -> dict:
    """Merge gathers (each a list of rank files) into ``output``'s files, each token capped at
    ``cap`` rows (module docstring); returns the metadata: teacher, hidden_size, dtype, rows,
    token_ids, capped, and how the states were gathered."""
    if cap < 1:
        raise UserError(f"--cap must be >= 1, got {cap}")
    sources = [[describe_source(path) for path in group] for group in groups]
    check_compatible([s for group in sources for s in group])
    for group in sources:
        check_complete(group)
        log.info("combine: %s: %d file(s), %d rows", group[0].path.parent, len(group),
                 sum(n for s in group for n in s.counts.values()))
    table, places, capped = place_rows(sources, cap, seed)
    first = sources[0][0]
    teachers = {s.teacher for group in sources for s in group} - {None}
    meta = {"teacher": next(iter(teachers), None), "hidden_size": first.hidden_size,
            "dtype": first.dtype, "rows": int(table[-1, 2]) if len(table) else 0,
            "token_ids": len(table), "capped": capped,
            **gathered_with([s.gather for group in sources for s in group])}

    def fill(fh, header: int) -> None:  # a block of one token's rows in memory at a time
        for source, file_places in ((s, p) for group, ps in zip(sources, places) for s, p in zip(group, ps)):
            with stream_source(source.path) as (loaded, states):
                if loaded.counts != source.counts:
                    raise UserError(f"{source.path} changed while it was being combined; run the combine again")
                for token, rows in states.items():
                    for start, block in row_blocks(rows):
                        check_finite(source.path, token, block)
                        block_places = file_places[token][start:start + len(block)]
                        kept = block_places >= 0
                        write_rows(fh, header, np.asarray(block[kept], dtype=meta["dtype"]), block_places[kept])

    write_outputs(output, table, meta, fill, config, inputs, combined_pickle)
    return meta


def gathered_with(gather_configs: Sequence[Mapping | None]) -> dict:
    """The max length and input format the states were gathered with (recorded down to the
    sense dictionary, whose users check them); None where the inputs disagree or do not say."""
    settings = {}
    for key in ("max_length", "input_format"):
        values = {config.get(key) if config else None for config in gather_configs}
        settings[key] = values.pop() if len(values) == 1 else None
    return settings


def tokens_path(combined: Path) -> Path:
    """Where each token's rows are in the row file: ``combined.tokens.npy``."""
    return combined.with_suffix(".tokens.npy")


def combined_artifact(path: Path) -> Path:
    """The file that stands for combined.pkl's states: the pickle, or where the combine wrote
    none (``--combined-pickle``), its row file, whose manifest then says what it holds."""
    if not path.exists() and (read_manifest(rows_path(path)) or {}).get("stage") == "combine":
        return rows_path(path)
    return path


def done_markers(output: Path, combined_pickle: str) -> list[Path]:
    """The files whose manifest can tell that the combine into ``output`` is done under
    ``--combined-pickle combined_pickle``: combined.pkl where it is wanted, the row file where not."""
    return {"always": [output], "never": [rows_path(output)], "auto": [output, rows_path(output)]}[combined_pickle]


def write_combined(combined: Mapping[int, np.ndarray], meta: dict, output: Path, config: Mapping,
                   inputs: Mapping[str, Path], combined_pickle: str = "always") -> None:
    """``output``'s files (:func:`write_outputs`) of states already in memory
    ``{token_id: (n, d) array}`` (e.g. synthetic ones)."""
    tokens = sorted(combined)
    sizes = np.array([len(combined[t]) for t in tokens], dtype=np.int64)
    ends = np.cumsum(sizes)
    table = np.column_stack([np.array(tokens, dtype=np.int64), ends - sizes, ends]).reshape(-1, 3)

    def fill(fh, header: int) -> None:
        for token, start in zip(tokens, ends - sizes):
            write_rows(fh, header, np.asarray(combined[token], dtype=meta["dtype"]),
                       np.arange(start, start + len(combined[token])))

    write_outputs(output, table, meta, fill, config, inputs, combined_pickle)


def write_outputs(output: Path, table: np.ndarray, meta: dict, fill: Callable, config: Mapping,
                  inputs: Mapping[str, Path], combined_pickle: str) -> None:
    """The row file (``fill(fh, header)`` writes its rows), the token table, combined.pkl unless
    ``combined_pickle`` skips it, then the manifest (teacher, hidden size, dtype, and what ties the files
    together, in ``extra``) beside combined.pkl, or beside the row file without a pickle."""
    if combined_pickle not in PICKLE_MODES:
        raise UserError(f"--combined-pickle must be one of {', '.join(PICKLE_MODES)}, got {combined_pickle!r}")
    dtype = np.dtype(meta["dtype"])
    shape = (int(table[-1, 2]) if len(table) else 0, int(meta["hidden_size"]))
    size = shape[0] * shape[1] * dtype.itemsize
    with_pickle = combined_pickle == "always" or (combined_pickle == "auto" and size <= PICKLE_AUTO_BYTES)
    with atomic_open(rows_path(output), "wb") as fh:
        header = start_row_file(fh, shape, dtype)
        fill(fh, header)  # a bad input file stops it here: the previous outputs stay as they were
        for marker in (output, rows_path(output)):  # no manifest says "done" while the files change
            manifest_path(marker).unlink(missing_ok=True)
    with atomic_open(tokens_path(output), "wb") as fh:
        np.save(fh, table, allow_pickle=False)
    files = {"rows_file": rows_path(output).name, "rows_shape": list(shape),
             "tokens_file": tokens_path(output).name, "tokens_sha256": fingerprint(tokens_path(output))}
    if with_pickle:
        save_mapped_pickle(output, rows_path(output), header, shape, dtype, table)
        files["pickle_sha256"], marker = fingerprint(output), output
    else:
        why = "--combined-pickle never" if combined_pickle == "never" else \
            f"over --combined-pickle auto's {PICKLE_AUTO_BYTES >> 30} GiB"
        log.info("combine: no %s (%.1f GiB of rows, %s; --combined-pickle always writes it): the "
                 "cluster stage reads %s", output.name, size / (1 << 30), why, rows_path(output).name)
        output.unlink(missing_ok=True)
        files["rows_sha256"], marker = fingerprint(rows_path(output)), rows_path(output)
    write_manifest(marker, stage="combine", config=config, inputs=inputs, extra={**meta, "files": files})


class TokenRows(Mapping):
    """``{token_id: (n, d) rows}`` read from the memory-mapped row file: looking a token up
    maps its rows (a read-only view, read from disk on first use), so a process that clusters
    a share of the tokens reads only that share."""

    def __init__(self, rows: np.ndarray, table: np.ndarray):
        self.rows = rows
        self.where = {int(t): (int(a), int(b)) for t, a, b in table}

    def __getitem__(self, token: int) -> np.ndarray:
        start, end = self.where[token]
        return np.asarray(self.rows[start:end])  # a plain ndarray view (pickles as one)

    def release(self) -> None:
        """Drop the rows read so far from this process's resident memory: mapped pages count
        in its RSS until then, though the kernel may reclaim them (they stay in the page cache,
        and a token used again is read from there)."""
        self.rows._mmap.madvise(mmap.MADV_DONTNEED)  # np.load(mmap_mode="r")'s mapping

    def __iter__(self) -> Iterator[int]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def open_combined(path: Path, fingerprint_of_path: str) -> TokenRows | None:
    """The states of combined.pkl (``path``) per token from its row file, when its manifest
    names the row file and token table, the pickle is the one they were written with (its
    fingerprint) and the files agree; else None (read the pickle instead). ``path`` may be the
    row file of a combine that wrote no pickle (:func:`combined_artifact`): it must be the one
    its manifest describes."""
    files = ((read_manifest(path) or {}).get("extra") or {}).get("files")
    rows_only = bool(files) and path.name == files.get("rows_file")
    if rows_only and files.get("rows_sha256") != fingerprint_of_path:
        raise UserError(f"{path} is not the row file its manifest describes (replaced?); rerun "
                        "a0_generate_combinepkl.py with --overwrite")
    if not files or (not rows_only and files.get("pickle_sha256") != fingerprint_of_path):
        return None
    rows_file, table_file = path.with_name(files["rows_file"]), path.with_name(files["tokens_file"])
    if not rows_file.is_file() or not table_file.is_file() or fingerprint(table_file) != files["tokens_sha256"]:
        raise UserError(f"{path}: its row file or token table is missing or was replaced; rerun "
                        "a0_generate_combinepkl.py with --overwrite")
    try:
        rows = np.load(rows_file, mmap_mode="r", allow_pickle=False)
        table = np.load(table_file, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{rows_file}: unreadable ({exc}); rerun a0_generate_combinepkl.py with --overwrite") from None
    if list(rows.shape) != files["rows_shape"] or str(rows.dtype) not in STATE_DTYPES or not _covers(table, len(rows)):
        raise UserError(f"{rows_file} and {table_file} do not describe {path}; rerun "
                        "a0_generate_combinepkl.py with --overwrite")
    return TokenRows(rows, table)


def _covers(table: np.ndarray, n_rows: int) -> bool:
    """A token table of ascending non-negative ids whose non-empty row ranges tile [0, n_rows)."""
    if table.ndim != 2 or table.shape[1] != 3 or table.dtype != np.int64:
        return False
    ids, starts, ends = table.T
    return bool((ids >= 0).all() and (np.diff(ids) > 0).all() and (ends > starts).all()
                and (starts[1:] == ends[:-1]).all()
                and (starts[0] == 0 and ends[-1] == n_rows if len(table) else n_rows == 0))
