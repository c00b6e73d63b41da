"""Stages 1 and 2 of SKD: count text tokens, then gather sampled teacher states for every token.

Count (``counts.pkl``): occurrences of each token id over the task's training texts, text
tokens only (embed_mask == 1), with the same tokenisation and truncation as the gather.

Gather (``gather/rank<R>.pkl``): the teacher's final hidden state at text tokens, an occurrence
kept by the original's rule ``randint(0, count) < per_token``: every occurrence of a token seen
at most ``per_token`` times, about ``per_token`` of the others. The original drew from one RNG
in visiting order, so its sample changed with the number of GPUs; here each text's draws come
from an RNG keyed by (seed, text index), so 1 or N processes keep exactly the same occurrences.

Each rank gathers its shard of texts in parts of ``flush_every`` texts. Selected rows stay on
the device (one boolean-mask index per batch; the original copied every vector to the CPU in a
Python loop) and move to the CPU in blocks of ``buffer_rows``. A finished part is written
atomically (``rank<R>.pkl.parts/rank<R>.part<NNNNN>.npz`` + manifest, :class:`~embdistill.artifacts.PartFiles`), so
memory stays bounded and a killed run resumes from its finished parts; after each part the
heap's free pages go back to the system (:func:`embdistill.heap.release_free_heap`: batches of
varied shapes fragment it, and a CPU gather's peak grew with the number of batches). At the end the parts are merged into ``rank<R>.pkl`` =
{token_id: (n, d) array} and ``rank<R>.index.pkl`` = {token_id: int64 occurrence ids
``text_idx * max_length + position``}, rows in occurrence order, and the parts are deleted.
The merge never holds the rank's states: it writes each part's rows to their places in a row
file (``rank<R>.rows.npy``, deleted once done) and pickles from its memory map, so the
gather's memory is bounded by a part, the device buffer and a batch (plus 32 bytes of ids
per kept row), not by the kept states.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..artifacts import PartFiles, atomic_open, fingerprint, load_pickle, manifest_path, read_manifest, save_pickle, write_manifest
from ..distributed import DistEnv, shard
from ..errors import UserError
from ..heap import release_free_heap
from ..input_format import effective_max_length
from .rowfile import rows_path, save_mapped_pickle, start_row_file, write_rows

log = logging.getLogger("embdistill.gather")

Tokenize = Callable[[Sequence[str], int], Mapping[str, torch.Tensor]]

OUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}

# ----------------------------------------------------------------------------- counting


def count_tokens(
    tokenize: Tokenize, texts: Sequence[str], max_length: int, batch_size: int = 512,
    progress: bool = True,
) -> dict[int, int]:
    """Occurrences of each token id among the text tokens of ``texts`` (sorted by id)."""
    counts: Counter[int] = Counter()
    for start in tqdm(range(0, len(texts), batch_size), desc="count", unit="batch",
                      disable=not progress):
        batch = tokenize(texts[start : start + batch_size], max_length)
        text_tokens = batch["input_ids"][batch["embed_mask"].bool() & batch["attention_mask"].bool()]
        ids, n = torch.unique(text_tokens, return_counts=True)
        counts.update(dict(zip(ids.tolist(), n.tolist())))
    return dict(sorted(counts.items()))


def count_config(teacher: str, max_length: int, input_format: str = "plain") -> dict:
    """What counts.pkl depends on (besides train.json): the tokenizer, the input format and
    the truncation."""
    return {"teacher": teacher, "max_length": max_length, "input_format": input_format}


def load_counts(path: Path, max_length: int, model_limit: int) -> dict[int, int]:
    """counts.pkl, checked to have been counted with the same truncation as the gather:
    ``max_length`` tokens, the gather's --max-length cut to the teacher's ``model_limit``."""
    if not path.is_file():
        raise UserError(f"missing {path}: run scripts/01_count.py first")
    manifest = read_manifest(path)
    counted_at = (manifest or {}).get("config", {}).get("max_length")
    # counts made before the length used was recorded hold the --max-length asked for: the
    # same teacher's limit cuts it to what they used (see check_gathered_with)
    if counted_at is not None and effective_max_length(counted_at, model_limit) != max_length:
        raise UserError(
            f"{path} was counted with --max-length {counted_at}, the gather uses {max_length}; "
            f"rerun scripts/01_count.py --max-length {max_length} --overwrite"
        )
    counts = load_pickle(path)
    if not isinstance(counts, dict) or not counts:
        raise UserError(f"{path}: expected a non-empty dict token_id -> count")
    return counts


def count_table(counts: Mapping[int, int]) -> np.ndarray:
    """Counts as a dense array indexed by token id (0 for tokens never counted)."""
    table = np.zeros(max(counts) + 1, dtype=np.int64)
    table[np.fromiter(counts.keys(), dtype=np.int64)] = np.fromiter(counts.values(), dtype=np.int64)
    return table


def keep_occurrences(
    token_ids: np.ndarray, table: np.ndarray, per_token: int, seed: int, text_idx: int
) -> np.ndarray:
    """Which occurrences of one text's tokens (in text order) to keep.

    ``randint(0, count) < per_token`` per occurrence (numpy's upper bound is exclusive, so a
    token keeps ``per_token`` occurrences in expectation and all of them when count <=
    per_token). The draws come from an RNG keyed by (seed, text index): the decision does not
    depend on ranks, batches or the order texts are visited in."""
    counted = token_ids < len(table)
    counts = table[np.where(counted, token_ids, 0)]
    if not counted.all() or (counts == 0).any():
        raise UserError(
            f"text {text_idx} has tokens missing from counts.pkl: counts and train.json disagree; "
            "rerun scripts/01_count.py --overwrite"
        )
    rng = np.random.default_rng([seed, text_idx])
    return rng.integers(0, counts) < per_token


# ----------------------------------------------------------------------------- gathering


@dataclass(frozen=True)
class GatherConfig:
    """Everything the gathered sample depends on (batch size and buffer size do not)."""

    teacher: str
    max_length: int = 512  # the length used: --max-length cut to the teacher's (effective_max_length)
    per_token: int = 1000
    seed: int = 0
    dtype: str = "float16"
    input_format: str = "plain"  # the teacher's (embdistill.input_format): what its states saw

    def __post_init__(self):
        if self.dtype not in OUT_DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(OUT_DTYPES)}, got '{self.dtype}'")
        if self.per_token < 1 or self.max_length < 2:
            raise UserError("--per-token must be >= 1 and --max-length >= 2")

    def rank_config(self, env: DistEnv) -> dict:
        return {**asdict(self), "world_size": env.world_size, "rank": env.rank}


def index_path(rank_file: Path) -> Path:
    """Occurrence ids of a rank file's rows: ``rank<R>.index.pkl`` beside ``rank<R>.pkl``."""
    return rank_file.with_name(f"{rank_file.stem}.index.pkl")


