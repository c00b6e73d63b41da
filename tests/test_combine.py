"""Combining gathered rank files: canonical row order, the cap, the original's layout, refusals.

Rank files are written here in the gather's layout (rank<R>.pkl + rank<R>.index.pkl +
manifests); each row's values equal its occurrence id, so order is visible in the data.
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embdistill.artifacts import fingerprint, load_pickle, read_manifest, save_pickle, write_manifest
from embdistill.errors import UserError
from embdistill.senses.combine import (combine, combined_artifact, open_combined, resolve_inputs, rows_path,
                                       tokens_path, write_combined)
from helpers import combine_to_dict, run_stage
from test_train_stage import subprocess_env
from embdistill.senses import rowfile
from embdistill.senses.gather import index_path


def write_rank(folder: Path, rank: int, occurrences: dict[int, list[int]], *, world_size: int = 2,
               hidden_size: int = 4, dtype: str = "float16", teacher: str = "minilm", seed: int = 0,
               states: dict[int, np.ndarray] | None = None) -> Path:
    """A rank file as gather_shard writes it; row values = occurrence id unless ``states``."""
    path = folder / f"rank{rank}.pkl"
    index = {t: np.asarray(o, dtype=np.int64) for t, o in occurrences.items()}
    if states is None:
        states = {t: np.repeat(o[:, None], hidden_size, axis=1).astype(dtype) for t, o in index.items()}
    config = {"teacher": teacher, "max_length": 8, "per_token": 1000, "seed": seed, "dtype": dtype,
              "input_format": "plain", "world_size": world_size, "rank": rank}
    extra = {"teacher": teacher, "hidden_size": hidden_size, "dtype": dtype}
    save_pickle(index, index_path(path))
    save_pickle(states, path)
    write_manifest(path, stage="gather", config=config, extra=extra)
    return path


def two_ranks(folder: Path, **kwargs) -> list[Path]:
    # rank 0 gathered texts 0, 2, ...; rank 1 texts 1, 3, ... (occurrence = text * 8 + position)
    return [write_rank(folder, 0, {5: [1, 17, 33], 7: [2]}, **kwargs),
            write_rank(folder, 1, {5: [9, 25], 9: [10, 11]}, **kwargs)]


def rows_of(combined: dict, token: int) -> list[float]:
    return combined[token][:, 0].astype(float).tolist()


def test_ranks_merge_in_occurrence_order(tmp_path):
    files = two_ranks(tmp_path)
    for order in (files, files[::-1]):  # the order of the inputs does not matter within a gather
        combined, meta = combine_to_dict([order], cap=100, seed=0)
        assert rows_of(combined, 5) == [1, 9, 17, 25, 33]
        assert sorted(combined) == [5, 7, 9] and rows_of(combined, 9) == [10, 11]
    assert meta == {"teacher": "minilm", "hidden_size": 4, "dtype": "float16", "rows": 8,
                    "token_ids": 3, "capped": 0, "max_length": 8, "input_format": "plain"}


def test_cap_is_a_seeded_ordered_subset(tmp_path):
    files = two_ranks(tmp_path)
    first, meta = combine_to_dict([files], cap=3, seed=0)
    again, _ = combine_to_dict([files], cap=3, seed=0)
    assert meta["capped"] == 1 and len(first[5]) == 3 and rows_of(first, 9) == [10, 11]
    assert rows_of(first, 5) == rows_of(again, 5)
    kept = rows_of(first, 5)
    assert kept == sorted(kept) and set(kept) <= {1, 9, 17, 25, 33}
    seeds = {tuple(rows_of(combine_to_dict([files], cap=3, seed=s)[0], 5)) for s in range(8)}
    assert len(seeds) > 1  # the choice depends on the seed


def test_tasks_follow_each_other_in_input_order(tmp_path):
    a, b = two_ranks(tmp_path / "a"), [write_rank(tmp_path / "b", 0, {5: [0, 100]}, world_size=1)]
    combined, meta = combine_to_dict([a, b], cap=100, seed=0)
    assert rows_of(combined, 5) == [1, 9, 17, 25, 33, 0, 100] and meta["rows"] == 10
    combined, _ = combine_to_dict([b, a], cap=100, seed=0)
    assert rows_of(combined, 5) == [0, 100, 1, 9, 17, 25, 33]


def test_resolve_inputs_groups_by_gather_folder(tmp_path):
    files = two_ranks(tmp_path / "t1" / "gather")
    other = write_rank(tmp_path / "t2" / "gather", 0, {5: [3]}, world_size=1)
    (files[0].parent / "rank0.part00000.pkl").write_bytes(b"")  # parts and index files are not inputs
    groups = resolve_inputs([str(files[1]), "t2", str(files[0].parent)],
                            task_gather_dir=lambda name: tmp_path / name / "gather")
    assert groups == [[files[1].resolve(), files[0].resolve()], [other.resolve()]]
    with pytest.raises(UserError, match="missing file or folder"):
        resolve_inputs([str(tmp_path / "nope" / "rank0.pkl")], task_gather_dir=lambda n: tmp_path)
    with pytest.raises(UserError, match="nothing gathered"):
        resolve_inputs(["t3"], task_gather_dir=lambda name: tmp_path / name / "gather")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no rank<R>.pkl files"):
        resolve_inputs([str(tmp_path / "empty")], task_gather_dir=lambda n: tmp_path)


def test_reads_the_originals_bare_dicts(tmp_path):
    """The original's rank pickles: dict token -> fp32 (n, d) arrays, no manifest, no index."""
    bare = tmp_path / "orig"
    bare.mkdir()
    for rank, rows in enumerate(([[1.0, 1.0], [2.0, 2.0]], [[3.0, 3.0]])):
        with open(bare / f"rank{rank}.pkl", "wb") as fh:
            pickle.dump({np.int64(11): np.asarray(rows, dtype=np.float32)}, fh)
    combined, meta = combine_to_dict([resolve_inputs([str(bare)], lambda n: bare)[0]], cap=100, seed=0)
    assert list(combined) == [11] and isinstance(next(iter(combined)), int)
    assert rows_of(combined, 11) == [1, 2, 3]  # file order: there are no occurrence ids
    assert meta["hidden_size"] == 2 and meta["dtype"] == "float32" and meta["teacher"] is None


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 8}, "inputs differ in hidden size"),
    ({"dtype": "float32"}, "inputs differ in dtype"),
    ({"teacher": "other"}, "inputs differ in teacher"),
])
def test_refuses_mixed_teachers_sizes_dtypes(tmp_path, change, message):
    a = two_ranks(tmp_path / "a")
    b = [write_rank(tmp_path / "b", 0, {5: [0]}, world_size=1, **change)]
    with pytest.raises(UserError, match=message):
        combine_to_dict([a, b], cap=100, seed=0)


