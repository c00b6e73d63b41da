"""Stage 2: the k rules (MCL batched vs its reference), batching, the sense dictionary format,
and scripts/03_cluster.py end to end (rules, rerun, bad input, 2 processes, kill -9 + resume)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embdistill.artifacts import fingerprint, read_manifest, save_pickle
from embdistill.errors import UserError
from embdistill.distributed import DistEnv
from embdistill.artifacts import PartFiles
from embdistill.senses.cluster import Batching, ClusterConfig, cluster_rank, load_states, plan_batches
from embdistill.senses.combine import TokenRows, rows_path, write_combined
from embdistill.senses.dictionary import SenseDictionary, load_sense_dict, save_sense_dict, senses_histogram
from bench.bench_cluster import mcl_count_reference
from embdistill.senses.krule import k_from_mcl_count, keeps_raw_vectors, mcl_counts, spot_check
from helpers import free_port, killed_command, run_stage

REPO = Path(__file__).resolve().parents[1]
DIM = 16


# ------------------------------------------------------------------------------ k rules


def test_k_rule_is_the_originals():
    assert [k_from_mcl_count(m) for m in (0, 1, 49, 59, 60, 75, 900, 901, 1000)] == [
        5, 5, 5, 5, 6, 7, 90, 360, 400]
    assert keeps_raw_vectors(4, 5) and keeps_raw_vectors(5, 5) and keeps_raw_vectors(9, 12)
    assert not keeps_raw_vectors(6, 5) and not keeps_raw_vectors(13, 12)


def grouped(rng, n: int, groups: int, spread: float, scale: float) -> np.ndarray:
    centres = rng.normal(size=(groups, DIM)) * scale
    return centres[np.arange(n) % groups] + rng.normal(size=(n, DIM)) * spread


def mcl_tokens() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [grouped(rng, 60, 4, 0.05, 3), grouped(rng, 100, 10, 0.02, 2), grouped(rng, 150, 20, 0.05, 5),
            rng.normal(size=(40, DIM)) * 20, grouped(rng, 200, 50, 0.01, 1), rng.normal(size=(7, DIM))]


def test_batched_mcl_equals_the_reference():
    tokens = mcl_tokens()
    reference = [mcl_count_reference(t) for t in tokens]
    assert len({r.clusters for r in reference}) >= 4  # the cases differ
    assert all(r.converged for r in reference)
    assert mcl_counts(tokens, dtype=torch.float64) == reference
    assert [c.clusters for c in mcl_counts(tokens)] == [r.clusters for r in reference]  # float32
    alone = [mcl_counts([t], dtype=torch.float64)[0] for t in tokens]
    assert alone == reference


def test_mcl_count_depends_on_scale_and_spot_check_tells():
    rng = np.random.default_rng(1)
    near = {t: grouped(rng, 80 + t, 8, 0.3, 0.3).astype(np.float32) for t in range(20)}
    assert spot_check(near, 5) == (16, 16)  # few clusters: the rule's floor, k = 5
    far = {t: v * 30 for t, v in near.items()}  # the same states, 30 times farther apart
    agreeing, checked = spot_check(far, 5)
    assert checked == 16 and agreeing < checked
    assert max(c.clusters for c in mcl_counts(list(far.values()))) >= 60
    assert spot_check({1: near[0][:20]}, 5) == (0, 0)  # no token where the rules can differ


def test_plan_batches_cover_tokens_with_similar_n():
    rng = np.random.default_rng(2)
    sizes = {int(t): int(n) for t, n in zip(rng.permutation(500), rng.integers(1, 1000, 500))}
    batching = Batching(tokens=16, elements=1 << 20, work=1 << 27)
    for cfg in (ClusterConfig("t", k_rule="mcl"), ClusterConfig("t")):
        batches = plan_batches(sizes, cfg, 384, batching)
        flat = [t for b in batches for t in b]
        assert sorted(flat) == sorted(t for t, n in sizes.items() if n > 5)  # n <= 5 keep raw vectors
        assert [sizes[t] for t in flat] == sorted(sizes[t] for t in flat)
        for batch in batches:
            n, size = max(sizes[t] for t in batch), len(batch)
            assert size <= 16 and n <= 1.25 * min(sizes[t] for t in batch)
            floats, work = (n * max(n, 384), n**3) if cfg.k_rule == "mcl" else (n * 384, n * 5 * 384)
            assert size == 1 or (size * floats <= 1 << 20 and size * work <= 1 << 27)
        if cfg.k_rule == "mcl":  # the work cap splits the largest tokens into small batches
            assert len(batches[-1]) < 4
    assert plan_batches(sizes, cfg, 384, batching) == plan_batches(dict(reversed(sizes.items())), cfg, 384, batching)


# ------------------------------------------------------------------------- dictionary


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_dictionary_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(3)
    senses = {7: rng.normal(size=(5, DIM)).astype(np.float32), 3: rng.normal(size=(1, DIM)).astype(np.float32)}
    path = tmp_path / "t.kmeanspkl"
    save_sense_dict(senses, path, dtype=dtype, config={"k_rule": "mcl"}, inputs={}, extra={"hidden_size": DIM})
    loaded = load_sense_dict(path, hidden_size=DIM)
    assert sorted(loaded) == [3, 7]
    expected_dtype = np.float16 if dtype == "float16" else np.float32
    for token, value in senses.items():
        assert loaded[token].dtype == expected_dtype
        rounded = torch.from_numpy(value).to(getattr(torch, dtype)).float().numpy()
        np.testing.assert_array_equal(loaded[token].astype(np.float32), rounded)
    with pytest.raises(UserError, match="hidden size is 4096"):
        load_sense_dict(path, hidden_size=4096)


def test_loads_the_originals_format(tmp_path):
    original = {101: torch.randn(7, 4096).to(torch.bfloat16), 2023: torch.randn(5, 4096).to(torch.bfloat16)}
    path = tmp_path / "combine_1000.kmeanspkl"
    save_pickle(original, path)  # no manifest, like the original's files
    loaded = load_sense_dict(path, hidden_size=4096)
    for token, tensor in original.items():
        np.testing.assert_array_equal(loaded[token], tensor.float().numpy())
    with pytest.raises(UserError, match="another teacher"):
        load_sense_dict(path, hidden_size=384)


@pytest.mark.parametrize("content, message", [
    ({}, "non-empty dict"),
    ([np.zeros((2, DIM))], "non-empty dict"),
    ({1: np.zeros(DIM)}, "entry 1 is not"),
    ({"a": np.zeros((2, DIM))}, "entry 'a' is not"),
    ({1: np.zeros((2, DIM)), 2: np.zeros((2, DIM + 1))}, "several widths"),
    ({1: np.full((2, DIM), np.nan)}, "not finite"),
])
def test_load_refuses_what_is_not_a_dictionary(tmp_path, content, message):
    path = tmp_path / "bad.kmeanspkl"
    save_pickle(content, path)
    with pytest.raises(UserError, match=message):
        load_sense_dict(path)


def test_load_refuses_corrupt_and_missing_files(tmp_path):
    path = tmp_path / "corrupt.kmeanspkl"
    path.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(UserError, match="corrupt"):
        load_sense_dict(path)
    with pytest.raises(UserError, match="missing file"):
        load_sense_dict(tmp_path / "absent.kmeanspkl")


def test_histogram_bins():
    assert dict(senses_histogram([1, 1, 2, 5, 9, 10, 600])) == {
        "1": 2, "2-4": 1, "5-9": 2, "10-19": 1, "20-49": 0, "50-99": 0, "100-199": 0, "200-499": 0, "500+": 1}


# ----------------------------------------------------------------------------- the stage


def make_states(path: Path, *, teacher: str = "minilm", dim: int = DIM, empty: bool = False) -> dict:
    """A small combined.pkl: MiniLM-like spread, n from 1 to 200, with its manifest."""
    rng = np.random.default_rng(4)
    sizes = {10: 1, 11: 3, 12: 4, 13: 5, 14: 6, 15: 9, 16: 30, 17: 64, 18: 80}
    sizes.update({100 + i: 7 + i for i in range(40)})
    states = {t: (rng.normal(size=dim) + rng.normal(size=(n, dim)) * 0.3).astype(np.float16)
              for t, n in sizes.items()}
    # 100 tight pairs far apart: MCL finds about 100 clusters, so the rule gives k > 5
    states[19] = grouped(rng, 200, 100, 0.01, 5).astype(np.float16)[:, :dim]
    states = {} if empty else states
    write_combined(states, {"teacher": teacher, "hidden_size": dim, "dtype": "float16"}, path,
                   config={}, inputs={})
    return states


SCRIPT = REPO / "scripts" / "03_cluster.py"
STAGE_ARGS = ("--task", "bbc-news", "--threads", "1")


def run_cluster(capsys, *args: str) -> subprocess.CompletedProcess:
    """scripts/03_cluster.py in this process (no torch import per run): exit code and output."""
    code = run_stage("scripts/03_cluster.py", *STAGE_ARGS, *args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def run_stage_process(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *STAGE_ARGS, *args], capture_output=True,
                          text=True, env=env, timeout=300)


def output(base: Path) -> Path:
    return base / "sense_dict" / "bbc-news" / "minilm.kmeanspkl"


@pytest.fixture(scope="module")
def states_file(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("states") / "combined.pkl"
    return path, make_states(path)


def assert_lloyd_fixed_point(rows: np.ndarray, centroids: np.ndarray) -> None:
    """k-means centroids are the means of the samples nearest to them (up to tol and float16)."""
    rows, centroids = rows.astype(np.float32), centroids.astype(np.float32)
    labels = ((rows[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    for j in np.unique(labels):
        np.testing.assert_allclose(rows[labels == j].mean(0), centroids[j], atol=0.02)


def test_stage_follows_the_rule(tmp_path, states_file, capsys):
    path, states = states_file
    for senses in (5, 8, 3):
        base = tmp_path / f"k{senses}"
        proc = run_cluster(capsys, "--base-dir", str(base), "--input", str(path), "--senses", str(senses))
        assert proc.returncode == 0, proc.stderr
        assert f"-> {output(base)}" in proc.stdout
        result = load_sense_dict(output(base), hidden_size=DIM)
        assert sorted(result) == sorted(states)
        for token, rows in states.items():
            if len(rows) < 5 or len(rows) <= senses:  # the original's rule: raw vectors kept
                np.testing.assert_array_equal(result[token], rows)
            else:
                assert result[token].shape == (senses, DIM)
                assert_lloyd_fixed_point(rows, result[token])
        manifest = read_manifest(output(base))
        assert manifest["config"]["k_rule"] == "fixed" and manifest["config"]["senses"] == senses
        assert manifest["extra"]["hidden_size"] == DIM and "states" in manifest["inputs"]
        summary = (base / "sense_dict" / "bbc-news" / "minilm.summary.txt").read_text()
        assert f"tokens {len(states)}" in summary and "senses per token" in summary
        assert (base / "sense_dict" / "bbc-news" / "minilm.senses.png").read_bytes()[:4] == b"\x89PNG"
        assert not (base / "sense_dict" / "bbc-news" / "minilm.kmeanspkl.parts").exists()


def test_stage_with_the_mcl_rule(tmp_path, states_file, capsys):
    path, states = states_file
    proc = run_cluster(capsys, "--base-dir", str(tmp_path), "--input", str(path), "--k-rule", "mcl")
    assert proc.returncode == 0, proc.stderr
    result = load_sense_dict(output(tmp_path))
    expected = k_from_mcl_count(mcl_count_reference(states[19]).clusters)
    assert expected > 5 and result[19].shape == (expected, DIM)
    assert result[16].shape == (5, DIM)


def test_rerun_skips_unless_overwrite(tmp_path, states_file, capsys):
    path, _ = states_file
    args = ("--base-dir", str(tmp_path), "--input", str(path))
    assert run_cluster(capsys, *args).returncode == 0
    written = output(tmp_path).stat().st_mtime_ns
    again = run_cluster(capsys, *args)
    assert again.returncode == 0 and "up to date, skipping" in again.stderr
    assert output(tmp_path).stat().st_mtime_ns == written
    redo = run_cluster(capsys, *args, "--overwrite")
    assert redo.returncode == 0 and output(tmp_path).stat().st_mtime_ns != written
    other = run_cluster(capsys, *args, "--seed", "1")  # another config is not "done"
    assert other.returncode == 0 and "skipping" not in other.stderr


def test_clusters_the_row_file_where_the_combine_wrote_no_pickle(tmp_path, states_file, capsys):
    """combined.pkl skipped (--combined-pickle never): the stage finds the row file at the
    default input, clusters it as it clusters the pickle, skips a rerun, and refuses a row file
    that is not the one its manifest describes."""
    path, states = states_file
    combined = tmp_path / "alone" / "work" / "bbc-news" / "minilm" / "combined.pkl"
    write_combined(states, {"teacher": "minilm", "hidden_size": DIM, "dtype": "float16"}, combined,
                   config={}, inputs={}, combined_pickle="never")
    assert not combined.exists()
    assert run_cluster(capsys, "--base-dir", str(tmp_path / "pickle"), "--input", str(path)).returncode == 0
    alone = run_cluster(capsys, "--base-dir", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    assert_same_dictionary(output(tmp_path / "alone"), output(tmp_path / "pickle"))
    assert read_manifest(output(tmp_path / "alone"))["inputs"]["states"] == fingerprint(rows_path(combined))
    assert "up to date, skipping" in run_cluster(capsys, "--base-dir", str(tmp_path / "alone")).stderr
    mapped = np.load(rows_path(combined), mmap_mode="r+")
    mapped[0, 0] += 1
    mapped.flush()
    changed = run_cluster(capsys, "--base-dir", str(tmp_path / "alone"), "--overwrite")
    assert changed.returncode == 2 and "is not the row file its manifest describes" in changed.stderr


def test_the_sense_rule_is_recorded_and_changes_no_sense(tmp_path, states_file, capsys):
    """--sense-rule goes into the manifest (what targets, training and replace mode read) and
    the summary; the senses themselves are the same file byte for byte; another rule at the
    same output is not "done"."""
    path, _ = states_file
    pickles = {}
    for rule in (None, "dot", "l2", "cos"):
        base = tmp_path / str(rule)
        proc = run_cluster(capsys, "--base-dir", str(base), "--input", str(path),
                           *(["--sense-rule", rule] if rule else []))
        assert proc.returncode == 0, proc.stderr
        recorded = read_manifest(output(base))["config"]["sense_rule"]
        assert recorded == (rule or "dot") == SenseDictionary.open(output(base)).sense_rule
        assert f"sense rule {rule or 'dot'} " in (output(base).parent / "minilm.summary.txt").read_text()
        pickles[rule] = output(base).read_bytes()
    assert len(set(pickles.values())) == 1
    again = run_cluster(capsys, "--base-dir", str(tmp_path / "l2"), "--input", str(path), "--sense-rule", "cos")
    assert again.returncode == 0 and "skipping" not in again.stderr
    assert SenseDictionary.open(output(tmp_path / "l2")).sense_rule == "cos"


@pytest.mark.parametrize("case", ["missing", "corrupt", "other-teacher", "hidden-size", "empty", "bad-option",
                                  "bad-sense-rule"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, capsys):
    path = tmp_path / "combined.pkl"
    extra = []
    if case == "corrupt":
        path.write_bytes(b"\x80\x04\x95garbage")
    elif case == "other-teacher":
        make_states(path, teacher="llm2vec-llama3-8b")
    elif case == "hidden-size":
        make_states(path)
        extra = ["--hidden-size", "4096"]
    elif case == "empty":
        make_states(path, empty=True)
    elif case == "bad-option":
        make_states(path)
        extra = ["--senses", "0"]
    elif case == "bad-sense-rule":
        make_states(path)
        extra = ["--sense-rule", "nearest"]
    proc = run_cluster(capsys, "--base-dir", str(tmp_path), "--input", str(path), *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not output(tmp_path).parent.exists() or not any(output(tmp_path).parent.iterdir())


@pytest.mark.parametrize("case, message", [
    ("nan float32", "the states of token 16 hold NaN (not an overflow"),
    ("nan float16", "the states of token 16 hold NaN (not an overflow"),
    ("inf", "the states of token 16 hold infinities"),
    ("object", "the states of token 16 are object"),
    ("int64", "the states of token 16 are int64"),
    ("negative id", "token id -16 is not a non-negative integer"),
    ("no rows", "entry 16 is not (it is (0, 16))"),
    ("nan in the row file, clustered token", "the states of token 16 hold NaN"),
    ("nan in the row file, raw token", "the states of token 12 hold NaN"),
])
def test_states_that_are_not_finite_float_rows_are_refused(tmp_path, states_file, case, message, capsys):
    """Never a dictionary of NaN marked done, never NaN called an overflow, never a traceback."""
    states = {t: v.copy() for t, v in states_file[1].items()}
    path, extra = tmp_path / "combined.pkl", []
    rows = states.pop(16)
    if case.startswith("nan in the row file"):
        states[16] = rows
        write_combined(states, {"teacher": "minilm", "hidden_size": DIM, "dtype": "float16"}, path,
                       config={}, inputs={})
        mapped = np.load(rows_path(path), mmap_mode="r+")
        token_start = sum(len(states[t]) for t in sorted(states) if t < (16 if "clustered" in case else 12))
        mapped[token_start + 1, 3] = np.nan  # the pickle still matches: the row file is read
        mapped.flush()
    else:
        if case == "nan float32":
            rows, states = rows.astype(np.float32), {t: v.astype(np.float32) for t, v in states.items()}
            extra = ["--dtype", "float32"]  # the dictionary's dtype: no float16 check to trip over
        fault = {"nan float32": np.nan, "nan float16": np.nan, "inf": np.inf}.get(case)
        if fault is not None:
            rows[2, 5] = fault
        token = -16 if case == "negative id" else 16
        kinds = {"object": lambda: rows.astype(object), "int64": lambda: rows.astype(np.int64),
                 "no rows": lambda: rows[:0]}
        states[token] = kinds.get(case, lambda: rows)()
        save_pickle(states, path)  # a hand-made file: no manifest, no row file
    proc = run_cluster(capsys, "--base-dir", str(tmp_path), "--input", str(path), *extra)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line.partition("error: ")[2] for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and message in errors[0] and "overflow float16" not in errors[0], proc.stderr
    assert not output(tmp_path).exists()


def test_loading_the_states_reads_none_of_them(tmp_path):
    """What every clustering process does before its share: no copy of the states (the
    original, and this stage before, loaded all of combined.pkl in each process)."""
    import tracemalloc

    rng = np.random.default_rng(5)
    states = {t: rng.normal(size=(64, 1024)).astype(np.float32) for t in range(128)}  # 32 MiB
    path = tmp_path / "combined.pkl"
    write_combined(states, {"teacher": "minilm", "hidden_size": 1024, "dtype": "float32"}, path,
                   config={}, inputs={})
    tracemalloc.start()
    try:
        loaded = load_states(path, "minilm", None)[0]
        sizes = {t: len(v) for t, v in loaded.items()}  # what the plan needs
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sizes == {t: 64 for t in states}
    # the file's fingerprint reads it in 1 MiB blocks: a constant, not a share of the states
    assert peak < 0.15 * 32 * 2**20, f"{peak / 2**20:.1f} MiB held for 32 MiB of states"


def mapped_rss(path: Path) -> int:
    """Bytes of ``path``'s mappings resident in this process (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line and not line[0].isupper():  # a mapping's header line: address range ... path
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux's /proc/self/smaps")
@pytest.mark.parametrize("world_size", [1, 4])
def test_a_cluster_rank_reads_only_its_own_tokens_rows(tmp_path, world_size, monkeypatch):
    """Rank 0 of P clusters every P-th batch: of the row file it maps it reads about 1/P, not
    all of it, and drops each batch's rows from its resident memory (the mapped pages count in
    RSS until then) once the batch is done."""
    rng = np.random.default_rng(6)
    states = {t: rng.normal(size=(64, 1024)).astype(np.float32) for t in range(128)}  # 256 KiB each
    path = tmp_path / "combined.pkl"
    write_combined(states, {"teacher": "minilm", "hidden_size": 1024, "dtype": "float32"}, path,
                   config={}, inputs={})
    loaded, width, _ = load_states(path, "minilm", None)
    cfg = ClusterConfig("minilm", max_iter=3)
    batches = plan_batches({t: len(v) for t, v in loaded.items()}, cfg, width, Batching(tokens=4))
    assert mapped_rss(rows_path(path)) < 64 * 1024  # planning read nothing
    read = []  # resident bytes of the row file as each batch is done: the rows it read
    release = TokenRows.release
    monkeypatch.setattr(TokenRows, "release", lambda self: (read.append(mapped_rss(rows_path(path))), release(self)))
    cluster_rank(loaded, batches, PartFiles(tmp_path / "parts", "batch", {}), cfg,
                 DistEnv(rank=0, world_size=world_size), torch.device("cpu"), path)
    share = sum(read) / rows_path(path).stat().st_size
    assert mapped_rss(rows_path(path)) < 64 * 1024  # none held once done
    assert len(list((tmp_path / "parts").glob("*.npz"))) == len(batches[::world_size])
    if world_size == 1:
        assert share > 0.9
    else:  # 1/4 of the rows, and the kernel's fault-around (64 KiB) at the edges of its 8 runs of 1 MiB
        assert share < 0.35, share


