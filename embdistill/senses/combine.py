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

Output: ``combined.pkl`` (``{token_id: (n, d) array}``, the original's format) and beside it the
same rows for reading per token without loading the whole file: ``combined.rows.npy`` (every
row, token after token in id order, one contiguous array that ``np.load(mmap_mode="r")`` maps)
and ``combined.tokens.npy`` ((T, 3) int64: token id, first row, end row). The manifest of
combined.pkl records the pickle's sha256 and the two files' shapes; :func:`open_combined` uses
them only while the pickle still matches, so each clustering process reads just its tokens' rows
and host memory does not grow with the number of processes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import atomic_open, fingerprint, load_pickle, read_manifest, save_pickle, write_manifest
from ..errors import UserError
from .gather import index_path

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
    """One input file, its states and (when gathered by us) its rows' occurrence ids."""

    path: Path
    states: dict[int, np.ndarray]
    occurrences: dict[int, np.ndarray] | None
    teacher: str | None
    hidden_size: int
    dtype: str
    gather: Mapping | None  # the gather config of a rank file (None for other inputs)


STATE_DTYPES = ("float16", "float32", "float64")


def check_rows(path: Path, token, rows) -> None:
    """One entry of a states file: a non-negative token id -> finite (n >= 1, d) float array;
    UserError naming the file and the token otherwise."""
    if not isinstance(token, (int, np.integer)) or isinstance(token, bool) or token < 0:
        raise UserError(f"{path}: token id {token!r} is not a non-negative integer")
    if not isinstance(rows, np.ndarray) or rows.ndim != 2 or not len(rows):
        shape = getattr(rows, "shape", type(rows).__name__)
        raise UserError(f"{path}: expected a dict token_id -> (n, d) array; entry {token!r} is not "
                        f"(it is {shape})")
    if str(rows.dtype) not in STATE_DTYPES:
        raise UserError(f"{path}: the states of token {token} are {rows.dtype}, not one of "
                        f"{', '.join(STATE_DTYPES)}")
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


def read_source(path: Path) -> Source:
    """Load one gathered file and check it (:func:`check_states`); UserError naming the file
    otherwise."""
    states = load_pickle(path)
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
    gather = manifest.get("config") if manifest.get("stage") == "gather" else None
    occurrences = None
    if gather is not None:
        occurrences = load_pickle(index_path(path))
        if not isinstance(occurrences, dict) or any(
            len(occurrences.get(t, ())) != len(rows) for t, rows in states.items()
        ):
            raise UserError(f"{index_path(path)} does not match {path}; rerun the gather with --overwrite")
    return Source(path, {int(t): rows for t, rows in states.items()}, occurrences,
                  extra.get("teacher"), int(hidden_size), str(dtype), gather)


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


def token_rows(group: Sequence[Source], token: int) -> np.ndarray | None:
    """One gather's rows of ``token`` in occurrence order (file order for the original's
    files); None when the gather never kept it."""
    parts = [s for s in group if token in s.states]
    if not parts:
        return None
    rows = np.concatenate([s.states[token] for s in parts])
    if all(s.occurrences is not None for s in parts):
        rows = rows[np.argsort(np.concatenate([s.occurrences[token] for s in parts]), kind="stable")]
    return rows


def combine(groups: Sequence[Sequence[Path]], cap: int, seed: int) -> tuple[dict, dict]:
    """Merge gathers (each a list of rank files) into {token_id: (<= cap, d) array}; returns
    (combined, metadata: teacher, hidden_size, dtype, rows, token_ids, capped)."""
    if cap < 1:
        raise UserError(f"--cap must be >= 1, got {cap}")
    sources = [[read_source(path) for path in group] for group in groups]
    check_compatible([s for group in sources for s in group])
    for group in sources:
        check_complete(group)
        log.info("combine: %s: %d file(s), %d rows", group[0].path.parent, len(group),
                 sum(len(rows) for s in group for rows in s.states.values()))
    combined, capped = {}, 0
    for token in sorted({t for group in sources for s in group for t in s.states}):
        rows = np.concatenate([r for group in sources if (r := token_rows(group, token)) is not None])
        if len(rows) > cap:
            keep = np.sort(np.random.default_rng([seed, token]).choice(len(rows), cap, replace=False))
            rows, capped = rows[keep], capped + 1
        combined[token] = rows
        for source in (s for group in sources for s in group):  # free inputs as we go: peak
            source.states.pop(token, None)                     # memory stays near one copy
    first = sources[0][0]
    teachers = {s.teacher for group in sources for s in group} - {None}
    meta = {"teacher": next(iter(teachers), None), "hidden_size": first.hidden_size,
            "dtype": first.dtype, "rows": sum(len(r) for r in combined.values()),
            "token_ids": len(combined), "capped": capped,
            **gathered_with([s.gather for group in sources for s in group])}
    return combined, meta


def gathered_with(gather_configs: Sequence[Mapping | None]) -> dict:
    """The max length and input format the states were gathered with (recorded down to the
    sense dictionary, whose users check them); None where the inputs disagree or do not say."""
    settings = {}
    for key in ("max_length", "input_format"):
        values = {config.get(key) if config else None for config in gather_configs}
        settings[key] = values.pop() if len(values) == 1 else None
    return settings


def rows_path(combined: Path) -> Path:
    """Every row of combined.pkl in one array: ``combined.rows.npy``."""
    return combined.with_suffix(".rows.npy")


def tokens_path(combined: Path) -> Path:
    """Where each token's rows are in the row file: ``combined.tokens.npy``."""
    return combined.with_suffix(".tokens.npy")


def write_combined(combined: dict, meta: dict, output: Path, config: Mapping,
                   inputs: Mapping[str, Path]) -> None:
    """The row file and token table, combined.pkl, then its manifest (teacher, hidden size,
    dtype, and what ties the three files together, in ``extra``). Rows are written token by
    token: no second copy of the states is made."""
    tokens = sorted(combined)
    sizes = np.array([len(combined[t]) for t in tokens], dtype=np.int64)
    ends = np.cumsum(sizes)
    table = np.column_stack([np.array(tokens, dtype=np.int64), ends - sizes, ends])
    dtype = np.dtype(meta["dtype"])
    shape = (int(sizes.sum()), int(meta["hidden_size"]))
    with atomic_open(rows_path(output), "wb") as fh:
        np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": shape})
        for token in tokens:
            fh.write(np.ascontiguousarray(combined[token], dtype=dtype).tobytes())
    with atomic_open(tokens_path(output), "wb") as fh:
        np.save(fh, table, allow_pickle=False)
    save_pickle(combined, output)
    files = {"pickle_sha256": fingerprint(output), "rows_file": rows_path(output).name,
             "rows_shape": list(shape), "tokens_file": tokens_path(output).name,
             "tokens_sha256": fingerprint(tokens_path(output))}
    write_manifest(output, stage="combine", config=config, inputs=inputs, extra={**meta, "files": files})


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

    def __iter__(self) -> Iterator[int]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def open_combined(path: Path, pickle_sha256: str) -> TokenRows | None:
    """combined.pkl's rows per token from its row file, when its manifest names the row file
    and token table, the pickle is the one they were written with (``pickle_sha256``, its
    fingerprint) and the files agree; else None (read the pickle instead)."""
    files = ((read_manifest(path) or {}).get("extra") or {}).get("files")
    if not files or files.get("pickle_sha256") != pickle_sha256:
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
