"""Benchmark: stage 3 (sense dictionary) on one set of gathered states, all in one process.

    python bench/bench_cluster.py --input work/bbc-news/minilm/combined.pkl
    python bench/bench_cluster.py                  # synthetic MiniLM-like data if no input
    python bench/bench_cluster.py --device cuda --threads 8

Measures, on the same tokens (n > 5) and batches as scripts/03_cluster.py:
1. the MCL rule: batched torch MCL on every token, and the NumPy reference one token at a time
   on every ``--reference-every``-th token (the same tokens batched, for the ratio);
2. k-means with the MCL rule's k: batched torch k-means against scikit-learn's KMeans one
   token at a time (the original's way), and faiss when installed; total objective of each;
3. the fixed rule (k = 5) against the MCL rule: share of tokens with the same k, mean
   |log(k_fixed / k_mcl)|, and the k-means objective of its dictionary;
4. the scale study: MCL's k on up to ``--scale-tokens`` tokens with 60 <= n <= 512 after
   multiplying the states by 1, 3, 10, 30 (a teacher whose states lie farther apart).
Prints a markdown table (rows for BENCHMARKS.md) and a JSON line with every figure.

``--memory``: host memory of the stage itself (scripts/03_cluster.py under torchrun) on one
synthetic combined.pkl of ``--memory-rows`` rows: the peak resident memory (VmHWM, mapped file
pages included) of each process with 1 and with ``--memory-procs`` processes, read from the row
file beside combined.pkl, and with the same processes reading the pickle alone (no row file: the
original's way, each process loading everything). Every process also reports its resident memory
before the stage starts (imports done), the constant.

    python bench/bench_cluster.py --memory --memory-procs 4
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, run as a script or imported
from common import add_machine_args, machine  # noqa: E402
from embdistill.paths import Paths, base_dir
from embdistill.senses.cluster import Batching, ClusterConfig, load_states, plan_batches
from embdistill.senses.combine import write_combined
from embdistill.senses.kmeans import kmeans
from embdistill.senses.krule import (
    MIN_SENSES,
    SPOT_CHECK_N,
    MCLCount,
    MCLParams,
    k_from_mcl_count,
    keeps_raw_vectors,
    mcl_counts,
)


def mcl_count_reference(points: np.ndarray, params: MCLParams = MCLParams()) -> MCLCount:
    """The original's approach: MCL's cluster count for one token's samples (n, d), in NumPy,
    one token at a time, exactly as ``markov_clustering.run_mcl`` computes it (the baseline of
    this benchmark and the tests' oracle for the batched :func:`mcl_counts`)."""
    x = np.asarray(points, dtype=np.float64)
    sq = (x * x).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0))
    matrix = 1.0 / (dist + params.distance_offset)
    np.fill_diagonal(matrix, params.loop_value)
    matrix = matrix / matrix.sum(0, keepdims=True)
    converged, iterations = False, 0
    for iterations in range(1, params.max_iter + 1):
        last = matrix
        matrix = np.linalg.matrix_power(matrix, params.expansion) ** params.inflation
        matrix = matrix / matrix.sum(0, keepdims=True)
        if params.prune_threshold > 0:
            pruned = np.where(matrix < params.prune_threshold, 0.0, matrix)
            cols = np.arange(matrix.shape[1])
            top = matrix.argmax(0)
            pruned[top, cols] = matrix[top, cols]
            matrix = pruned
        if np.allclose(matrix, last):
            converged = True
            break
    attractors = np.flatnonzero(np.diag(matrix))
    clusters = {tuple(np.flatnonzero(matrix[a])) for a in attractors}
    return MCLCount(len(clusters), iterations, converged)


def synthetic_states(tokens: int, dim: int, seed: int) -> dict[int, np.ndarray]:
    """MiniLM-like token states: Zipf-distributed sample counts in 5..1000, each token a few
    Gaussian senses around its own mean, pairwise distances about 3.5 (MiniLM's, measured)."""
    rng = np.random.default_rng(seed)
    counts = np.clip((1000 / np.arange(1, tokens + 1) ** 0.75).astype(int), MIN_SENSES, 1000)
    states = {}
    for token, n in enumerate(rng.permutation(counts)):
        centre = rng.normal(size=dim) * 0.15
        senses = centre + rng.normal(size=(int(rng.integers(1, 6)), dim)) * 0.1
        rows = senses[rng.integers(len(senses), size=n)] + rng.normal(size=(n, dim)) * 0.1
        states[1000 + token] = rows.astype(np.float16)
    return states


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def batched(fn, batches, states):
    """fn(points, tokens) over the driver's batches, results by token."""
    out = {}
    for tokens in batches:
        out.update(zip(tokens, fn([states[t] for t in tokens], tokens)))
    return out