class RowBuffer:
    """Selected rows kept on the device and moved to the CPU in blocks of >= ``flush_rows``:
    one transfer per block instead of one per token."""

    def __init__(self, hidden_size: int, dtype: str, flush_rows: int):
        self.hidden_size, self.dtype, self.flush_rows = hidden_size, OUT_DTYPES[dtype], flush_rows
        self.np_dtype = np.dtype(dtype)
        self.pending: list[torch.Tensor] = []
        self.pending_rows = 0
        self.blocks: list[np.ndarray] = []

    def add(self, rows: torch.Tensor) -> None:
        self.pending.append(rows.to(self.dtype))
        self.pending_rows += len(rows)
        if self.pending_rows >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        block = torch.cat(self.pending)  # a fresh tensor: on the CPU .cpu() below is no copy
        if not torch.isfinite(block).all():
            if torch.isnan(block).any():  # the cast makes infinities, never NaN: the teacher did
                raise UserError("the teacher's states hold NaN (not an overflow of --dtype): check its "
                                "weights, or load it in float32 (--teacher-dtype float32)")
            raise UserError(f"teacher states overflow {self.np_dtype} (--dtype); rerun with --dtype float32")
        self.blocks.append(block.cpu().numpy())
        self.pending, self.pending_rows = [], 0

    def take(self) -> np.ndarray:
        """All rows so far as one (n, d) array; empties the buffer."""
        self.flush()
        rows = (np.concatenate(self.blocks) if self.blocks
                else np.empty((0, self.hidden_size), dtype=self.np_dtype))
        self.blocks = []
        return rows