def test_refuses_incomplete_or_mixed_gathers(tmp_path):
    files = two_ranks(tmp_path / "a")
    with pytest.raises(UserError, match=r"gather of 2 ranks is incomplete \(missing rank 1\)"):
        combine_to_dict([files[:1]], cap=100, seed=0)
    mixed = [files[0], write_rank(tmp_path / "a", 1, {5: [9]}, seed=1)]
    with pytest.raises(UserError, match="rank files from different gathers"):
        combine_to_dict([mixed], cap=100, seed=0)


def test_refuses_bad_files(tmp_path):
    files = two_ranks(tmp_path)
    files[1].write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(UserError, match="corrupt pickle"):
        combine_to_dict([files], cap=100, seed=0)
    save_pickle([1, 2], files[1])
    with pytest.raises(UserError, match="expected a dict token_id"):
        combine_to_dict([files], cap=100, seed=0)
    save_pickle({5: np.zeros(3)}, files[1])
    with pytest.raises(UserError, match="entry 5 is not"):
        combine_to_dict([files], cap=100, seed=0)
    write_rank(tmp_path, 1, {5: [9, 25]})
    save_pickle({5: np.array([9])}, index_path(files[1]))
    with pytest.raises(UserError, match="does not match"):
        combine_to_dict([files], cap=100, seed=0)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(files[1], "wb") as fh:
        pickle.dump({5: Evil()}, fh)
    with pytest.raises(UserError, match="unsafe pickle"):
        combine_to_dict([files], cap=100, seed=0)
    with pytest.raises(UserError, match="--cap must be >= 1"):
        combine_to_dict([files[:1]], cap=0, seed=0)


