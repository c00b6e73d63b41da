"""Stage 1 (count, gather) and the combine script, on a tiny random BERT and ~30 short texts.

The gathered rows are checked against the model's own forward pass; the sample against the
keep rule; 1 vs 2 ranks (in process and under torchrun) and a SIGKILLed-then-resumed run
against an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embdistill.artifacts import load_pickle, save_pickle, write_manifest
from embdistill.distributed import DistEnv
from embdistill.errors import UserError
from embdistill.paths import Paths, slug
from embdistill.senses.gather import (
    GatherConfig,
    count_config,
    count_tokens,
    gather_shard,
    index_path,
    keep_occurrences,
    load_counts,
)
from embdistill.teachers import load_teacher
from helpers import combine_to_dict, free_port, killed_command, run_stage


def part_path(rank_file: Path, part: int) -> Path:
    """A gather part as PartFiles names it."""
    return rank_file.with_name(rank_file.name + ".parts") / f"{rank_file.stem}.part{part:05d}.npz"

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 32  # the tiny BERT has 64 positions
WORDS = "the a of to and in is on for with cat dog sat mat good bad movie team won lost market price bank".split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Examples in the train.json format: instruction, separator, 3-20 words of text."""
    rng = random.Random(seed)
    return [f"classify the topic !@#$%^&*(){' '.join(rng.choices(WORDS, k=rng.randint(3, 20)))}"
            for _ in range(n)]


def write_task(base: Path, texts: list[str], task: str = "bbc-news", teacher: str = "minilm") -> Paths:
    """A task folder as stage 0 leaves it (train.json; bbc-news resolves without loading data)."""
    paths = Paths(base, task, teacher)
    paths.text_dir.mkdir(parents=True, exist_ok=True)
    paths.train_json.write_text(json.dumps(texts))
    return paths


def run_script(script: str, *args: str, monkeypatch, capsys) -> tuple[int, str, str]:
    """A stage script's main, in this process: (exit status, stdout, stderr)."""
    code = run_stage(script, *args)
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(args: list[str], env_extra: dict | None = None, timeout: int = 120):
    """``args``: a python command line (a script and its options, or ``-c`` ...)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def gather_killed_at_part(n: int, args: list[str]):
    """02_gather.py, SIGKILLed as it starts writing its n-th part (kill -9, no cleanup)."""
    return run_subprocess(killed_command("embdistill.artifacts", "PartFiles", "write", n,
                                         REPO / "scripts/02_gather.py", *args)[1:])


@pytest.fixture(scope="module")
def teacher(tiny_bert_dir):
    return load_teacher(tiny_bert_dir, device="cpu")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return make_texts(30)


@pytest.fixture(scope="module")
def counts(teacher, texts) -> dict[int, int]:
    return count_tokens(teacher.tokenize, texts, MAX_LENGTH, progress=False)


def gather(teacher, texts, counts, out: Path, *, per_token=1000, dtype="float32", rank=0, world_size=1,
           batch_size=4, flush_every=8, seed=0) -> Path:
    """gather_shard with the tiny task's inputs (the train.json written beside ``out``)."""
    inputs = {"texts": out.parent / "train.json"}
    inputs["texts"].parent.mkdir(parents=True, exist_ok=True)
    inputs["texts"].write_text(json.dumps(texts))
    cfg = GatherConfig(str(teacher.name), MAX_LENGTH, per_token, seed, dtype)
    gather_shard(teacher, texts, counts, out, cfg, DistEnv(rank=rank, world_size=world_size),
                 inputs=inputs, batch_size=batch_size, flush_every=flush_every)
    return out


