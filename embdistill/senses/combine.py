"""Merge gathered states of several ranks and tasks into one ``{token_id: (n, d) array}``.

Inputs are rank files (``rank<R>.pkl``), gather folders, or anything else a caller resolves to
those. Rank files from one folder form one gather: all of its ranks must be present, and their
rows are put in occurrence order (``rank<R>.index.pkl``), so the result does not depend on how
many ranks gathered. Gathers follow each other in the order given. A token with more than
``cap`` rows keeps ``cap`` of them, chosen by an RNG keyed by (seed, token id), in order.

The original's rank pickles (a bare dict, no manifest, no index) are read too: their rows keep
file order, their hidden size and dtype come from the arrays. Inputs whose teacher, hidden size
or dtype differ are refused.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..artifacts import load_pickle, read_manifest, save_pickle, write_manifest
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


def read_source(path: Path) -> Source:
    """Load one gathered file and check its shape; UserError naming the file otherwise."""
    states = load_pickle(path)
    if not isinstance(states, dict):
        raise UserError(f"{path}: expected a dict token_id -> (n, d) array, got {type(states).__name__}")
    widths, dtypes = set(), set()
    for token, rows in states.items():
        if not isinstance(token, (int, np.integer)) or not isinstance(rows, np.ndarray) or rows.ndim != 2:
            raise UserError(f"{path}: expected a dict token_id -> (n, d) array; entry {token!r} is not")
        widths.add(rows.shape[1])
        dtypes.add(str(rows.dtype))
    if len(widths) > 1 or len(dtypes) > 1:
        raise UserError(f"{path}: arrays of several widths or dtypes ({sorted(widths)}, {sorted(dtypes)})")
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


def write_combined(combined: dict, meta: dict, output: Path, config: Mapping,
                   inputs: Mapping[str, Path]) -> None:
    """combined.pkl then its manifest (teacher, hidden size, dtype in ``extra``)."""
    save_pickle(combined, output)
    write_manifest(output, stage="combine", config=config, inputs=inputs, extra=meta)