@pytest.mark.parametrize("states, message", [
    ({5: np.array([[0.0, np.nan]], dtype=np.float32)}, "the states of token 5 hold NaN (not an overflow"),
    ({5: np.array([[0.0, np.inf]], dtype=np.float16)}, "the states of token 5 hold infinities"),
    ({5: np.array([[1.0, "a"]], dtype=object)}, "the states of token 5 are object, not one of float16"),
    ({5: np.ones((2, 2), dtype=np.int64)}, "the states of token 5 are int64"),
    ({-3: np.ones((2, 2), dtype=np.float16)}, "token id -3 is not a non-negative integer"),
    ({True: np.ones((2, 2), dtype=np.float16)}, "token id True is not"),
    ({5: np.ones((0, 2), dtype=np.float16)}, "entry 5 is not (it is (0, 2))"),
])
def test_refuses_states_that_are_not_finite_float_rows(tmp_path, states, message):
    path = tmp_path / "rank0.pkl"
    save_pickle(states, path)  # a hand-made or damaged input (no manifest, like the original's)
    with pytest.raises(UserError, match=re.escape(message)):
        combine_to_dict([[path]], cap=100, seed=0)


def test_the_row_file_holds_the_pickles_rows_token_by_token(tmp_path):
    combined, meta = combine_to_dict([two_ranks(tmp_path / "gather")], cap=100, seed=0)
    output = tmp_path / "combined.pkl"
    write_combined(combined, meta, output, config={"cap": 100}, inputs={})
    assert load_pickle(output).keys() == combined.keys()  # the original's format, unchanged
    rows = np.load(rows_path(output))
    assert rows.shape == (8, 4) and rows.dtype == np.float16
    np.testing.assert_array_equal(rows, np.concatenate([combined[t] for t in sorted(combined)]))
    assert np.load(tokens_path(output)).tolist() == [[5, 0, 5], [7, 5, 6], [9, 6, 8]]
    files = read_manifest(output)["extra"]["files"]
    assert files["pickle_sha256"] == fingerprint(output) and files["rows_shape"] == [8, 4]

    by_token = open_combined(output, fingerprint(output))
    assert sorted(by_token) == [5, 7, 9] and len(by_token) == 3
    for token, expected in combined.items():
        assert type(by_token[token]) is np.ndarray and not by_token[token].flags.writeable  # mapped
        np.testing.assert_array_equal(by_token[token], expected)
    assert open_combined(output, "another pickle") is None  # combined.pkl replaced: read it instead

    np.save(tokens_path(output), np.array([[5, 0, 9]], dtype=np.int64))
    with pytest.raises(UserError, match="row file or token table is missing or was replaced"):
        open_combined(output, fingerprint(output))


def test_a_token_table_must_tile_the_row_file():
    from embdistill.senses.combine import _covers

    table = np.array([[5, 0, 3], [7, 3, 5]], dtype=np.int64)
    assert _covers(table, 5) and _covers(np.empty((0, 3), dtype=np.int64), 0)
    assert not _covers(table, 6)  # rows no token owns
    assert not _covers(np.array([[5, 0, 3], [7, 4, 5]], dtype=np.int64), 5)  # a gap
    assert not _covers(np.array([[7, 0, 3], [5, 3, 5]], dtype=np.int64), 5)  # ids out of order
    assert not _covers(np.array([[5, 0, 0], [7, 0, 5]], dtype=np.int64), 5)  # an empty token
    assert not _covers(table.astype(np.float64), 5) and not _covers(table[:, :2], 5)


def brute_force(groups: list[list[tuple[dict | None, dict]]], cap: int, seed: int) -> dict:
    """The combine's definition, row by row: per token, each gather's rows in occurrence order
    (file order without occurrence ids), gathers in input order, then ``cap`` of them chosen
    by the RNG keyed by (seed, token), in order."""
    combined = {}
    for token in sorted({t for group in groups for _, states in group for t in states}):
        rows = []
        for group in groups:
            keyed = [(occurrences[token][i] if occurrences else (f, i), states[token][i])
                     for f, (occurrences, states) in enumerate(group) if token in states
                     for i in range(len(states[token]))]
            rows += [row for _, row in sorted(keyed, key=lambda pair: pair[0])]
        rows = np.stack(rows)
        if len(rows) > cap:
            rows = rows[np.sort(np.random.default_rng([seed, token]).choice(len(rows), cap, replace=False))]
        combined[token] = rows
    return combined


