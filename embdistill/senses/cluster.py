"""Stage 3 of SKD: cluster every token's gathered states into its senses.

For each token with n samples: the k rule gives k (``mcl``: the original's MCL count rule;
``fixed``: the same k for every token, checked against MCL on a few tokens; see :mod:`.krule`);
a token with n < 5 or n <= k keeps its raw vectors; the others are clustered by k-means into k
centroids (:mod:`.kmeans`).

Input: combined.pkl's rows are read through its memory-mapped row file
(:func:`.combine.open_combined`; where the combine wrote no pickle, the row file alone), so each
rank reads only the rows of its own tokens, and drops their mapped pages from its resident
memory after each batch (:meth:`.combine.TokenRows.release`): a batch's rows at a time; files without a row file (the original's, rank files) are loaded whole,
in every process. Every row a rank clusters is checked
to be finite first, and the dictionary is checked before it is written.

Work is planned once, the same way on every rank: the tokens that need work (n > 5) are sorted
by n and cut into batches of similar n (at most ``batch_tokens`` tokens and about
``batch_elements`` floats per working tensor); batch i belongs to rank i mod world size. Each
finished batch is written atomically as a part file named by its index
(:class:`~embdistill.artifacts.PartFiles`: arrays in ``.npz`` and a manifest holding everything
the results depend on), so a killed run (even kill -9) resumes from its finished parts, with any
number of processes, and a part of another configuration is redone. After a barrier rank 0 merges the parts with the
raw-vector tokens, writes the dictionary, its manifest, summary and plot, and deletes the
parts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from ..artifacts import PartFiles, fingerprint, read_manifest
from ..distributed import DistEnv, barrier, dist_env, shard
from ..errors import UserError
from .combine import TokenRows, check_finite, open_combined, read_source
from .dictionary import SENSE_DTYPES, plot_path, plot_senses, save_sense_dict, summary_path, write_summary
from .kmeans import check_backend, kmeans
from .packed import DEFAULT_SENSE_RULE, check_sense_rule
from .krule import K_RULES, MIN_SENSES, k_from_mcl_count, keeps_raw_vectors, mcl_counts, spot_check

log = logging.getLogger("embdistill.cluster")

@dataclass(frozen=True)
class ClusterConfig:
    """What the dictionary depends on (batching and device do not change which senses come out)."""

    teacher: str
    k_rule: str = "fixed"
    senses: int = MIN_SENSES  # k of the fixed rule
    backend: str = "torch"
    seed: int = 0
    max_iter: int = 300
    tol: float = 1e-4
    n_init: int = 1
    dtype: str = "float16"
    sense_rule: str = DEFAULT_SENSE_RULE  # picks a token's sense where the dictionary is used

    def __post_init__(self):
        check_sense_rule(self.sense_rule)
        if self.k_rule not in K_RULES:
            raise UserError(f"unknown --k-rule '{self.k_rule}': choose one of {', '.join(K_RULES)}")
        check_backend(self.backend)
        if self.dtype not in SENSE_DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(SENSE_DTYPES)}, got '{self.dtype}'")
        if self.max_iter < 1 or self.n_init < 1 or self.tol < 0 or self.senses < 1 or self.seed < 0:
            raise UserError("--max-iter, --n-init and --senses must be >= 1, --tol and --seed >= 0")


@dataclass(frozen=True)
class Batching:
    tokens: int = 256  # tokens per batch, at most
    elements: int = 1 << 26  # floats per working tensor, about (a lone large token may exceed it)
    # largest n / smallest n in a batch, at most: every token is padded to the largest, and MCL
    # costs n^3, so a wider spread would waste more than it saves
    spread: float = 1.25
    # multiply-adds per iteration, about: large tokens gain nothing from batching, and small
    # batches of them spread the costliest work over the ranks
    work: int = 1 << 31

    def __post_init__(self):
        if min(self.tokens, self.elements, self.spread, self.work) < 1:
            raise UserError("--batch-tokens and --batch-elements must be >= 1")


def load_states(path: Path, teacher: str, hidden_size: int | None) -> tuple[Mapping[int, np.ndarray], int, str]:
    """combined.pkl, its row file (:func:`.combine.combined_artifact`) or a rank file, checked
    against the teacher: (states, hidden size, the file's fingerprint). The states come from the
    row file when it matches (memory-mapped: nothing is read until a token is used), else from
    the whole pickle."""
    input_print = fingerprint(path)
    states = open_combined(path, input_print)
    if states is not None:
        extra = read_manifest(path)["extra"]
        source_teacher, width = extra.get("teacher"), states.rows.shape[1]
    else:
        if dist_env().world_size > 1:
            log.warning("%s has no row file of its own (written by another tool or an older "
                        "a0_generate_combinepkl.py; --overwrite it to get one): every process loads "
                        "all of it", path)
        source, states = read_source(path)
        source_teacher, width = source.teacher, source.hidden_size
    if source_teacher is not None and source_teacher != teacher:
        raise UserError(f"{path} holds states of teacher '{source_teacher}', not '{teacher}' "
                        "(--teacher); cluster it with --teacher " + source_teacher)
    if hidden_size is not None and width != hidden_size:
        raise UserError(f"{path} holds {width}-d states, not {hidden_size}-d "
                        "(--hidden-size): states of another teacher?")
    if not states:
        raise UserError(f"{path}: no tokens to cluster")
    return states, width, input_print


def _smallest_k(cfg: ClusterConfig) -> int:
    return cfg.senses if cfg.k_rule == "fixed" else MIN_SENSES


def _token_cost(n: int, cfg: ClusterConfig, hidden_size: int) -> tuple[int, int]:
    """(floats in a token's largest working tensor, multiply-adds per iteration): the n x n MCL
    matrix and its square, or n x max(k, d) and n x k x d for k-means."""
    if cfg.k_rule == "mcl":
        return n * max(n, hidden_size), n * n * n
    return n * max(cfg.senses, hidden_size), n * cfg.senses * hidden_size


def plan_batches(sizes: dict[int, int], cfg: ClusterConfig, hidden_size: int, batching: Batching) -> list[list[int]]:
    """Tokens that may need k-means (the others keep raw vectors whatever their k), sorted by
    (n, id), cut into batches of similar n."""
    tokens = sorted((t for t, n in sizes.items() if not keeps_raw_vectors(n, _smallest_k(cfg))),
                    key=lambda t: (sizes[t], t))
    batches: list[list[int]] = []
    for token in tokens:  # ascending n: the newest token is the batch's largest
        current = batches[-1] if batches else None
        floats, work = _token_cost(sizes[token], cfg, hidden_size)
        if (current is None or len(current) >= batching.tokens
                or sizes[token] > batching.spread * sizes[current[0]]
                or (len(current) + 1) * floats > batching.elements
                or (len(current) + 1) * work > batching.work):
            batches.append([token])
        else:
            current.append(token)
    return batches


def cluster_batch(points: list[np.ndarray], tokens: list[int], cfg: ClusterConfig,
                  device: torch.device) -> dict:
    """One batch: k per token, then k-means on the tokens that do not keep raw vectors.

    Returns a part: ``senses`` {token: (k, d) float32}, ``stats`` {token: {n, k, mcl, raw,
    iterations, objective}}, ``seconds`` {k_rule, kmeans}."""
    started = time.perf_counter()
    if cfg.k_rule == "mcl":
        clusters = [c.clusters for c in mcl_counts(points, device=device)]
        ks = [k_from_mcl_count(m) for m in clusters]
    else:
        clusters = [None] * len(points)
        ks = [cfg.senses] * len(points)
    rule_done = time.perf_counter()
    todo = [i for i, (p, k) in enumerate(zip(points, ks)) if not keeps_raw_vectors(len(p), k)]
    results = kmeans([points[i] for i in todo], [ks[i] for i in todo], backend=cfg.backend,
                     keys=[tokens[i] for i in todo], seed=cfg.seed, max_iter=cfg.max_iter,
                     tol=cfg.tol, n_init=cfg.n_init, device=device)
    by_index = dict(zip(todo, results))
    senses, stats = {}, {}
    for i, token in enumerate(tokens):
        result = by_index.get(i)
        senses[token] = result.centroids if result else np.asarray(points[i], dtype=np.float32)
        stats[token] = {"n": len(points[i]), "k": len(senses[token]), "mcl": clusters[i],
                        "raw": result is None, "iterations": result.iterations if result else 0,
                        "objective": result.objective[-1] if result else 0.0}
    return {"senses": senses, "stats": stats,
            "seconds": {"k_rule": rule_done - started, "kmeans": time.perf_counter() - rule_done}}


def part_files(out_path: Path, cfg: ClusterConfig, batching: Batching, input_print: str) -> PartFiles:
    """The batches' part files of this exact job (config, batching and input), beside the
    dictionary; a part of another job is not done and is redone."""
    return PartFiles.beside(out_path, {"cluster": asdict(cfg), "batching": asdict(batching), "input": input_print})


def _part_arrays(part: dict) -> dict[str, np.ndarray]:
    """A batch's result as named arrays (a part file holds arrays only)."""
    tokens = list(part["senses"])
    stats = [part["stats"][t] for t in tokens]
    return {"tokens": np.asarray(tokens, dtype=np.int64),
            "sizes": np.asarray([len(part["senses"][t]) for t in tokens], dtype=np.int64),
            "centroids": np.concatenate([np.asarray(part["senses"][t], dtype=np.float32) for t in tokens]),
            "n": np.asarray([s["n"] for s in stats], dtype=np.int64),
            "mcl": np.asarray([-1 if s["mcl"] is None else s["mcl"] for s in stats], dtype=np.int64),
            "raw": np.asarray([s["raw"] for s in stats], dtype=bool),
            "iterations": np.asarray([s["iterations"] for s in stats], dtype=np.int64),
            "objective": np.asarray([s["objective"] for s in stats], dtype=np.float64),
            "seconds": np.asarray([part["seconds"]["k_rule"], part["seconds"]["kmeans"]], dtype=np.float64)}


def _part_of_arrays(arrays: dict[str, np.ndarray]) -> dict:
    """Inverse of :func:`_part_arrays`."""
    rows = np.split(arrays["centroids"], np.cumsum(arrays["sizes"])[:-1])
    tokens = arrays["tokens"].tolist()
    stats = {t: {"n": int(n), "k": len(c), "mcl": None if m < 0 else int(m), "raw": bool(r),
                 "iterations": int(i), "objective": float(o)}
             for t, c, n, m, r, i, o in zip(tokens, rows, arrays["n"], arrays["mcl"], arrays["raw"],
                                            arrays["iterations"], arrays["objective"])}
    return {"senses": dict(zip(tokens, rows)), "stats": stats,
            "seconds": {"k_rule": float(arrays["seconds"][0]), "kmeans": float(arrays["seconds"][1])}}


def _prepare_parts(parts: PartFiles, env: DistEnv, overwrite: bool) -> None:
    """Rank 0 clears the parts on --overwrite, then every rank starts together."""
    if env.is_main and overwrite:
        parts.clear()
    barrier()


def cluster_rank(states: Mapping[int, np.ndarray], batches: list[list[int]], parts: PartFiles,
                 cfg: ClusterConfig, env: DistEnv, device: torch.device, input_path: Path) -> None:
    """This rank's batches, written as part files; finished parts are kept. Only these
    batches' rows are read, each checked to be finite."""
    mine = shard(list(enumerate(batches)), env)  # batch i -> rank i mod world size
    todo = [(i, b) for i, b in mine if not parts.done(i)]
    if len(todo) < len(mine):
        log.info("rank %d: resuming, %d of %d batches already clustered", env.rank,
                 len(mine) - len(todo), len(mine))
    progress = tqdm(total=sum(len(b) for _, b in todo), desc=f"cluster rank {env.rank}", unit="token",
                    disable=not env.is_main)
    for index, tokens in todo:
        points = [states[t] for t in tokens]
        for token, rows in zip(tokens, points):
            check_finite(input_path, token, rows)
        parts.write(index, _part_arrays(cluster_batch(points, tokens, cfg, device)))
        progress.update(len(tokens))
        if isinstance(states, TokenRows):  # resident memory bounded by a batch's rows, not the file
            del points
            states.release()
    progress.close()


def merge_parts(states: Mapping[int, np.ndarray], batches: list[list[int]], parts: PartFiles,
                input_path: Path) -> tuple[dict, dict, dict]:
    """All parts plus the raw-vector tokens (checked to be finite): (senses, stats, seconds
    summed over parts)."""
    senses, stats, seconds = {}, {}, {"k_rule": 0.0, "kmeans": 0.0}
    for index, tokens in enumerate(batches):
        part = _part_of_arrays(parts.load(index))
        if sorted(part["senses"]) != sorted(tokens):
            raise UserError(f"{parts.path(index)} does not hold its batch; rerun with --overwrite")
        senses.update(part["senses"])
        stats.update(part["stats"])
        for key in seconds:
            seconds[key] += part["seconds"][key]
    for token, rows in states.items():
        if token not in senses:  # not planned: raw vectors whatever the rule
            check_finite(input_path, token, rows)
            senses[token] = rows
            stats[token] = {"n": len(rows), "k": len(rows), "mcl": None, "raw": True,
                            "iterations": 0, "objective": 0.0}
    return senses, stats, seconds


def run(states: Mapping[int, np.ndarray], hidden_size: int, out_path: Path, cfg: ClusterConfig,
        batching: Batching, env: DistEnv, device: torch.device, *, input_path: Path,
        input_print: str | None = None, overwrite: bool = False) -> dict | None:
    """Cluster ``states`` into the dictionary at ``out_path`` (every rank calls this); rank 0
    writes the dictionary, manifest, summary and plot and returns the summary, others None.
    ``input_print``: the input file's fingerprint, when the caller has it already."""
    started = time.perf_counter()
    combined_extra = (read_manifest(input_path) or {}).get("extra", {})  # what the states were gathered with
    parts = part_files(out_path, cfg, batching, input_print or fingerprint(input_path))
    batches = plan_batches({t: len(v) for t, v in states.items()}, cfg, hidden_size, batching)
    _prepare_parts(parts, env, overwrite)
    cluster_rank(states, batches, parts, cfg, env, device, input_path)
    barrier()
    if not env.is_main:
        return None
    rule = "mcl (the original's)"
    if cfg.k_rule == "fixed":
        agreeing, checked = spot_check(states, cfg.senses, seed=cfg.seed, device=device)
        rule = f"fixed, k = {cfg.senses} (the MCL rule agrees on {agreeing} of {checked} sampled tokens)"
        if agreeing < checked:
            log.warning("the MCL rule gives another k than %d for %d of %d sampled tokens: this "
                        "teacher's states are spread unlike MiniLM's; --k-rule mcl reproduces the "
                        "original", cfg.senses, checked - agreeing, checked)
    senses, stats, seconds = merge_parts(states, batches, parts, input_path)
    diverged = next((t for t, v in senses.items() if not np.isfinite(v).all()), None)
    if diverged is not None:  # finite input, yet: float32 overflow inside k-means
        raise UserError(f"k-means gave non-finite senses for token {diverged}: its states are too "
                        "large for float32 arithmetic")
    tokens = sorted(stats)
    per_token, samples = [stats[t]["k"] for t in tokens], [stats[t]["n"] for t in tokens]
    clustered = [stats[t] for t in tokens if not stats[t]["raw"]]
    summary = {
        "hidden_size": hidden_size, "tokens": len(tokens), "senses": sum(per_token),
        "samples": sum(samples), "tokens_clustered": len(clustered),
        "tokens_raw": len(tokens) - len(clustered), "batches": len(batches),
        "seconds": round(time.perf_counter() - started, 2),
        "seconds_k_rule": round(seconds["k_rule"], 2), "seconds_kmeans": round(seconds["kmeans"], 2),
        "kmeans_iterations_mean": round(float(np.mean([s["iterations"] for s in clustered] or [0])), 2),
        "world_size": env.world_size, "threads": torch.get_num_threads(), "device": str(device),
        "batch_tokens": batching.tokens, "batch_elements": batching.elements,
        "k_rule": rule,
        **{key: combined_extra.get(key) for key in ("max_length", "input_format")},
    }
    save_sense_dict(senses, out_path, dtype=cfg.dtype, config=asdict(cfg),
                    inputs={"states": input_path}, extra=summary)
    header = [
        f"sense dictionary {out_path}: teacher {cfg.teacher}, {hidden_size}-d, {cfg.dtype}",
        f"k rule {rule}; k-means backend {cfg.backend}, seed {cfg.seed}; input {input_path}",
        f"sense rule {cfg.sense_rule} (how a token's sense is picked: embdistill/senses/packed.py)",
        f"tokens {len(tokens)}: {len(clustered)} clustered, {len(tokens) - len(clustered)} keep "
        f"their raw vectors (n < {MIN_SENSES} or n <= k)",
        f"senses {summary['senses']} from {summary['samples']} samples "
        f"({summary['senses'] / len(tokens):.2f} per token)",
        f"time {summary['seconds']} s on {env.world_size} process(es) x {summary['threads']} "
        f"thread(s) on {device}; summed over batches: k rule {summary['seconds_k_rule']} s, "
        f"k-means {summary['seconds_kmeans']} s",
    ]
    write_summary(summary_path(out_path), header, per_token)
    plot_senses(plot_path(out_path), samples, per_token,
                f"{out_path.parent.name} / {cfg.teacher}: k rule {cfg.k_rule}")
    parts.clear()
    return summary