@torch.inference_mode()
def gather_texts(
    teacher, texts: Sequence[str], text_indices: Sequence[int], table: np.ndarray,
    cfg: GatherConfig, *, batch_size: int, buffer_rows: int, progress: tqdm | None = None,
) -> dict[str, np.ndarray]:
    """Sampled states of ``texts`` (global indices ``text_indices``): a dict of
    ``text_indices``, ``token_ids``, ``occurrence_ids`` (n,) and ``states`` (n, d), rows in no
    particular order (the merge sorts them)."""
    batch = teacher.tokenize(list(texts), cfg.max_length)  # one call: fast tokenizers batch well
    input_ids, attention = batch["input_ids"], batch["attention_mask"].bool()
    text_mask = batch["embed_mask"].bool() & attention
    # Position within the text, not within the padded row: the same under left padding too.
    positions = attention.long().cumsum(1) - 1
    occurrence_ids = torch.as_tensor(text_indices, dtype=torch.long)[:, None] * cfg.max_length + positions

    keep = torch.zeros_like(text_mask)
    for row, text_idx in enumerate(text_indices):
        cols = text_mask[row].nonzero().squeeze(1)
        kept = keep_occurrences(input_ids[row, cols].numpy(), table, cfg.per_token, cfg.seed, text_idx)
        keep[row, cols[torch.from_numpy(kept)]] = True

    # Texts with nothing to keep need no forward pass; the rest go shortest first, so that
    # each batch pads little.
    rows_to_run = keep.any(1).nonzero().squeeze(1)
    rows_to_run = rows_to_run[torch.argsort(attention[rows_to_run].sum(1), stable=True)]
    buffer = RowBuffer(teacher.hidden_size, cfg.dtype, buffer_rows)
    token_ids, occurrences = [], []
    for start in range(0, len(rows_to_run), batch_size):
        rows = rows_to_run[start : start + batch_size]
        cols = attention[rows].any(0)  # drop columns that are padding in every row
        sub = {key: value[rows][:, cols] for key, value in batch.items()}
        sub_keep = keep[rows][:, cols]
        states = teacher.token_states(sub)
        buffer.add(states[sub_keep.to(states.device)])
        token_ids.append(sub["input_ids"][sub_keep])
        occurrences.append(occurrence_ids[rows][:, cols][sub_keep])
        if progress is not None:
            progress.update(len(rows))
    if progress is not None:  # texts that were skipped count as done
        progress.update(len(texts) - len(rows_to_run))
    empty = torch.empty(0, dtype=torch.long)
    return {
        "text_indices": np.asarray(text_indices, dtype=np.int64),
        "token_ids": torch.cat(token_ids or [empty]).numpy().astype(np.int64),
        "occurrence_ids": torch.cat(occurrences or [empty]).numpy().astype(np.int64),
        "states": buffer.take(),
    }


def merge_parts(parts: PartFiles, count: int, rows_file: Path, hidden_size: int,
                dtype: str) -> tuple[dict, np.ndarray, int]:
    """The ``count`` parts' rows grouped by token id, each token's rows in occurrence order,
    written to the row file ``rows_file``: ({token_id: (n,) int64 occurrence ids}, its token
    table ((T, 3): id, first row, end row), the length of its header).

    Memory: a part (twice), and 32 bytes per row, never the rank's states: the parts' ids are
    read first (not their states), which place every row; then each part's states are written
    to their places and dropped."""
    ids = [parts.load(p, ["token_ids", "occurrence_ids"]) for p in range(count)]
    empty = np.empty(0, dtype=np.int64)
    token_ids = np.concatenate([part["token_ids"] for part in ids] or [empty])
    occurrences = np.concatenate([part["occurrence_ids"] for part in ids] or [empty])
    del ids
    order = np.lexsort((occurrences, token_ids))
    destination = np.empty_like(order)
    destination[order] = np.arange(len(order))
    shape, np_dtype = (len(order), hidden_size), np.dtype(dtype)
    with atomic_open(rows_file, "wb") as fh:
        header = start_row_file(fh, shape, np_dtype)
        start = 0
        for p in range(count):
            part_states = parts.load(p, ["states"])["states"]
            places = destination[start : start + len(part_states)]
            by_place = np.argsort(places)
            write_rows(fh, header, part_states[by_place], places[by_place])
            start += len(part_states)
            del part_states
    del destination
    token_ids, occurrences = token_ids[order], occurrences[order]
    tokens, starts = np.unique(token_ids, return_index=True)
    ends = np.append(starts[1:], len(token_ids)) if len(tokens) else starts  # no rows: a rank with no texts
    index_by_token = {int(t): occurrences[a:b] for t, a, b in zip(tokens, starts, ends)}
    return index_by_token, np.column_stack([tokens, starts, ends]).astype(np.int64).reshape(-1, 3), header