def test_the_streamed_files_equal_a_brute_force_combine_byte_for_byte(tmp_path):
    """Three interleaved ranks of one gather, then the original's two bare files, a cap that
    binds: combined.pkl is the reference dict's pickle byte for byte; without a pickle the row
    file is the same bytes, its manifest beside it, and a stale combined.pkl is removed."""
    rng = np.random.default_rng(0)
    gathered, bare = [], []
    occurrence_ids = rng.permutation(400)
    for rank in range(3):  # occurrence ids dealt to the ranks at random: rows interleave
        mine = occurrence_ids[rank::3]
        tokens = rng.integers(0, 30, len(mine))
        occurrences = {int(t): np.sort(mine[tokens == t]) for t in np.unique(tokens)}
        states = {t: rng.normal(size=(len(o), 8)).astype(np.float16) for t, o in occurrences.items()}
        write_rank(tmp_path / "a", rank, occurrences, world_size=3, hidden_size=8, states=states)
        gathered.append((occurrences, states))
    for rank in range(2):
        states = {int(t): rng.normal(size=(int(rng.integers(1, 9)), 8)).astype(np.float16)
                  for t in rng.choice(40, 15, replace=False)}
        save_pickle(states, tmp_path / "b" / f"rank{rank}.pkl")
        bare.append((None, states))
    groups = resolve_inputs([str(tmp_path / "a"), str(tmp_path / "b")], lambda name: tmp_path / name)
    reference = brute_force([gathered, bare], cap=12, seed=3)
    save_pickle(reference, tmp_path / "reference.pkl")

    output = tmp_path / "out" / "combined.pkl"
    meta = combine(groups, 12, 3, output, config={}, inputs={})  # auto: small, so a pickle
    assert meta["capped"] > 0 and meta["rows"] == sum(len(r) for r in reference.values())
    assert output.read_bytes() == (tmp_path / "reference.pkl").read_bytes()
    np.testing.assert_array_equal(np.load(rows_path(output)), np.concatenate(list(reference.values())))
    rows_bytes = rows_path(output).read_bytes()

    combine(groups, 12, 3, output, config={}, inputs={}, combined_pickle="never")
    assert not output.exists() and rows_path(output).read_bytes() == rows_bytes
    assert read_manifest(output) is None and read_manifest(rows_path(output))["stage"] == "combine"
    assert combined_artifact(output) == rows_path(output)
    by_token = open_combined(rows_path(output), fingerprint(rows_path(output)))
    assert sorted(by_token) == sorted(reference)
    for token, rows in reference.items():
        np.testing.assert_array_equal(by_token[token], rows)
    rows_path(output).write_bytes(rows_bytes[:-2] + b"\x00\x00")  # one value changed
    with pytest.raises(UserError, match="is not the row file its manifest describes"):
        open_combined(rows_path(output), fingerprint(rows_path(output)))


def test_combined_pickle_option_and_skip(tmp_path, capsys):
    """--combined-pickle never: only the row files; a rerun under never or auto is done; always
    redoes it with the pickle, and the row file's own manifest goes."""
    two_ranks(tmp_path / "gather")
    output = tmp_path / "combined.pkl"
    args = ["--inputs", str(tmp_path / "gather"), "--output", str(output)]
    assert run_stage("a0_generate_combinepkl.py", *args, "--combined-pickle", "never") == 0
    assert not output.exists() and read_manifest(rows_path(output))["extra"]["rows"] == 8
    capsys.readouterr()
    for mode in ("never", "auto"):
        assert run_stage("a0_generate_combinepkl.py", *args, "--combined-pickle", mode) == 0
        assert "up to date, skipping" in capsys.readouterr().err
    assert run_stage("a0_generate_combinepkl.py", *args, "--combined-pickle", "always") == 0
    assert "skipping" not in capsys.readouterr().err
    assert sorted(load_pickle(output)) == [5, 7, 9] and read_manifest(rows_path(output)) is None
    assert combined_artifact(output) == output


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_a_pickle_read_a_block_at_a_time_equals_it_loaded_whole(tmp_path, monkeypatch, protocol):
    """open_stored_pickle: protocol 5's C-ordered 2-d arrays stay in the file (inside a frame or,
    large, outside), each block read from it (a file cut short meanwhile: one line); everything else (other protocols, a Fortran-ordered
    or read-only array, a 1-d one) is read as load_pickle reads it; an array met twice is one
    object; a truncated file and a refused global are load_pickle's one-line errors."""
    monkeypatch.setattr(rowfile, "ROW_BLOCK_BYTES", 1000)
    rng = np.random.default_rng(0)
    read_only = rng.normal(size=(3000, 8))
    read_only.flags.writeable = False
    states = {1: rng.normal(size=(3, 8)).astype(np.float32), 2: rng.normal(size=(5000, 8)).astype(np.float16),
              3: np.asfortranarray(rng.normal(size=(300, 40))), 4: read_only, 5: rng.normal(size=(5,)),
              6: np.zeros((0, 4))}
    states[7] = states[1]
    path = tmp_path / "states.pkl"
    path.write_bytes(pickle.dumps(states, protocol=protocol))
    whole = load_pickle(path)
    with rowfile.open_stored_pickle(path) as stored:
        assert list(stored) == list(whole) and stored[7] is stored[1]
        for token, rows in stored.items():
            assert rows.dtype == whole[token].dtype and rows.shape == whole[token].shape
            if rows.ndim == 2 and len(rows):
                np.testing.assert_array_equal(np.concatenate([b for _, b in rowfile.row_blocks(rows)]), whole[token])
        kinds = {t: type(rows).__name__ for t, rows in stored.items()}
        if protocol == 5:  # cut short while open: its rows are read from the file
            with open(path, "r+b") as fh:
                fh.truncate(stored[2].offset + 10)
            with pytest.raises(UserError, match="truncated while it was being read"):
                list(rowfile.row_blocks(stored[2]))
    assert kinds == ({1: "StoredRows", 2: "StoredRows", 3: "ndarray", 4: "ndarray", 5: "ndarray", 6: "StoredRows",
                      7: "StoredRows"} if protocol == 5 else dict.fromkeys(states, "ndarray"))
    path.write_bytes(pickle.dumps(states, protocol=protocol)[:-100])
    with pytest.raises(UserError, match="corrupt pickle"):
        with rowfile.open_stored_pickle(path):
            pass

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path.write_bytes(pickle.dumps({5: states[2], 6: Evil()}, protocol=protocol))
    with pytest.raises(UserError, match="unsafe pickle"):
        with rowfile.open_stored_pickle(path):
            pass


