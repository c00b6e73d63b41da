"""Teacher embedding shards: writing, resuming, text-id alignment, validation.

One teacher's embeddings of one corpus live in ``Paths.embeddings_dir(teacher)``::

    shard-<i>.npy                  (n_i, d) float16: the corpus texts [i*S, (i+1)*S)
    shard-<i>.ids.npy              (n_i,) int64: the stable id of each row's text
    shard-<i>.npy.manifest.json    written last: teacher, corpus, shard, sha256 of both files
    index.json (+ manifest)        written once every shard is in: teacher, dim, counts

The layout depends only on the corpus and the shard size S, never on the number of
processes: shard i is written by rank ``i % world_size``, so a run resumed with another
world size reuses every finished shard. A text's id is the first 8 bytes of the sha256 of
its UTF-8 bytes (:func:`text_id`); readers pair texts with vectors by that id, never by
position, and refuse shards whose ids are missing or duplicated, whose dimensions disagree
or whose bytes differ from the checksums in their manifests.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from ..artifacts import (atomic_open, fingerprint, is_done, load_json, manifest_path,
                         read_manifest, save_json, write_manifest)
from ..distributed import DistEnv, dist_env, shard
from ..errors import UserError

log = logging.getLogger("embdistill.multiteacher.shards")

INDEX_NAME = "index.json"
_SHARD_NAME = re.compile(r"^shard-(\d+)\.npy$")
_STAGE = "teacher_embeddings"


class Encoder(Protocol):
    """What the shard writer needs of a teacher (``SentenceTeacher`` and ``LsaModel`` both fit;
    an encoder teacher's length limit is set when it loads)."""

    def encode(self, texts: list[str], batch_size: int, progress: bool) -> np.ndarray: ...


def text_id(text: str) -> int:
    """The stable id of a text: its sha256's first 8 bytes as a signed 64-bit integer."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big", signed=True)


def text_ids(texts: list[str]) -> np.ndarray:
    return np.fromiter((text_id(t) for t in texts), dtype=np.int64, count=len(texts))


def corpus_key(ids: np.ndarray) -> str:
    """Identifies a corpus's texts *and order* (the shard layout depends on both)."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


def shard_files(folder: Path, index: int) -> tuple[Path, Path]:
    """(vectors, ids) of shard ``index``."""
    return folder / f"shard-{index}.npy", folder / f"shard-{index}.ids.npy"


def _checksums_match(vectors: Path, ids: Path) -> bool:
    manifest = read_manifest(vectors)
    recorded = (manifest or {}).get("extra", {}).get("sha256", {})
    return (vectors.is_file() and ids.is_file() and recorded.get("vectors") == fingerprint(vectors)
            and recorded.get("ids") == fingerprint(ids))


def shards_config(teacher_config: dict, texts: list[str], shard_size: int) -> dict:
    """What identifies one teacher's shards of a corpus; index.json's manifest records it, so
    a teacher is done when :func:`~embdistill.artifacts.is_done` finds the same config."""
    return {**teacher_config, "corpus": corpus_key(text_ids(texts)), "n_texts": len(texts),
            "shard_size": shard_size}


def _shard_config(base: dict, index: int, n_texts: int, shard_size: int) -> dict:
    rows = min((index + 1) * shard_size, n_texts) - index * shard_size
    return {**base, "shard": index, "rows": rows}


def write_teacher_shards(
    encoder: Encoder,
    texts: list[str],
    folder: Path,
    *,
    teacher_config: dict,
    shard_size: int,
    batch_size: int = 64,
    env: DistEnv | None = None,
) -> list[int]:
    """Encode this rank's unfinished shards of ``texts`` (unique, in corpus order) into
    ``folder``; return the shards written. ``teacher_config`` identifies the teacher's
    weights and settings: shards made with another config are redone (and
    :func:`reset_teacher` makes them all be redone)."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    env = env or dist_env()
    ids = text_ids(texts)
    if len(np.unique(ids)) != len(ids):
        raise UserError("the corpus has repeated texts (or a 64-bit id collision): de-duplicate it")
    base = shards_config(teacher_config, texts, shard_size)
    n_shards = -(-len(texts) // shard_size)
    mine = shard(list(range(n_shards)), env)
    written = []
    for index in _progress(mine, env, f"{teacher_config.get('teacher', 'teacher')} shards"):
        start, stop = index * shard_size, min((index + 1) * shard_size, len(texts))
        vectors_path, ids_path = shard_files(folder, index)
        config = _shard_config(base, index, len(texts), shard_size)
        if is_done(vectors_path, config=config) and _checksums_match(vectors_path, ids_path):
            continue
        # From here on the shard, hence the teacher, is incomplete.
        manifest_path(vectors_path).unlink(missing_ok=True)
        manifest_path(folder / INDEX_NAME).unlink(missing_ok=True)
        vectors = np.asarray(encoder.encode(texts[start:stop], batch_size=batch_size, progress=False))
        if vectors.ndim != 2 or vectors.shape[0] != stop - start:
            raise UserError(f"teacher {teacher_config.get('teacher')} returned shape "
                            f"{vectors.shape} for {stop - start} texts")
        half = vectors.astype(np.float16)
        if not np.isfinite(half).all():
            raise UserError(f"teacher {teacher_config.get('teacher')}: non-finite embeddings "
                            f"in shard {index} (or values beyond float16's range)")
        for path, array in ((vectors_path, half), (ids_path, ids[start:stop])):
            with atomic_open(path, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
        write_manifest(vectors_path, stage=_STAGE, config=config,
                       extra={"sha256": {"vectors": fingerprint(vectors_path), "ids": fingerprint(ids_path)},
                              "dim": half.shape[1]})
        written.append(index)
    return written


def finish_teacher(folder: Path, texts: list[str], *, teacher_config: dict, shard_size: int) -> bool:
    """Write index.json once every shard of the corpus is in (validated); False while some
    are still missing (another rank is writing them: the last rank to finish writes it)."""
    n_shards = -(-len(texts) // shard_size)
    base = shards_config(teacher_config, texts, shard_size)
    for index in range(n_shards):
        if not is_done(shard_files(folder, index)[0],
                       config=_shard_config(base, index, len(texts), shard_size)):
            return False
    for stale in (i for i in _shard_indices(folder) if i >= n_shards):  # of a larger, older corpus
        log.info("removing %s: not part of the current corpus", shard_files(folder, stale)[0])
        for path in shard_files(folder, stale):
            manifest_path(path).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
    targets = load_teacher_targets(folder, texts, require_index=False)
    index = {"teacher": teacher_config.get("teacher"), "dim": targets.dim, "n_texts": len(texts),
             "n_shards": n_shards, "shard_size": shard_size, "dtype": "float16"}
    save_json(index, folder / INDEX_NAME)
    write_manifest(folder / INDEX_NAME, stage=_STAGE, config=base)
    return True


def reset_teacher(folder: Path) -> None:
    """Mark every shard and the index of a teacher unfinished (``--overwrite``)."""
    manifest_path(Path(folder) / INDEX_NAME).unlink(missing_ok=True)
    for index in _shard_indices(Path(folder)):
        manifest_path(shard_files(Path(folder), index)[0]).unlink(missing_ok=True)


class TeacherTargets:
    """One teacher's vectors for a list of texts, row i for text i (memory-mapped shards)."""

    def __init__(self, name: str, shards: list[np.ndarray], shard_of: np.ndarray, row_of: np.ndarray):
        self.name = name
        self._shards = shards
        self._shard_of = shard_of
        self._row_of = row_of
        self.dim = int(shards[0].shape[1])

    def __len__(self) -> int:
        return len(self._shard_of)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self._shards[self._shard_of[i]][self._row_of[i]], dtype=np.float32)

    def rows(self, indices) -> np.ndarray:
        """(len(indices), dim) float32: the vectors of ``indices``, read shard by shard."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        shard_of = self._shard_of[indices]
        for k in np.unique(shard_of):
            where = np.flatnonzero(shard_of == k)
            out[where] = self._shards[k][self._row_of[indices[where]]]
        return out

    def subset(self, indices) -> "TeacherTargets":
        """The rows of ``indices``, in that order (the shards are shared, not copied)."""
        indices = np.asarray(indices, dtype=np.int64)
        return TeacherTargets(self.name, self._shards, self._shard_of[indices], self._row_of[indices])


STATS_CHUNK = 65536  # rows read at a time: bounds memory, not results
MIN_STD = 1e-6  # a dimension that barely varies is centred, not blown up


def target_statistics(targets: TeacherTargets, indices=None, *, chunk: int = STATS_CHUNK
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each (dim,) float64, of the rows ``indices`` (default all) of one
    teacher, in one pass over the shards (chunks merged exactly, Chan et al.); ``std`` is the
    population std (ddof 0), with values below ``MIN_STD`` replaced by 1."""
    indices = np.arange(len(targets)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise UserError(f"teacher {targets.name}: no rows to compute statistics on")
    count, mean, m2 = 0, np.zeros(targets.dim), np.zeros(targets.dim)
    for start in range(0, len(indices), chunk):
        rows = targets.rows(indices[start : start + chunk]).astype(np.float64)
        n, chunk_mean = len(rows), rows.mean(0)
        chunk_m2 = ((rows - chunk_mean) ** 2).sum(0)
        delta = chunk_mean - mean
        total = count + n
        mean = mean + delta * n / total
        m2 = m2 + chunk_m2 + delta**2 * count * n / total
        count = total
    std = np.sqrt(m2 / count)
    return mean, np.where(std < MIN_STD, 1.0, std)


def _shard_indices(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in folder.glob("shard-*.npy")
                  if (m := _SHARD_NAME.match(p.name)))


def load_teacher_targets(folder: Path, texts: list[str], *, require_index: bool = True) -> TeacherTargets:
    """Pair each of ``texts`` with its vector in ``folder`` by text id; UserError on a missing,
    duplicated, corrupt or mismatched shard."""
    folder = Path(folder)
    name = folder.name
    rerun = f"rerun scripts/10_teacher_embeddings.py for teacher '{name}'"
    index = None
    if require_index:
        if read_manifest(folder / INDEX_NAME) is None:
            raise UserError(f"{folder}: teacher embeddings are missing or incomplete (no {INDEX_NAME}); {rerun}")
        index = load_json(folder / INDEX_NAME)
    found = _shard_indices(folder)
    if not found:
        raise UserError(f"{folder}: no teacher embedding shards; {rerun}")
    if index is not None and found != list(range(index["n_shards"])):
        raise UserError(f"{folder}: shards {found[:5]}... do not match {INDEX_NAME} "
                        f"({index['n_shards']} shards); {rerun} with --overwrite")
    shards, all_ids, dims = [], [], set()
    for i in found:
        vectors_path, ids_path = shard_files(folder, i)
        if not ids_path.is_file():
            raise UserError(f"{ids_path}: missing (every shard needs its ids); {rerun}")
        if not _checksums_match(vectors_path, ids_path):
            raise UserError(f"{vectors_path}: corrupt or unfinished shard (its bytes differ from the "
                            f"checksums in its manifest); {rerun} with --overwrite")
        try:
            vectors = np.load(vectors_path, mmap_mode="r", allow_pickle=False)
            ids = np.load(ids_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{vectors_path}: unreadable shard ({exc}); {rerun} with --overwrite") from None
        if vectors.ndim != 2 or ids.ndim != 1 or ids.dtype != np.int64 or len(ids) != len(vectors):
            raise UserError(f"{vectors_path}: malformed shard (vectors {vectors.shape}, ids "
                            f"{ids.shape} {ids.dtype}); {rerun} with --overwrite")
        dims.add(vectors.shape[1])
        shards.append(vectors)
        all_ids.append(ids)
    if len(dims) != 1 or (index is not None and dims != {index["dim"]}):
        raise UserError(f"{folder}: shards disagree on the dimension ({sorted(dims)}"
                        f"{'' if index is None else ', index says ' + str(index['dim'])}); {rerun} with --overwrite")
    ids = np.concatenate(all_ids)
    shard_of_row = np.concatenate([np.full(len(a), k, np.int32) for k, a in enumerate(all_ids)])
    row_in_shard = np.concatenate([np.arange(len(a)) for a in all_ids])
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    repeated = sorted_ids[1:] == sorted_ids[:-1]
    if repeated.any():
        raise UserError(f"{folder}: {int(repeated.sum())} texts have more than one vector (shards "
                        f"from different corpora mixed?); {rerun} with --overwrite")
    wanted = text_ids(texts)
    pos = np.minimum(np.searchsorted(sorted_ids, wanted), len(sorted_ids) - 1)
    missing = np.flatnonzero(sorted_ids[pos] != wanted)
    if len(missing):
        example = texts[missing[0]][:60]
        raise UserError(f"{folder}: {len(missing)} of {len(texts)} texts have no vector "
                        f"(e.g. {example!r}); {rerun}")
    rows = order[pos]
    return TeacherTargets(name, shards, shard_of_row[rows], row_in_shard[rows])


def _progress(items: list, env: DistEnv, desc: str):
    if not env.is_main:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="shard")
