"""Multi-teacher distillation: shards and their alignment, the LSA teacher, the corpus, the
student with its heads, and the two stages end to end (kill -9 and resume, two DDP ranks).

Tiny models throughout (a random 2-layer BERT as teacher and student); the real MiniLM only
in the test marked slow.
"""

from __future__ import annotations

import json
import os
import random
import runpy
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embdistill.distributed import DistEnv
from embdistill.errors import UserError
from embdistill.losses.gaussian_nll import GaussianKernelNLLLoss
from embdistill.losses.mse import masked_mse
from embdistill.multiteacher.corpus import build_corpus, unique_texts, validation_split
from embdistill.multiteacher.lsa import LsaModel, analyze, fit_lsa
from embdistill.multiteacher.model import (Collator, DistillationDataset, MultiTeacherStudent,
                                           TeacherHead, make_loss_fn)
from embdistill.multiteacher.shards import (INDEX_NAME, TeacherTargets, finish_teacher,
                                            load_teacher_targets, shard_files, text_id,
                                            write_teacher_shards)
from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
WORDS = ("market stock bank rates price growth team match goal season player coach film music "
         "star award show album phone data chip software cloud court vote party minister law "
         "bill rain storm cold heat river city road train car").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + f". Item {i}!"
             for i in range(n)]
    return unique_texts(texts)


class FakeTeacher:
    """Each text's vector is a function of the text alone, so pairings can be checked."""

    def __init__(self, dim: int = 5):
        self.dim = dim
        self.calls = 0

    def vector(self, text: str) -> np.ndarray:
        return np.random.default_rng(text_id(text) % 2**32).normal(size=self.dim).astype(np.float32)

    def encode(self, texts, batch_size, max_length, progress):
        self.calls += 1
        return np.stack([self.vector(t) for t in texts])


def write_all(folder, texts, world_size=1, rank_order=None, teacher=None, shard_size=4, config=None):
    teacher = teacher or FakeTeacher()
    config = config or {"teacher": "fake"}
    for rank in rank_order or range(world_size):
        write_teacher_shards(teacher, texts, folder, teacher_config=config, shard_size=shard_size,
                             env=DistEnv(rank=rank, world_size=world_size))
    assert finish_teacher(folder, texts, teacher_config=config, shard_size=shard_size)
    return teacher


def shard_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("shard-*.npy"))}


# ------------------------------------------------------------------------------ text ids, shards


def test_text_ids_are_the_first_8_bytes_of_sha256_signed_big_endian():
    assert text_id("hello") == 3238736544897475342
    assert text_id("embdistill") == -5159181181089860800


def test_shard_layout_does_not_depend_on_world_size_or_writing_order(tmp_path):
    texts = make_texts(30)  # 8 shards of 4, the last one short
    write_all(tmp_path / "w1", texts)
    write_all(tmp_path / "w3", texts, world_size=3, rank_order=[2, 0, 1])
    # rank 0 of 2 alone has not finished the teacher: the index waits for rank 1
    write_teacher_shards(FakeTeacher(), texts, tmp_path / "w2", teacher_config={"teacher": "fake"},
                         shard_size=4, env=DistEnv(rank=0, world_size=2))
    assert not finish_teacher(tmp_path / "w2", texts, teacher_config={"teacher": "fake"}, shard_size=4)
    assert sorted(p.name for p in (tmp_path / "w2").glob("shard-*.ids.npy")) == [
        f"shard-{i}.ids.npy" for i in (0, 2, 4, 6)]
    write_all(tmp_path / "w2", texts, world_size=2, rank_order=[1])

    reference = shard_bytes(tmp_path / "w1")
    assert len(reference) == 16
    for other in ("w2", "w3"):
        assert shard_bytes(tmp_path / other) == reference
        assert json.loads((tmp_path / other / INDEX_NAME).read_text()) == json.loads(
            (tmp_path / "w1" / INDEX_NAME).read_text())