REPO = Path(__file__).resolve().parents[1]
RSS_WORKER_ENV = "EMBDISTILL_BENCH_RSS_OUT"  # set for the stage processes of --memory


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_worker(out_dir: str) -> None:
    """One stage process of --memory: scripts/03_cluster.py as ``python`` would run it, then
    this process's peak resident memory (and its resident memory before the stage) to a file."""
    before = status_kib("VmRSS")
    sys.argv = [str(REPO / "scripts" / "03_cluster.py"), *sys.argv[1:]]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            raise
    finally:
        rank = os.environ.get("RANK", "0")
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
            {"rank": int(rank), "before_kib": before, "peak_kib": status_kib("VmHWM")}))


def memory_input(folder: Path, rows: int, dim: int, seed: int) -> Path:
    """A combined.pkl of about ``rows`` float16 rows (tokens of 20 to 180 rows each) in
    ``folder``/with-row-file."""
    rng = np.random.default_rng(seed)
    states, total, token = {}, 0, 1000
    while total < rows:
        n = int(rng.integers(20, 181))
        centre = rng.normal(size=dim).astype(np.float32)
        states[token] = (centre + rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float16)
        total, token = total + n, token + 1
    path = folder / "with-row-file" / "combined.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_combined(states, {"teacher": "minilm", "hidden_size": dim, "dtype": "float16"}, path,
                   config={"synthetic": seed}, inputs={})
    return path


def memory_run(combined: Path, procs: int, out: Path, batch_elements: int) -> list[dict]:
    """scripts/03_cluster.py under torchrun with ``procs`` processes, one thread each."""
    rss_dir = out / f"rss-{combined.parent.name}-{procs}"
    rss_dir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", RSS_WORKER_ENV: str(rss_dir)}
    with socket.socket() as probe:  # a free port (torchrun's port 0 hangs with 2+ processes)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "embdistill.torchrun", "--nproc_per_node", str(procs),
               "--master_port", str(port), str(Path(__file__).resolve()), "--input", str(combined),
               "--base-dir", str(out / f"base-{combined.parent.name}-{procs}"), "--threads", "1",
               "--max-iter", "10", "--device", "cpu", "--batch-elements", str(batch_elements)]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    ranks = sorted((json.loads(p.read_text()) for p in rss_dir.iterdir()), key=lambda r: r["rank"])
    return [{**r, "procs": procs, "seconds": round(seconds, 1)} for r in ranks]