def gather_shard(
    teacher, texts: Sequence[str], counts: Mapping[int, int], rank_file: Path,
    cfg: GatherConfig, env: DistEnv, *, inputs: Mapping[str, Path], batch_size: int = 16,
    flush_every: int = 256, buffer_rows: int = 16384, overwrite: bool = False,
) -> dict:
    """Gather this rank's shard of ``texts`` into ``rank_file`` (resuming finished parts
    unless ``overwrite``); returns a summary dict."""
    if batch_size < 1 or flush_every < 1 or buffer_rows < 1:
        raise UserError("--batch-size, --flush-every and --buffer-rows must be >= 1")
    started = time.perf_counter()
    rank_file.parent.mkdir(parents=True, exist_ok=True)
    # An earlier result is replaced, not kept beside new parts: killed from here on, the rank
    # has no file at all, which the combine reports, instead of an old one that looks fine.
    for old in (rank_file, index_path(rank_file)):
        manifest_path(old).unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    rows_path(rank_file).unlink(missing_ok=True)  # left by a run killed while pickling

    config = cfg.rank_config(env)
    input_fingerprints = {key: fingerprint(path) for key, path in inputs.items()}
    table = count_table(counts)
    indices = shard(list(range(len(texts))), env)
    chunks = [indices[i : i + flush_every] for i in range(0, len(indices), flush_every)]
    parts = PartFiles.beside(rank_file, {**config, "flush_every": flush_every, "inputs": input_fingerprints})
    if overwrite:
        parts.clear()
    done = [parts.done(p) for p in range(len(chunks))]
    resumed_texts = sum(len(c) for c, d in zip(chunks, done) if d)
    if any(done):
        log.info("rank %d: resuming, %d of %d parts (%d texts) already gathered",
                 env.rank, sum(done), len(chunks), resumed_texts)

    log.info("gather rank %d/%d: %d of %d texts in %d parts, teacher %s (%d-d, %s on %s), "
             "per token %d, seed %d -> %s", env.rank, env.world_size, len(indices), len(texts),
             len(chunks), teacher.slug, teacher.hidden_size, teacher.dtype,
             teacher.device, cfg.per_token, cfg.seed, rank_file)
    with tqdm(total=len(indices), initial=resumed_texts, desc=f"gather rank {env.rank}",
              unit="text", disable=not env.is_main) as progress:
        for p, (chunk, finished) in enumerate(zip(chunks, done)):
            if not finished:
                parts.write(p, gather_texts(teacher, [texts[i] for i in chunk], chunk, table, cfg,
                                            batch_size=batch_size, buffer_rows=buffer_rows, progress=progress))
                release_free_heap()  # the part's batches fragment the heap (embdistill.heap)

    # The rank's states go through a row file: the pickle is written from its memory map
    # (save_mapped_pickle: the same bytes as pickling the dict from memory), which is then
    # deleted. Held at once: a part and the rows' ids, not the rank's states.
    rows_file = rows_path(rank_file)
    index_by_token, table, header = merge_parts(parts, len(chunks), rows_file, teacher.hidden_size, cfg.dtype)
    n_rows = int(table[-1, 2]) if len(table) else 0
    summary = {
        "rank": env.rank, "world_size": env.world_size, "texts": len(indices),
        "texts_resumed": resumed_texts, "parts": len(chunks), "token_ids": len(table),
        "rows": n_rows, "hidden_size": teacher.hidden_size, "dtype": cfg.dtype,
        "seconds": round(time.perf_counter() - started, 2),
    }
    extra = {"teacher": teacher.slug, "hidden_size": teacher.hidden_size, "dtype": cfg.dtype,
             "rows": n_rows, "token_ids": len(table), "texts": len(indices)}
    # Index first, states last, manifests after each: a manifest beside rank<R>.pkl means
    # both files are complete.
    save_pickle(index_by_token, index_path(rank_file))
    write_manifest(index_path(rank_file), stage="gather", config=config, inputs=inputs, extra=extra)
    save_mapped_pickle(rank_file, rows_file, header, (n_rows, teacher.hidden_size), np.dtype(cfg.dtype), table)
    write_manifest(rank_file, stage="gather", config=config, inputs=inputs, extra=extra)
    rows_file.unlink()
    parts.clear()
    return summary