def test_each_text_gets_its_own_vector_whatever_the_order(tmp_path):
    texts = make_texts(30)
    teacher = write_all(tmp_path / "t", texts, world_size=3, rank_order=[1, 2, 0])
    shuffled = random.Random(1).sample(texts, len(texts))
    targets = load_teacher_targets(tmp_path / "t", shuffled)
    assert len(targets) == len(texts) and targets.dim == 5
    for i, text in enumerate(shuffled):
        assert np.allclose(targets[i], teacher.vector(text), atol=2e-3)  # float16 storage
    subset = targets.subset([7, 3])
    assert np.array_equal(subset[0], targets[7]) and np.array_equal(subset[1], targets[3])
    few = load_teacher_targets(tmp_path / "t", shuffled[:4])  # the student may use a part
    assert np.array_equal(few[2], targets[2])


def damage_flip_bytes(folder):
    path = shard_files(folder, 1)[0]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_truncate(folder):
    path = shard_files(folder, 2)[0]
    path.write_bytes(path.read_bytes()[:100])


def damage_drop_ids(folder):
    shard_files(folder, 0)[1].unlink()


def damage_duplicate_shard(folder):
    """Shard 1's files replaced by shard 0's (manifest included, so checksums agree)."""
    for source, target in zip(shard_files(folder, 0), shard_files(folder, 1)):
        shutil.copy(source, target)
    shutil.copy(str(shard_files(folder, 0)[0]) + ".manifest.json", str(shard_files(folder, 1)[0]) + ".manifest.json")


def damage_other_dimension(folder):
    """Shard 1 taken from the same corpus encoded by a 7-d teacher."""
    other = folder.parent / "other"
    write_all(other, make_texts(30), teacher=FakeTeacher(dim=7))
    for name in ("shard-1.npy", "shard-1.ids.npy", "shard-1.npy.manifest.json"):
        shutil.copy(other / name, folder / name)


def damage_no_index(folder):
    (folder / (INDEX_NAME + ".manifest.json")).unlink()


@pytest.mark.parametrize("damage, message", [
    (damage_flip_bytes, "corrupt or unfinished shard"),
    (damage_truncate, "corrupt or unfinished shard"),
    (damage_drop_ids, "shard-0.ids.npy: missing"),
    (damage_duplicate_shard, "more than one vector"),
    (damage_other_dimension, r"disagree on the dimension \(\[5, 7\]"),
    (damage_no_index, "missing or incomplete"),
])
def test_damaged_or_mismatched_shards_are_refused(tmp_path, damage, message):
    texts = make_texts(30)
    folder = tmp_path / "teacher"
    write_all(folder, texts)
    damage(folder)
    with pytest.raises(UserError, match=message) as error:
        load_teacher_targets(folder, texts)
    assert "\n" not in str(error.value) and "10_teacher_embeddings" in str(error.value)


def test_texts_without_a_vector_are_refused(tmp_path):
    texts = make_texts(30)
    write_all(tmp_path / "t", texts)
    with pytest.raises(UserError, match=r"1 of 31 texts have no vector \(e.g. 'a text no teacher saw'\)"):
        load_teacher_targets(tmp_path / "t", texts + ["a text no teacher saw"])