def assert_same_combined(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for token in a:
        assert a[token].shape == b[token].shape, token
        np.testing.assert_allclose(a[token].astype(np.float32), b[token].astype(np.float32), atol=atol)


# ----------------------------------------------------------------------------- the keep rule


def test_keep_rule_reproducible_and_about_per_token():
    table = np.array([0, 5, 10_000], dtype=np.int64)
    tokens = np.array([1] * 50 + [2] * 50)
    first = keep_occurrences(tokens, table, per_token=1000, seed=3, text_idx=7)
    assert np.array_equal(first, keep_occurrences(tokens, table, 1000, 3, 7))  # same key, same draws
    assert not np.array_equal(first, keep_occurrences(tokens, table, 1000, 4, 7))
    assert first[:50].all()  # a token seen 5 times (<= per_token) keeps every occurrence
    # a token seen 10,000 times keeps about per_token / count = 10% of its occurrences
    many = np.concatenate([keep_occurrences(np.full(1000, 2), table, 1000, 0, i) for i in range(20)])
    assert 0.08 < many.mean() < 0.12
    with pytest.raises(UserError, match="missing from counts.pkl"):
        keep_occurrences(np.array([0, 1]), table, 1000, 0, 0)  # token 0 was never counted


def test_count_tokens_counts_text_tokens_only(teacher, texts, counts):
    batch = teacher.tokenize(texts, MAX_LENGTH)
    assert sum(counts.values()) == int(batch["embed_mask"].sum()) > 0
    instruction_only = teacher.tokenizer.convert_tokens_to_ids(["classify", "topic"])
    assert not set(instruction_only) & set(counts)  # "classify the topic" is instruction
    assert counts == count_tokens(teacher.tokenize, texts, MAX_LENGTH, batch_size=7, progress=False)
    assert list(counts) == sorted(counts)


# ----------------------------------------------------------------------------- gathering


def test_gathered_rows_are_the_models_hidden_states(tmp_path, tiny_bert_dir, teacher, texts, counts):
    """Every text token kept (per_token >= every count): each row equals the model's final
    hidden state at its position, computed here text by text with transformers directly."""
    from transformers import AutoModel

    out = gather(teacher, texts, counts, tmp_path / "gather" / "rank0.pkl", per_token=10_000)
    states, index = load_pickle(out), load_pickle(index_path(out))
    assert {t: len(v) for t, v in states.items()} == counts
    assert all(v.dtype == np.float32 and v.shape[1] == 32 for v in states.values())
    assert not list(out.parent.glob("rank0.pkl.parts"))  # parts merged and removed, with their folder

    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    for token, rows in states.items():
        occurrences = index[token]
        assert np.all(np.diff(occurrences) > 0)  # rows in occurrence order
        for row, occurrence in zip(rows, occurrences):
            text_idx, position = divmod(int(occurrence), MAX_LENGTH)
            single = teacher.tokenize([texts[text_idx]], MAX_LENGTH)  # one text: no padding
            assert single["input_ids"][0, position] == token and single["embed_mask"][0, position] == 1
            with torch.no_grad():
                expected = model(input_ids=single["input_ids"]).last_hidden_state[0, position]
            np.testing.assert_allclose(row, expected.numpy(), atol=1e-5)


def test_sample_follows_counts_and_seed(tmp_path, teacher, texts, counts):
    out = gather(teacher, texts, counts, tmp_path / "a" / "rank0.pkl", per_token=3, dtype="float16")
    states = load_pickle(out)
    assert all(v.dtype == np.float16 for v in states.values())
    for token, n in counts.items():
        kept = len(states.get(token, ()))
        assert kept == n if n <= 3 else kept < n
    other_seed = load_pickle(gather(teacher, texts, counts, tmp_path / "b" / "rank0.pkl", per_token=3, seed=1))
    assert load_pickle(index_path(out)).keys() == states.keys()
    assert any(len(other_seed.get(t, ())) != len(states.get(t, ())) for t in counts)


def test_two_ranks_in_process_equal_one(tmp_path, teacher, texts, counts):
    """Ranks, batch size and part size change nothing once ranks are combined."""
    one = gather(teacher, texts, counts, tmp_path / "one" / "rank0.pkl", per_token=4)
    two = [gather(teacher, texts, counts, tmp_path / "two" / f"rank{r}.pkl", per_token=4, rank=r,
                  world_size=2, batch_size=3, flush_every=5) for r in range(2)]
    for rank, rank_file in enumerate(two):  # rank r gathered texts r, r+2, ...
        occurrences = np.concatenate(list(load_pickle(index_path(rank_file)).values()))
        assert len(occurrences) and np.all(occurrences // MAX_LENGTH % 2 == rank)
    combined_one, _ = combine_to_dict([[one]], cap=10_000, seed=0)
    combined_two, _ = combine_to_dict([two], cap=10_000, seed=0)
    assert_same_combined(combined_one, combined_two, atol=1e-5)


def test_more_ranks_than_texts(tmp_path, teacher, texts, counts):
    out = gather(teacher, texts[:1], counts, tmp_path / "rank1.pkl", rank=1, world_size=2)
    assert load_pickle(out) == {} and load_pickle(index_path(out)) == {}


@pytest.mark.parametrize("fault, dtype, message", [
    (float("nan"), "float32", "the teacher's states hold NaN (not an overflow of --dtype)"),
    (float("nan"), "float16", "the teacher's states hold NaN (not an overflow of --dtype)"),
    (1e6, "float16", "teacher states overflow float16 (--dtype); rerun with --dtype float32"),
])
def test_nan_states_are_not_called_an_overflow(tmp_path, teacher, texts, counts, monkeypatch, fault, dtype, message):
    real = teacher.token_states
    monkeypatch.setattr(teacher, "token_states", lambda batch: real(batch) * fault)
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        gather(teacher, texts, counts, tmp_path / "rank0.pkl", dtype=dtype)
    if fault != 1e6:  # rerunning with --dtype float32 cannot help
        assert "--dtype float32" not in str(caught.value)
    assert not (tmp_path / "rank0.pkl").exists()


class WideTeacher:
    """A stand-in teacher with wide random states (no model: the merge is what is measured)."""

    slug = name = "wide"
    hidden_size, dtype, device = 2048, torch.float32, torch.device("cpu")

    def tokenize(self, texts, max_length):
        ids = torch.tensor([[1 + (i * 7 + j) % 50 for j in range(max_length)] for i in range(len(texts))])
        ones = torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": ones, "embed_mask": ones}

    def token_states(self, batch):
        return torch.randn(*batch["input_ids"].shape, self.hidden_size)


MEMORY_CHILD = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_gather import WideTeacher
from embdistill.distributed import DistEnv
from embdistill.senses.gather import GatherConfig, count_tokens, gather_shard

folder, n_texts = Path(sys.argv[1]), int(sys.argv[3])
wide, texts = WideTeacher(), [f"text {i}" for i in range(n_texts)]
counts = count_tokens(wide.tokenize, texts, 16, progress=False)
inputs = {"texts": folder / "train.json"}
inputs["texts"].write_text(json.dumps(texts))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gather_shard(wide, texts, counts, folder / "rank0.pkl", GatherConfig("wide", 16, 10_000, 0, "float32"),
             DistEnv(), inputs=inputs, flush_every=32)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_gather_memory_is_bounded_by_its_parts_not_its_states(tmp_path):
    """64 MiB of kept states (512 texts x 16 tokens x 2048 float32, cap 10,000: every row
    kept) in parts of 4 MiB: the child's peak resident memory (ru_maxrss) grows by well under
    the states, as the merge never holds them (it did: the whole rank in memory, then pickled).
    Not an RLIMIT_AS limit as for the combine: the pickle is written from views of the mapped
    row file, which the pickler keeps to the end, so the address space does hold the file
    (its pages are dropped as they are written, which is what ru_maxrss sees)."""
    states_bytes = 512 * 16 * WideTeacher.hidden_size * 4
    child = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path), str(Path(__file__).parent), "512"],
                           capture_output=True, text=True, timeout=300, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-2000:]
    grown = int(child.stdout.split()[-1])
    assert grown < states_bytes / 2, f"peak RSS grew by {grown / states_bytes:.2f} x the states"
    assert sum(len(v) for v in load_pickle(tmp_path / "rank0.pkl").values()) == 512 * 16
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rank0.index.pkl", "rank0.index.pkl.manifest.json", "rank0.pkl", "rank0.pkl.manifest.json", "train.json"]