# ------------------------------------------------------------------ processes and resume


def run_driver(script: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(["bash", str(REPO / script), "bbc-news", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


def assert_same_dictionary(a: Path, b: Path) -> None:
    left, right = load_sense_dict(a), load_sense_dict(b)
    assert sorted(left) == sorted(right)
    for token in left:
        np.testing.assert_array_equal(left[token], right[token])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, states_file) -> Path:
    """The uninterrupted single-process run, small batches (several part files)."""
    base = tmp_path_factory.mktemp("one")
    proc = run_driver("run_sep_cluster.sh", "--base-dir", str(base), "--input", str(states_file[0]),
                      "--batch-tokens", "4", "--threads", "1", "--master_port", str(free_port()))
    assert proc.returncode == 0, proc.stderr
    return output(base)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, states_file, one_process):
    proc = run_driver("run_multithread_cluster.sh", "--procs", "2", "--threads", "1",
                      "--master_port", str(free_port()), "--base-dir", str(tmp_path),
                      "--input", str(states_file[0]), "--batch-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(output(tmp_path))["extra"]["world_size"] == 2
    assert_same_dictionary(output(tmp_path), one_process)


@pytest.mark.slow
def test_two_drivers_at_once_on_one_machine(tmp_path, states_file, one_process):
    """Without --master_port each launch gets a free port; on main both took 29500 and the
    second ended in a 39-line EADDRINUSE traceback."""
    runs = [subprocess.Popen(["bash", str(REPO / "run_sep_cluster.sh"), "bbc-news", "--base-dir", str(tmp_path / name),
                              "--input", str(states_file[0]), "--batch-tokens", "4", "--threads", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
            for name in ("a", "b")]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
    for name in ("a", "b"):
        assert_same_dictionary(output(tmp_path / name), one_process)


@pytest.mark.slow
def test_kill_9_midway_then_resume(tmp_path, states_file, one_process):
    args = ("--base-dir", str(tmp_path), "--input", str(states_file[0]), "--batch-tokens", "4")
    killed = subprocess.run(killed_command("embdistill.artifacts", "PartFiles", "write", 4, SCRIPT, *STAGE_ARGS, *args),
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]  # as it began writing its 4th part
    assert not output(tmp_path).exists()
    parts = list((tmp_path / "sense_dict" / "bbc-news" / "minilm.kmeanspkl.parts").glob("minilm.part*.npz"))
    assert len(parts) == 3
    resumed = run_stage_process(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming, 3 of" in resumed.stderr
    assert_same_dictionary(output(tmp_path), one_process)


def test_drivers_help():
    for script in ("run_sep_cluster.sh", "run_multithread_cluster.sh"):
        proc = subprocess.run(["bash", str(REPO / script), "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout and "--k-rule" in proc.stdout
        assert "--sense-rule" in proc.stdout
    proc = subprocess.run(["bash", str(REPO / "run_multithread_cluster.sh"), "bbc-news", "--procs", "x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error:" in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "run_sep_cluster.sh"), "bbc-news", "--sense-rule", "nearest"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--sense-rule: invalid choice: 'nearest' (choose from 'dot', 'l2', 'cos')" in proc.stderr


def test_the_sense_rule_passes_through_the_driver(tmp_path, states_file):
    path, _ = states_file
    proc = subprocess.run(["bash", str(REPO / "run_sep_cluster.sh"), "bbc-news", "--sense-rule", "l2", "--threads",
                           "1", "--base-dir", str(tmp_path), "--input", str(path)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert SenseDictionary.open(output(tmp_path)).sense_rule == "l2"