def test_an_interrupted_writer_resumes_where_it_stopped(tmp_path):
    texts = make_texts(30)
    write_all(tmp_path / "reference", texts)

    class DiesOnThirdShard(FakeTeacher):
        def encode(self, texts, **kwargs):
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().encode(texts, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        write_all(tmp_path / "resumed", texts, teacher=DiesOnThirdShard())
    assert not (tmp_path / "resumed" / INDEX_NAME).exists()
    rerun = write_all(tmp_path / "resumed", texts)
    assert rerun.calls == 8 - 2  # only the missing shards
    assert shard_bytes(tmp_path / "resumed") == shard_bytes(tmp_path / "reference")

    # another teacher config (other weights, settings) redoes every shard
    assert write_all(tmp_path / "resumed", texts, config={"teacher": "fake", "v": 2}).calls == 8
    # a larger, older corpus's extra shards are removed, not mixed in
    write_all(tmp_path / "resumed", texts[:10])
    assert len(shard_bytes(tmp_path / "resumed")) == 2 * 3
    assert len(load_teacher_targets(tmp_path / "resumed", texts[:10])) == 10


# ------------------------------------------------------------------------------------- LSA


def test_lsa_transform_equals_sklearn_and_its_exports(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    train, held_out = make_texts(120, seed=0), make_texts(20, seed=1)
    held_out += ["", "unseen words only", "MARKET, market; Market!"]
    model = fit_lsa(train, dim=8, min_df=2, max_features=None, seed=3)
    # an independent sklearn pipeline with the same settings
    vectorizer = TfidfVectorizer(analyzer=analyze, min_df=2)
    svd = TruncatedSVD(8, random_state=3).fit(vectorizer.fit_transform(train))
    expected = normalize(svd.transform(vectorizer.transform(held_out)))
    embeddings = model.transform(held_out)
    assert embeddings.shape == (23, 8) and embeddings.dtype == np.float32
    assert np.allclose(embeddings, expected, atol=1e-6)
    assert not embeddings[20].any() and not embeddings[21].any()  # no known term: zeros
    assert np.allclose(np.linalg.norm(embeddings[:20], axis=1), 1, atol=1e-6)

    model.save(tmp_path / "model")
    for file in (tmp_path / "model").iterdir():  # plain data: JSON and pickle-free npy
        assert file.suffix in (".json", ".npy")
        if file.suffix == ".npy":
            np.load(file, allow_pickle=False)
    assert np.array_equal(LsaModel.load(tmp_path / "model").transform(held_out), embeddings)
    model.export_sentence_transformer(tmp_path / "st")
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")  # stock modules: no remote code
    assert np.allclose(st.encode(held_out), embeddings, atol=1e-6)


def test_lsa_refuses_too_few_terms_and_incomplete_folders(tmp_path):
    with pytest.raises(UserError, match="dimension 64 needs more than 64 distinct terms"):
        fit_lsa(make_texts(20), dim=64, min_df=1)
    fit_lsa(make_texts(50), dim=4, min_df=1).save(tmp_path / "model")
    (tmp_path / "model.manifest.json").unlink()
    with pytest.raises(UserError, match="no complete LSA model"):
        LsaModel.load(tmp_path / "model")


# ----------------------------------------------------------------------------------- corpus


def corpus_args(**overrides) -> Namespace:
    args = dict(task=["bbc-news"], text_column="text", label_column="label", corpus="tasks",
                corpus_columns=None, corpus_split="train", max_texts=None)
    return Namespace(**{**args, **overrides})


def test_hub_corpus_flattens_text_cells_and_fails_in_one_line_offline(tmp_path):
    folder = tmp_path / "triplets"
    folder.mkdir()
    rows = [{"query": "q one", "pos": ["p one", "p two"], "neg": ["n one"], "score": 1},
            {"query": "q two ", "pos": ["p one"], "neg": [], "score": 2}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts, config, _ = build_corpus(corpus_args(corpus=f"hub:{folder}"), tmp_path)
    assert texts == ["q one", "q two", "p one", "p two", "n one"]
    texts, _, _ = build_corpus(corpus_args(corpus=f"hub:{folder}", corpus_columns=["pos"], max_texts=1), tmp_path)
    assert texts == ["p one"]
    with pytest.raises(UserError, match="no column"):
        build_corpus(corpus_args(corpus=f"hub:{folder}", corpus_columns=["answer"]), tmp_path)

    with pytest.raises(UserError) as error:  # HF_HUB_OFFLINE=1 (conftest)
        build_corpus(corpus_args(corpus="hub:someone/medi-triplets"), tmp_path)
    assert "someone/medi-triplets" in str(error.value) and "\n" not in str(error.value)


def test_validation_split_is_disjoint_seeded_and_complete():
    train, val = validation_split(100, 0.1, seed=4)
    assert len(val) == 10 and not set(train) & set(val) and sorted([*train, *val]) == list(range(100))
    assert np.array_equal(validation_split(100, 0.1, seed=4)[1], val)
    assert not np.array_equal(validation_split(100, 0.1, seed=5)[1], val)
    assert len(validation_split(100, 0.0, seed=4)[1]) == 0
    with pytest.raises(UserError):
        validation_split(100, 1.0, seed=0)


def test_evaluation_specs_name_every_exported_model(tmp_path, minilm_dir):
    from embdistill.multiteacher import evaluation_models
    from embdistill.paths import Paths

    specs = evaluation_models(Paths(tmp_path, "a+b"), ["minilm", "lsa", "BAAI/bge-small-en-v1.5"],
                              {"nll-student": "mt-nll", "mse-student": "mt-mse"})
    runs = tmp_path / "runs" / "a+b"
    assert specs == [f"nll-student=st:{runs / 'mt-nll' / 'export' / 'st'}",
                     f"mse-student=st:{runs / 'mt-mse' / 'export' / 'st'}",
                     f"student-before=st:{runs / 'mt-nll' / 'initial' / 'st'}",
                     f"minilm=st:{minilm_dir}",
                     f"lsa=st:{tmp_path / 'embeddings' / 'a+b' / 'lsa' / 'sentence-transformer'}",
                     "BAAI__bge-small-en-v1.5=st:BAAI/bge-small-en-v1.5"]


# ------------------------------------------------------------------------------------ model


def tiny_encoder(tiny_bert_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(tiny_bert_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_heads_are_three_layer_mlps_of_width_1_4_d(tiny_bert_dir):
    head = TeacherHead(32, 10)
    layers = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in layers] == [(32, 14), (14, 14), (14, 20)]
    mu, rho = head(torch.randn(3, 32))
    assert mu.shape == rho.shape == (3, 10)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_student_pools_as_asked(tiny_bert_dir, pooling):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = tokenizer(["a short text", "a much longer text with more words in it"], padding=True,
                      return_tensors="pt")
    model = MultiTeacherStudent(tiny_encoder(tiny_bert_dir), {"a": 6}, pooling).eval()
    states = model.encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = states[:, 0] if pooling == "cls" else (states * mask).sum(1) / mask.sum(1)
    assert torch.allclose(model.embed(batch["input_ids"], batch["attention_mask"]), expected, atol=1e-6)


def test_loss_functions_nll_and_mse_through_the_same_heads(tiny_bert_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = make_texts(4)
    targets = [TeacherTargets(name, [np.random.default_rng(k).normal(size=(4, d)).astype(np.float16)],
                              np.zeros(4, np.int32), np.arange(4)) for k, (name, d) in enumerate([("a", 6), ("b", 3)])]
    batch = Collator(tokenizer, ["a", "b"], 32)([DistillationDataset(texts, targets)[i] for i in range(4)])
    assert batch["targets"]["b"].shape == (4, 3) and batch["targets"]["a"].dtype == torch.float32
    model = MultiTeacherStudent(tiny_encoder(tiny_bert_dir), {"a": 6, "b": 3}, "mean")
    predictions = model(batch["input_ids"], batch["attention_mask"])

    nll = make_loss_fn("nll", normalize_by_dim=True)(model, batch)
    expected, _ = GaussianKernelNLLLoss(True)(predictions, batch["targets"])
    assert nll.count == 4 and torch.allclose(nll.loss, expected)

    mse = make_loss_fn("mse")(model, batch)
    expected = sum(masked_mse(predictions[k][0], batch["targets"][k])[0] for k in ("a", "b"))
    assert torch.allclose(mse.loss, expected)
    mse.loss.backward()
    last = model.heads[0].mlp[-1].weight.grad
    assert last[:6].abs().sum() > 0 and last[6:].abs().sum() == 0  # rho's rows: no gradient
    with pytest.raises(UserError, match="--loss"):
        make_loss_fn("cosine")


# ------------------------------------------------------------------------- stages end to end

SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# Runs a stage script with one method wrapped to SIGKILL the process on its n-th call: a real
# kill -9 at a known point (no cleanup, no exception handlers).
KILLER = """
import importlib, os, runpy, signal, sys
module, owner, method, n, script = sys.argv[1:6]
cls = getattr(importlib.import_module(module), owner)
original, calls = getattr(cls, method), []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(cls, method, dying)
sys.argv = [script] + sys.argv[6:]
runpy.run_path(script, run_name="__main__")
"""


def run_script(script: str, *args, status: int = 0) -> None:
    """A stage script in this process (``run_main`` exits with ``status``)."""
    argv = sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(str(REPO / "scripts" / script), run_name="__main__")
    finally:
        sys.argv = argv
    assert exited.value.code == status


def run_killed(module, owner, method, n, script, *args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", KILLER, module, owner, method, str(n),
               str(REPO / "scripts" / script), *map(str, args)]
    return subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    texts = make_texts(80, seed=7)
    path.write_text("".join(json.dumps({"text": t, "label": t.split()[0]}) + "\n" for t in texts))
    return path


def teacher_args(base, task_file, tiny_bert_dir):
    return ["--task", task_file, "--base-dir", base, "--teachers", tiny_bert_dir, "lsa",
            "--shard-size", 10, "--batch-size", 4, "--lsa-dim", 8, "--lsa-min-df", 1]


@pytest.fixture(scope="module")
def teacher_base(tmp_path_factory, task_file, tiny_bert_dir):
    """A base folder with stage 0 (toy task, 64 training texts) and the teacher stage done."""
    base = tmp_path_factory.mktemp("base")
    run_script("00_texts.py", "--task", task_file, "--base-dir", base)
    run_script("10_teacher_embeddings.py", *teacher_args(base, task_file, tiny_bert_dir))
    return base


def test_teacher_stage_killed_then_rerun_matches_an_uninterrupted_run(tmp_path, teacher_base, task_file,
                                                                      tiny_bert_dir):
    base = tmp_path / "base"
    run_script("00_texts.py", "--task", task_file, "--base-dir", base)
    killed = run_killed("embdistill.teachers", "Teacher", "encode", 3, "10_teacher_embeddings.py",
                        *teacher_args(base, task_file, tiny_bert_dir))
    assert killed.returncode == -9, killed.stderr[-2000:]
    teacher = Path(tiny_bert_dir).name
    folder = base / "embeddings" / "toy" / teacher
    assert len(list(folder.glob("shard-*.npy.manifest.json"))) == 2  # two shards done, then killed
    assert not (folder / INDEX_NAME).exists()

    run_script("10_teacher_embeddings.py", *teacher_args(base, task_file, tiny_bert_dir))
    for name in (teacher, "lsa"):
        done, expected = base / "embeddings" / "toy" / name, teacher_base / "embeddings" / "toy" / name
        assert shard_bytes(done) == shard_bytes(expected) and len(shard_bytes(done)) == 2 * 7
        assert (done / INDEX_NAME).read_text() == (expected / INDEX_NAME).read_text()
    texts = json.loads((base / "embeddings" / "toy" / "corpus.json").read_text())
    assert len(texts) == 64
    first = json.loads((base / "text_train" / "toy" / "train.json").read_text())[0]
    assert "!@#$%^&*()" in first and "!@#$%^&*()" not in texts[0]  # teachers see plain text


def test_teacher_stage_under_torchrun_with_two_ranks_writes_the_same_shards(tmp_path, teacher_base, task_file,
                                                                           tiny_bert_dir):
    base = tmp_path / "base"
    run_script("00_texts.py", "--task", task_file, "--base-dir", base)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(REPO / "scripts" / "10_teacher_embeddings.py"), *map(str, teacher_args(base, task_file, tiny_bert_dir))]
    done = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 wrote 3 shards" in done.stdout and "rank 0 wrote 4 shards" in done.stdout
    for name in (Path(tiny_bert_dir).name, "lsa"):
        done_dir, expected = base / "embeddings" / "toy" / name, teacher_base / "embeddings" / "toy" / name
        assert shard_bytes(done_dir) == shard_bytes(expected)
        assert (done_dir / INDEX_NAME).is_file()


def train_args(base, task_file, tiny_bert_dir, run):
    return ["--task", task_file, "--base-dir", base, "--teachers", tiny_bert_dir, "lsa", "--run", run,
            "--student", tiny_bert_dir, "--student-layers", 0, "--max-steps", 6, "--batch-size", 8,
            "--save-every", 2, "--log-every", 1, "--warmup-steps", 1, "--lr", 1e-3, "--max-length", 32]


def test_training_killed_then_rerun_matches_an_uninterrupted_run(teacher_base, task_file, tiny_bert_dir):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    run_script("11_train_multiteacher.py", *train_args(teacher_base, task_file, tiny_bert_dir, "reference"))
    killed = run_killed("embdistill.training", "Trainer", "_step", 5, "11_train_multiteacher.py",
                        *train_args(teacher_base, task_file, tiny_bert_dir, "resumed"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    runs = teacher_base / "runs" / "toy"
    assert sorted(p.name for p in (runs / "resumed" / "checkpoints").glob("step-*.pt")) == [
        "step-00000002.pt", "step-00000004.pt"]
    assert not (runs / "resumed" / "export").exists()
    run_script("11_train_multiteacher.py", *train_args(teacher_base, task_file, tiny_bert_dir, "resumed"))

    reference = load_file(runs / "reference" / "export" / "hf" / "model.safetensors")
    resumed = load_file(runs / "resumed" / "export" / "hf" / "model.safetensors")
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.allclose(reference[key], resumed[key], rtol=0, atol=1e-6), key
    initial = load_file(runs / "reference" / "initial" / "hf" / "model.safetensors")
    assert any(not torch.equal(initial[k], reference[k]) for k in reference)  # it trained
    validation = json.loads((runs / "reference" / "validation.json").read_text())
    assert validation["texts"] == 3 and validation["global_step"] == 6  # round(0.05 * 64) held out
    assert validation == json.loads((runs / "resumed" / "validation.json").read_text())
    metrics = [json.loads(line) for line in (runs / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2, 3, 4, 5, 6]

    # the exported SentenceTransformer is the trained student: same embeddings as the checkpoint's
    state = torch.load(runs / "reference" / "checkpoints" / "step-00000006.pt", weights_only=True)
    model = MultiTeacherStudent(tiny_encoder(tiny_bert_dir), {Path(tiny_bert_dir).name: 32, "lsa": 8}, "mean")
    model.load_state_dict(state["model"])
    texts = make_texts(3, seed=9)
    batch = AutoTokenizer.from_pretrained(tiny_bert_dir)(texts, padding=True, truncation=True,
                                                          max_length=32, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(model.eval().embed(batch["input_ids"], batch["attention_mask"]), dim=-1)
    exported = SentenceTransformer(str(runs / "reference" / "export" / "st"), device="cpu")
    assert np.allclose(exported.encode(texts), expected.numpy(), atol=1e-5)

    # done: a rerun skips; bad input is one line
    run_script("11_train_multiteacher.py", *train_args(teacher_base, task_file, tiny_bert_dir, "reference"))


def test_stage_errors_are_one_line(teacher_base, task_file, capsys):
    capsys.readouterr()
    run_script("11_train_multiteacher.py", "--task", task_file, "--base-dir", teacher_base,
               "--teachers", "minilm", status=2)
    run_script("10_teacher_embeddings.py", "--task", task_file, "--base-dir", teacher_base,
               "--corpus", "hub:someone/medi-triplets", status=2)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "Traceback" not in stderr
    assert "no index.json" in errors[0] and "someone/medi-triplets" in errors[1]


def test_two_ranks_keep_identical_parameters_and_match_one_rank(tmp_path, tiny_bert_dir):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(Path(__file__)), "worker", str(tmp_path / "ddp"), str(tiny_bert_dir), "4"]
    done = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    single = _train_toy(tmp_path / "single", tiny_bert_dir, batch_size=8)
    for key in rank0:
        assert torch.allclose(rank0[key], single[key], rtol=1e-4, atol=1e-5), key
    start = MultiTeacherStudent(tiny_encoder(tiny_bert_dir), {"a": 6, "b": 3}).state_dict()
    assert not torch.equal(start["heads.0.mlp.0.weight"], single["heads.0.mlp.0.weight"])


def _train_toy(out_dir, tiny_bert_dir, batch_size: int) -> dict:
    """Two NLL steps of a tiny student on 16 texts with random teachers; its final state."""
    from transformers import AutoTokenizer

    from embdistill.training import Trainer, TrainConfig

    texts = make_texts(16, seed=3)
    targets = [TeacherTargets(name, [np.random.default_rng(k).normal(size=(16, d)).astype(np.float16)],
                              np.zeros(16, np.int32), np.arange(16)) for k, (name, d) in enumerate([("a", 6), ("b", 3)])]
    torch.manual_seed(0)
    encoder = tiny_encoder(tiny_bert_dir)
    encoder.pooler.requires_grad_(False)  # off the embedding's path (as build_student does)
    model = MultiTeacherStudent(encoder, {"a": 6, "b": 3}, "cls")
    config = TrainConfig(epochs=1, batch_size=batch_size, lr=1e-3, warmup_steps=0, max_steps=2,
                         max_grad_norm=0.5, save_every=100, log_every=1)
    collator = Collator(AutoTokenizer.from_pretrained(tiny_bert_dir), ["a", "b"], 32)
    trainer = Trainer(model, make_loss_fn("nll"), DistillationDataset(texts, targets), collator, config,
                      out_dir, run_config={"toy": 1}, device="cpu")
    trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(out_dir: str, tiny_bert_dir: str, batch_size: str) -> None:
    from embdistill.distributed import cleanup, dist_env

    state = _train_toy(out_dir, tiny_bert_dir, int(batch_size))
    torch.save(state, Path(out_dir) / f"rank{dist_env().rank}.pt")
    cleanup()


@pytest.mark.slow
def test_minilm_shards_are_minilm_sentence_embeddings(tmp_path, task_file, minilm_dir):
    """The real MiniLM teacher: its shard vectors are what SentenceTransformer(MiniLM) gives."""
    from sentence_transformers import SentenceTransformer

    run_script("00_texts.py", "--task", task_file, "--base-dir", tmp_path, "--max-train", 24)
    run_script("10_teacher_embeddings.py", "--task", task_file, "--base-dir", tmp_path, "--teachers",
               "minilm", "--shard-size", 10)
    texts = json.loads((tmp_path / "embeddings" / "toy" / "corpus.json").read_text())
    targets = load_teacher_targets(tmp_path / "embeddings" / "toy" / "minilm", texts)
    expected = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts)
    assert targets.dim == 384
    assert np.allclose(np.stack([targets[i] for i in range(len(texts))]), expected, atol=2e-3)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    sys.path.insert(0, str(Path(__file__).parent))
    _worker(*sys.argv[2:])