def memory_benchmark(args) -> None:
    """The stage with 1 and P processes on the row file, P on the pickle alone, and P on 1/100
    of the rows (the constant: imports, k-means working memory, rank 0's merge)."""
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-rss-", dir=args.memory_dir))
    procs, elements = args.memory_procs, args.memory_batch_elements
    try:
        combined = memory_input(work / "full", args.memory_rows, args.memory_dim, args.seed)
        small = memory_input(work / "small", args.memory_rows // 100, args.memory_dim, args.seed)
        pickle_only = work / "full" / "pickle-only" / "combined.pkl"  # no manifest, no row file
        pickle_only.parent.mkdir()
        shutil.copy(combined, pickle_only)
        states_mib = os.path.getsize(combined.with_suffix(".rows.npy")) / 2**20
        runs = {f"constant: 1/100 of the rows, {procs} processes": memory_run(small, procs, work / "small", elements),
                "row file, 1 process": memory_run(combined, 1, work / "full", elements),
                f"row file, {procs} processes": memory_run(combined, procs, work / "full", elements),
                f"pickle only, {procs} processes": memory_run(pickle_only, procs, work / "full", elements)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    constant = {r["rank"]: r["peak_kib"] / 1024 for r in next(iter(runs.values()))}
    print(f"{_dt.date.today()}; {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; states {states_mib:.0f} MiB ({args.memory_rows} float16 rows of "
          f"{args.memory_dim}), k rule fixed, 10 Lloyd iterations, 1 thread per process, "
          f"--batch-elements {elements}\n")
    print("| run | rank | resident at start (MiB) | peak resident (MiB) | peak above the constant run's (MiB) "
          "| that / states | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, ranks in runs.items():
        for r in ranks:
            peak = r["peak_kib"] / 1024
            above = "" if name.startswith("constant") else f"{peak - constant[r['rank']]:.0f}"
            share = "" if name.startswith("constant") else f"{(peak - constant[r['rank']]) / states_mib:.2f}"
            print(f"| {name} | {r['rank']} | {r['before_kib'] / 1024:.0f} | {peak:.0f} | {above} | {share} "
                  f"| {r['seconds']} |")
    print(json.dumps({"states_mib": states_mib, "batch_elements": elements, "runs": runs}))


def main() -> None:
    if os.environ.get(RSS_WORKER_ENV):
        return rss_worker(os.environ[RSS_WORKER_ENV])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--memory", action="store_true", help="measure the stage's host memory instead")
    parser.add_argument("--memory-procs", type=int, default=4)
    parser.add_argument("--memory-rows", type=int, default=400_000)
    parser.add_argument("--memory-dim", type=int, default=1024)
    parser.add_argument("--memory-dir", default=None, help="where the synthetic input goes (default: /tmp)")
    parser.add_argument("--memory-batch-elements", type=int, default=Batching().elements,
                        help="the stage's --batch-elements: its working memory per batch, about")
    parser.add_argument("--input", default=None, help="combined.pkl (default: the bbc-news/minilm one if present)")
    parser.add_argument("--synthetic-tokens", type=int, default=3000, help="tokens of the synthetic data")
    parser.add_argument("--reference-every", type=int, default=25, help="NumPy MCL on every N-th token")
    parser.add_argument("--scale-tokens", type=int, default=24)
    add_machine_args(parser, threads=1)
    args = parser.parse_args()
    if args.memory:
        return memory_benchmark(args)
    device = machine(args)

    default_input = Paths(base_dir(None), "bbc-news", "minilm").combined
    input_path = Path(args.input) if args.input else default_input
    if input_path.is_file():
        states, dim, _ = load_states(input_path, "minilm", None)
        data = f"{input_path} (real MiniLM states)"
    else:
        states, dim = synthetic_states(args.synthetic_tokens, 384, args.seed), 384
        data = f"synthetic MiniLM-like, {len(states)} tokens, 384-d"
    batching = Batching()
    mcl_batches = plan_batches({t: len(v) for t, v in states.items()}, ClusterConfig("minilm", k_rule="mcl"),
                               dim, batching)
    work = [t for b in mcl_batches for t in b]
    figures = {"data": data, "tokens": len(states), "tokens_n_gt_5": len(work),
               "samples": int(sum(len(v) for v in states.values())), "threads": args.threads,
               "device": str(device), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "load_average_1min": round(os.getloadavg()[0], 2),
               "date": _dt.date.today().isoformat()}

    with threadpool_limits(args.threads):
        # 1. the MCL rule, batched and the reference
        mcl, figures["mcl_batched_s"] = timed(lambda: batched(
            lambda points, _: mcl_counts(points, device=device), mcl_batches, states))
        k_mcl = {t: k_from_mcl_count(c.clusters) for t, c in mcl.items()}
        sub = work[:: args.reference_every]
        sub_batches = plan_batches({t: len(states[t]) for t in sub}, ClusterConfig("minilm", k_rule="mcl"),
                                   dim, batching)
        ref, figures["mcl_reference_subset_s"] = timed(lambda: {t: mcl_count_reference(states[t]) for t in sub})
        sub_mcl, figures["mcl_batched_subset_s"] = timed(lambda: batched(
            lambda points, _: mcl_counts(points, device=device), sub_batches, states))
        figures["mcl_subset_tokens"] = len(sub)
        figures["mcl_subset_same_count"] = sum(ref[t].clusters == sub_mcl[t].clusters for t in sub)
        counts = np.array([c.clusters for c in mcl.values()])
        figures["mcl_count_max"] = int(counts.max())
        figures["k_mcl_histogram"] = {int(k): int(v) for k, v in zip(*np.unique(list(k_mcl.values()), return_counts=True))}

        # 2. k-means with the MCL rule's k: batched torch vs one token at a time
        todo = [t for t in work if not keeps_raw_vectors(len(states[t]), k_mcl[t])]
        km_batches = plan_batches({t: len(states[t]) for t in todo}, ClusterConfig("minilm", k_rule="mcl"),
                                  dim, batching)
        figures["kmeans_tokens"] = len(todo)

        def run_kmeans(backend, ks):
            return batched(lambda points, tokens: kmeans(points, [ks[t] for t in tokens], backend=backend,
                                                         keys=tokens, seed=args.seed, device=device),
                           km_batches, states)

        backends = ["torch", "sklearn"] + (["faiss"] if _has_faiss() else [])
        results = {}
        for backend in backends:
            results[backend], figures[f"kmeans_{backend}_s"] = timed(lambda: run_kmeans(backend, k_mcl))
            figures[f"objective_{backend}"] = sum(r.objective[-1] for r in results[backend].values())
            figures[f"iterations_mean_{backend}"] = round(
                float(np.mean([r.iterations for r in results[backend].values()])), 2)

        # 3. the fixed rule against the MCL rule
        k_fixed = {t: MIN_SENSES for t in work}
        figures["fixed_same_k_share"] = sum(k_fixed[t] == k_mcl[t] for t in work) / len(work)
        figures["fixed_mean_abs_log_k_ratio"] = float(np.mean([abs(math.log(k_fixed[t] / k_mcl[t])) for t in work]))
        if all(k_fixed[t] == k_mcl[t] for t in todo):
            figures["objective_fixed_torch"] = figures["objective_torch"]  # same k, same keys: same run
            figures["fixed_dictionary_identical"] = True
        else:
            fixed, _ = timed(lambda: run_kmeans("torch", k_fixed))
            figures["objective_fixed_torch"] = sum(r.objective[-1] for r in fixed.values())
            figures["fixed_dictionary_identical"] = False

        # 4. the scale study
        low, high = SPOT_CHECK_N
        eligible = sorted(t for t in work if low <= len(states[t]) <= high)
        rng = np.random.default_rng(args.seed)
        chosen = sorted(rng.choice(eligible, min(args.scale_tokens, len(eligible)), replace=False)) if eligible else []
        figures["scale_tokens"] = len(chosen)
        for scale in (1, 3, 10, 30):
            scaled = [states[t].astype(np.float32) * scale for t in chosen]
            counts = mcl_counts(scaled, device=device) if chosen else []
            ks = [k_from_mcl_count(c.clusters) for c in counts]
            figures[f"scale{scale}_fixed_agrees"] = sum(k == MIN_SENSES for k in ks)
            figures[f"scale{scale}_mean_k_over_n"] = round(
                float(np.mean([k / len(states[t]) for k, t in zip(ks, chosen)])) if ks else 0.0, 3)

    report(figures, backends)


def _has_faiss() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def report(f: dict, backends: list[str]) -> None:
    print(f"data: {f['data']}; {f['tokens']} tokens, {f['tokens_n_gt_5']} with n > 5, {f['samples']} samples")
    print(f"machine: {f['machine']}, {f['threads']} thread(s), {f['device']}, load average {f['load_average_1min']}, {f['date']}")
    print()
    print("| measurement | time (s) | ratio | quality |")
    print("|---|---|---|---|")
    print(f"| MCL rule, NumPy reference, one token at a time ({f['mcl_subset_tokens']} tokens) | "
          f"{f['mcl_reference_subset_s']:.2f} | 1.00 | |")
    print(f"| MCL rule, batched torch, same tokens | {f['mcl_batched_subset_s']:.2f} | "
          f"{f['mcl_reference_subset_s'] / f['mcl_batched_subset_s']:.2f}x faster | "
          f"same count on {f['mcl_subset_same_count']}/{f['mcl_subset_tokens']} |")
    base = f["kmeans_sklearn_s"]
    print(f"| k-means, sklearn one token at a time (the original), MCL k, {f['kmeans_tokens']} tokens | "
          f"{base:.2f} | 1.00 | objective {f['objective_sklearn']:.6g} |")
    for backend in backends:
        if backend != "sklearn":
            print(f"| k-means, {backend}{' batched' if backend == 'torch' else ' one token at a time'}, same tokens and k | "
                  f"{f[f'kmeans_{backend}_s']:.2f} | {base / f[f'kmeans_{backend}_s']:.2f}x faster | "
                  f"objective {f[f'objective_{backend}']:.6g} ({f[f'objective_{backend}'] / f['objective_sklearn']:.4f} of sklearn's) |")
    mcl_total = f["mcl_batched_s"] + f["kmeans_torch_s"]
    print(f"| stage with the MCL rule: batched MCL {f['mcl_batched_s']:.2f} s + torch k-means | {mcl_total:.2f} | 1.00 | "
          f"MCL is {f['mcl_batched_s'] / mcl_total:.0%} of it |")
    print(f"| stage with the fixed rule (k = 5): torch k-means only | {f['kmeans_torch_s']:.2f} | "
          f"{mcl_total / f['kmeans_torch_s']:.1f}x faster | same k as MCL on {f['fixed_same_k_share']:.1%} of tokens, "
          f"mean abs log k ratio {f['fixed_mean_abs_log_k_ratio']:.3f}, objective "
          f"{f['objective_fixed_torch'] / f['objective_torch']:.4f} of the MCL rule's |")
    print()
    scales = ", ".join(f"x{s}: {f[f'scale{s}_fixed_agrees']}/{f['scale_tokens']} (mean k/n {f[f'scale{s}_mean_k_over_n']})"
                       for s in (1, 3, 10, 30))
    print(f"scale study (MCL rule k == 5 on tokens with 60 <= n <= 512, states multiplied by): {scales}")
    print(json.dumps(f))


if __name__ == "__main__":
    main()