# ----------------------------------------------------------------------------- the scripts


@pytest.fixture
def task(tmp_path, tiny_bert_dir, texts) -> tuple[Path, Paths, list[str]]:
    """A base dir holding the tiny task's train.json; the CLI options that point at it."""
    paths = write_task(tmp_path, texts, teacher=slug(str(tiny_bert_dir)))
    options = ["--task", "bbc-news", "--base-dir", str(tmp_path), "--teacher", str(tiny_bert_dir),
               "--max-length", str(MAX_LENGTH)]
    return tmp_path, paths, options


def test_scripts_skip_finished_work_unless_overwrite(task, monkeypatch, capsys):
    base, paths, options = task
    gather_options = [*options, "--per-token", "4", "--flush-every", "8", "--batch-size", "4"]
    assert run_script("scripts/01_count.py", *options, monkeypatch=monkeypatch, capsys=capsys)[0] == 0
    code, out, _ = run_script("scripts/02_gather.py", *gather_options, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "30 texts (0 resumed)" in out
    code, out, _ = run_script("a0_generate_combinepkl.py", *options[:6], "--cap", "2",
                              monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "capped at 2" in out
    combined = load_pickle(paths.combined)
    assert combined and max(len(v) for v in combined.values()) == 2

    stamps = {p: p.stat().st_mtime_ns for p in (paths.counts, paths.gather_rank(0), paths.combined)}
    for script, args in (("scripts/01_count.py", options), ("scripts/02_gather.py", gather_options),
                         ("a0_generate_combinepkl.py", [*options[:6], "--cap", "2"])):
        code, out, err = run_script(script, *args, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0 and "up to date, skipping" in err and out == ""
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}

    code, out, _ = run_script("scripts/02_gather.py", *gather_options, "--overwrite",
                              monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and paths.gather_rank(0).stat().st_mtime_ns != stamps[paths.gather_rank(0)]
    # a changed option is not "done": the gather reruns
    code, out, _ = run_script("scripts/02_gather.py", *gather_options[:-6], "--per-token", "5",
                              monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "30 texts" in out


@pytest.mark.parametrize("case", ["empty texts", "no texts", "no counts", "counts other length",
                                  "corrupt counts", "counts disagree"])
def test_bad_inputs_fail_in_one_line(task, case, monkeypatch, capsys):
    base, paths, options = task
    script, expected = "scripts/02_gather.py", {
        "empty texts": "no training texts", "no texts": "missing", "no counts": "run scripts/01_count.py",
        "counts other length": "--max-length 8", "corrupt counts": "corrupt pickle",
        "counts disagree": "counts and train.json disagree"}[case]
    if case == "empty texts":
        paths.train_json.write_text("[]")
        script = "scripts/01_count.py"
    elif case == "no texts":
        paths.train_json.unlink()
        script = "scripts/01_count.py"
    elif case == "counts other length":
        run_script("scripts/01_count.py", *options[:-1], "8", monkeypatch=monkeypatch, capsys=capsys)
    elif case == "corrupt counts":
        paths.counts.parent.mkdir(parents=True)
        paths.counts.write_bytes(b"\x80\x04not a pickle")
    elif case == "counts disagree":
        save_pickle({1: 1}, paths.counts)
        write_manifest(paths.counts, stage="count", config=count_config(options[5], MAX_LENGTH))
    code, out, err = run_script(script, *options, monkeypatch=monkeypatch, capsys=capsys)
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(error_lines) == 1 and expected in error_lines[0], err
    assert "Traceback" not in err
    assert not paths.gather_rank(0).exists() and not list(paths.gather_dir.glob("*.parts"))
    if script.endswith("01_count.py"):
        assert not paths.counts.exists()


@pytest.mark.parametrize("recorded", [256, 512])  # 512: counts recording the --max-length asked for
def test_counts_are_checked_at_the_length_used(tmp_path, recorded):
    """On a teacher that reads 256 tokens, counts made with --max-length 512 used 256: a gather
    at 256 takes them, one at 128 is refused in one line."""
    path = tmp_path / "counts.pkl"
    save_pickle({5: 2}, path)
    write_manifest(path, stage="count", config=count_config("minilm", recorded))
    assert load_counts(path, 256, model_limit=256) == {5: 2}
    with pytest.raises(UserError, match=f"counted with --max-length {recorded}, the gather uses 128"):
        load_counts(path, 128, model_limit=256)


def test_combine_script_bad_inputs_fail_in_one_line(tmp_path, monkeypatch, capsys):
    """Nothing gathered, a corrupt rank file, mismatched hidden sizes, --inputs without
    --output: exit 2, one line, no output file."""
    output = tmp_path / "out" / "combined.pkl"
    a, b = tmp_path / "a" / "rank0.pkl", tmp_path / "b" / "rank0.pkl"
    for path, width in ((a, 4), (b, 8)):
        save_pickle({3: np.zeros((2, width), dtype=np.float16)}, path)
    corrupt = tmp_path / "c" / "rank0.pkl"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x80\x04\x95\x10")
    cases = {
        "task bbc-news: nothing gathered": ["--task", "bbc-news"],
        "corrupt pickle": ["--inputs", str(corrupt), "--output", str(output)],
        "inputs differ in hidden size: 4": ["--inputs", str(a), str(b), "--output", str(output)],
        "--output is required with --inputs": ["--inputs", str(a)],
    }
    for expected, args in cases.items():
        code, out, err = run_script("a0_generate_combinepkl.py", "--base-dir", str(tmp_path), *args,
                                    monkeypatch=monkeypatch, capsys=capsys)
        error_lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(error_lines) == 1 and expected in error_lines[0], (expected, err)
        assert not output.exists() and not (tmp_path / "work").exists()


# ----------------------------------------------------------------------------- processes


def prepared_task(base: Path, tiny_bert_dir: Path, texts: list[str]) -> tuple[Paths, list[str]]:
    paths = write_task(base, texts, teacher=slug(str(tiny_bert_dir)))
    options = ["--task", "bbc-news", "--base-dir", str(base), "--teacher", str(tiny_bert_dir),
               "--max-length", str(MAX_LENGTH)]
    return paths, options


@pytest.mark.slow  # process start-up (torch + transformers imports) dominates: ~10 s a process here
def test_torchrun_two_processes_equal_one(tmp_path, tiny_bert_dir, texts, monkeypatch, capsys):
    """02_gather.py under torchrun with 2 CPU processes, combined, equals 1 process (the same
    script run in this process)."""
    gather_args = ["--per-token", "4", "--flush-every", "6", "--batch-size", "4"]
    results = {}
    for nproc in (1, 2):
        paths, options = prepared_task(tmp_path / f"n{nproc}", tiny_bert_dir, texts)
        assert run_script("scripts/01_count.py", *options, monkeypatch=monkeypatch, capsys=capsys)[0] == 0
        if nproc == 1:
            code, _, err = run_script("scripts/02_gather.py", *options, *gather_args,
                                      monkeypatch=monkeypatch, capsys=capsys)
            assert code == 0, err
        else:
            launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
            proc = run_subprocess([*launcher, str(REPO / "scripts/02_gather.py"), *options, *gather_args])
            assert proc.returncode == 0, proc.stderr[-3000:]
        assert sorted(p.name for p in paths.gather_dir.glob("rank?.pkl")) == [f"rank{r}.pkl" for r in range(nproc)]
        code, _, err = run_script("a0_generate_combinepkl.py", *options[:6], monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        results[nproc] = load_pickle(paths.combined)
    assert_same_combined(results[1], results[2], atol=1e-3)  # float16 rows; padding differs by batch


@pytest.mark.slow  # two process start-ups
def test_killed_gather_resumes_from_parts(tmp_path, tiny_bert_dir, teacher, texts, counts, monkeypatch, capsys):
    """SIGKILL after the first part, again after the next: finished parts are not redone, and
    the finished run (here in this process) equals an uninterrupted run."""
    paths, options = prepared_task(tmp_path / "killed", tiny_bert_dir, texts)
    save_pickle(counts, paths.counts)
    write_manifest(paths.counts, stage="count", config=count_config(str(tiny_bert_dir), MAX_LENGTH))
    args = [*options, "--per-token", "4", "--flush-every", "8", "--batch-size", "4", "--dtype", "float32"]
    rank_file = paths.gather_rank(0)

    first = gather_killed_at_part(2, args)
    assert first.returncode == -9, first.stderr[-2000:]
    assert part_path(rank_file, 0).exists() and not part_path(rank_file, 1).exists()
    assert not rank_file.exists()
    part0_stamp = part_path(rank_file, 0).stat().st_mtime_ns

    second = gather_killed_at_part(2, args)
    assert second.returncode == -9
    assert "resuming, 1 of 4 parts (8 texts) already gathered" in second.stderr
    assert part_path(rank_file, 0).stat().st_mtime_ns == part0_stamp  # not redone
    assert part_path(rank_file, 1).exists() and not rank_file.exists()

    code, out, err = run_script("scripts/02_gather.py", *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "resuming, 2 of 4 parts (16 texts) already gathered" in err
    assert "30 texts (16 resumed)" in out
    assert not list(rank_file.parent.glob("*part*"))

    reference = gather(teacher, texts, counts, tmp_path / "uninterrupted" / "rank0.pkl", per_token=4)
    assert_same_combined(load_pickle(rank_file), load_pickle(reference), atol=1e-5)
    resumed_index = load_pickle(index_path(rank_file))
    for token, occurrences in load_pickle(index_path(reference)).items():
        assert np.array_equal(resumed_index[token], occurrences)


@pytest.mark.slow
def test_minilm_rows_are_its_hidden_states(tmp_path, minilm_dir):
    """The real teacher: gathered rows equal all-MiniLM-L6-v2's last hidden state."""
    from transformers import AutoModel

    minilm = load_teacher("minilm", device="cpu")
    texts = ["Classify the topic of the given news article !@#$%^&*()Shares in the bank rose after strong results.",
             "Classify the topic of the given news article !@#$%^&*()The striker scored twice as the team won.",
             "Classify the topic of the given news article !@#$%^&*()A new phone with a faster chip."]
    counts = count_tokens(minilm.tokenize, texts, 64, progress=False)
    out = tmp_path / "gather" / "rank0.pkl"
    (tmp_path / "gather").mkdir()
    (tmp_path / "train.json").write_text(json.dumps(texts))
    gather_shard(minilm, texts, counts, out, GatherConfig("minilm", 64, 1000, 0, "float32"), DistEnv(),
                 inputs={"texts": tmp_path / "train.json"}, batch_size=2, flush_every=2)
    states, index = load_pickle(out), load_pickle(index_path(out))
    assert {t: len(v) for t, v in states.items()} == counts and all(v.shape[1] == 384 for v in states.values())
    model = AutoModel.from_pretrained(minilm_dir).eval()
    tokenizer = minilm.tokenizer
    with torch.no_grad():
        direct = [model(**tokenizer(t.replace("!@#$%^&*()", ""), return_tensors="pt")).last_hidden_state[0]
                  for t in texts]
    for token, rows in states.items():
        for row, occurrence in zip(rows, index[token]):
            text_idx, position = divmod(int(occurrence), 64)
            np.testing.assert_allclose(row, direct[text_idx][position].numpy(), atol=1e-4)