MEMORY_CHILD = """
import resource, sys
from pathlib import Path
from embdistill.artifacts import load_pickle
from embdistill.senses.combine import combine, resolve_inputs

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

mode, headroom, output, *folders = sys.argv[1:]
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + int(headroom), resource.RLIM_INFINITY))
groups = resolve_inputs(folders, lambda name: Path(name))
if mode == "one":  # the control: one rank file in memory, as the combine's second pass held it
    states = load_pickle(groups[0][0])
else:
    combine(groups, 1_000_000, 0, Path(output), {}, {}, combined_pickle="never")
"""


def test_combine_holds_a_block_of_rows_not_a_rank_file(tmp_path):
    """168 MB of states in 4 rank files of 42 MB (100 tokens of 120 rows of 1 KB, and one token
    of 30,000 rows: 30 MB), combined under an address-space limit of 24 MB above the child's own
    after its imports: holding one rank file (the control, as the combine's second pass did)
    fails under it; the combine, which reads a token's rows 4 MiB at a time, does not."""
    rng = np.random.default_rng(0)
    first_rows = {0: [], 100: []}  # tokens 0 and 100: their first row in each rank file
    for gather in ("a", "b"):
        for rank in range(2):
            occurrences = {t: np.arange(rank, 240, 2) for t in range(100)} | {100: np.arange(rank, 60_000, 2)}
            states = {t: rng.normal(size=(len(o), 256)).astype(np.float32) for t, o in occurrences.items()}
            write_rank(tmp_path / gather, rank, occurrences, hidden_size=256, dtype="float32", states=states)
            for token, rows in first_rows.items():
                rows.append(states[token][0])
    output = tmp_path / "combined.pkl"

    def child(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", MEMORY_CHILD, mode, str(24 << 20), str(output),
                               str(tmp_path / "a"), str(tmp_path / "b")],
                              capture_output=True, text=True, timeout=300, env=subprocess_env())

    control = child("one")
    assert control.returncode != 0 and "MemoryError" in control.stderr
    streamed = child("combine")
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    rows = np.load(rows_path(output), mmap_mode="r")
    assert rows.shape == (2 * (100 * 240 + 60_000), 256)  # token 0: a's occurrences 0, 1, ... then b's
    np.testing.assert_array_equal(rows[[0, 1, 240, 241]], np.stack(first_rows[0]))
    big = 2 * 100 * 240  # token 100's first row
    np.testing.assert_array_equal(rows[[big, big + 1, big + 60_000, big + 60_001]], np.stack(first_rows[100]))
