"""Multi-teacher distillation: shards and their alignment, the LSA teacher, the corpus, the
student with its heads, and the two stages end to end (kill -9 and resume, two DDP ranks).

Tiny models throughout (a random 2-layer BERT as teacher and student); the real MiniLM only
in the test marked slow.
"""

from __future__ import annotations

import json
import os
import random
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
from embdistill.multiteacher.corpus import build_corpus, unique_texts
from embdistill.multiteacher.lsa import LsaModel, analyze, fit_lsa
from embdistill.multiteacher.model import (Collator, DistillationDataset, MultiTeacherStudent, kernel_head,
                                           regression_head)
from embdistill.objectives import MULTITEACHER_OBJECTIVES, KernelNLL, TeacherMSE, objective_named
from embdistill.multiteacher.monitor import TrainingMonitor, mean_pairwise_cosine, probe_metrics
from embdistill.multiteacher.shards import (INDEX_NAME, TeacherTargets, finish_teacher,
                                            load_teacher_targets, shard_files, target_statistics,
                                            text_id, write_teacher_shards)
from embdistill.multiteacher.train import export_checkpoint
from embdistill.multiteacher.warmup import fit_heads
from embdistill.validation import CheckpointSelection, ValidationHook, validation_split
from helpers import free_port, killed_command, run_stage

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

    def encode(self, texts, batch_size, progress):
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


def test_target_statistics_equal_numpys_on_the_shards(tmp_path):
    texts = make_texts(30)  # 8 shards of 4
    write_all(tmp_path / "t", texts, world_size=3, rank_order=[2, 1, 0])
    targets = load_teacher_targets(tmp_path / "t", random.Random(2).sample(texts, len(texts)))
    rows = np.stack([targets[i] for i in range(len(targets))]).astype(np.float64)
    subset = np.array([3, 29, 0, 17, 8, 11, 25, 4, 19, 21, 6])  # a training split, across shards
    for chunk in (4, 7, 1000):  # merged chunks give the one-pass result
        mean, std = target_statistics(targets, subset, chunk=chunk)
        assert mean.dtype == std.dtype == np.float64 and mean.shape == (5,)
        np.testing.assert_allclose(mean, rows[subset].mean(0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(std, rows[subset].std(0), rtol=1e-12)
    np.testing.assert_allclose(target_statistics(targets)[1], rows.std(0), rtol=1e-12)
    constant = TeacherTargets("c", [np.ones((4, 2), np.float16)], np.zeros(4, np.int32), np.arange(4))
    assert np.array_equal(target_statistics(constant)[1], [1.0, 1.0])  # no division by zero


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
                     # a bag of words reads whole texts (its shards did): no length to cut it to
                     f"lsa=st:{tmp_path / 'embeddings' / 'a+b' / 'lsa' / 'sentence-transformer'}@own-length",
                     "BAAI__bge-small-en-v1.5=st:BAAI/bge-small-en-v1.5"]


# ------------------------------------------------------------------------------------ model


def tiny_encoder(tiny_bert_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(tiny_bert_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def linear_shapes(head) -> list[tuple[int, int]]:
    return [(l.in_features, l.out_features) for l in head.mlp if isinstance(l, torch.nn.Linear)]


def test_kernel_heads_have_hidden_layers_of_width_1_4_d_and_the_mse_head_the_authors_shape():
    assert linear_shapes(kernel_head(32, 10, hidden_layers=2)) == [(32, 14), (14, 14), (14, 20)]
    # the authors' kernel: ff_layers=3 hidden layers of int(1.4 d)
    assert linear_shapes(kernel_head(32, 384, hidden_layers=3)) == [(32, 537), (537, 537), (537, 537), (537, 768)]
    mu, rho = kernel_head(32, 10, hidden_layers=3)(torch.randn(3, 32))
    assert mu.shape == rho.shape == (3, 10)
    # the authors' MSE head: d_s -> d_s -> d_s -> d_k, mu only
    head = regression_head(32, 10)
    assert linear_shapes(head) == [(32, 32), (32, 32), (32, 10)]
    mu, rho = head(torch.randn(3, 32))
    assert mu.shape == (3, 10) and rho is None


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
    stats = {"a": (np.linspace(-1, 1, 6), np.linspace(0.5, 2, 6)), "b": (np.full(3, 0.3), np.full(3, 0.1))}
    model = MultiTeacherStudent(tiny_encoder(tiny_bert_dir), {"a": 6, "b": 3}, "mean", target_stats=stats)
    predictions = model(batch["input_ids"], batch["attention_mask"])
    scaled = {k: (batch["targets"][k] - torch.tensor(m, dtype=torch.float32)) / torch.tensor(s, dtype=torch.float32)
              for k, (m, s) in stats.items()}  # the heads learn the standardised targets

    nll = KernelNLL(normalize_by_dim=True)(model, batch)
    expected, _ = GaussianKernelNLLLoss(True)(predictions, scaled)
    assert nll.count == 4 and torch.allclose(nll.loss, expected)
    assert {"nll/a", "log_lambda/a", "sq_err/b"} <= set(nll.metrics)

    mse = TeacherMSE()(model, batch)
    expected = sum(masked_mse(predictions[k][0], scaled[k])[0] for k in ("a", "b"))
    assert torch.allclose(mse.loss, expected)
    mse.loss.backward()
    last = model.heads[0].mlp[-1].weight.grad
    assert last[:6].abs().sum() > 0 and last[6:].abs().sum() == 0  # rho's rows: no gradient
    with pytest.raises(UserError, match="--loss"):
        objective_named(MULTITEACHER_OBJECTIVES, "cosine")
    separate = MultiTeacherStudent(tiny_encoder(tiny_bert_dir), {"a": 6, "b": 3}, "mean", heads="regression")
    assert TeacherMSE()(separate, batch).count == 4
    with pytest.raises(UserError, match="kernel heads"):
        KernelNLL()(separate, batch)


def toy_data(n: int, dims=(("a", 6), ("b", 3)), seed: int = 3):
    """n texts and random teacher vectors, as a DistillationDataset."""
    texts = make_texts(n, seed=seed)
    targets = [TeacherTargets(name, [np.random.default_rng(k).normal(size=(n, d)).astype(np.float16)],
                              np.zeros(n, np.int32), np.arange(n)) for k, (name, d) in enumerate(dims)]
    return DistillationDataset(texts, targets)


def test_head_warmup_fits_the_heads_on_cached_embeddings_and_leaves_the_student_alone(tiny_bert_dir):
    from transformers import AutoTokenizer

    dataset = toy_data(24)
    collator = Collator(AutoTokenizer.from_pretrained(tiny_bert_dir), ["a", "b"], 32)
    torch.manual_seed(0)
    model = MultiTeacherStudent(tiny_encoder(tiny_bert_dir), {"a": 6, "b": 3}, "mean")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = KernelNLL()
    summary = fit_heads(model, dataset, collator, loss, steps=30, batch_size=5, texts_per_step=8, lr=1e-2,
                        weight_decay=0.01, max_grad_norm=0.0, seed=1, device=torch.device("cpu"),
                        env=DistEnv())
    after = model.state_dict()
    assert summary["texts"] == 24 and summary["steps"] == 30  # 30 x 8 > 24: the whole set, cycled
    for key in before:
        if key.startswith("heads."):
            continue
        assert torch.equal(before[key], after[key]), key  # the student did not move
    assert not torch.equal(before["heads.0.mlp.0.weight"], after["heads.0.mlp.0.weight"])
    assert all(p.grad is None for p in model.parameters())
    assert summary["last_loss"] < summary["first_loss"]
    full = next(iter(DataLoaderLike(dataset, collator)))
    with torch.no_grad():
        model.eval()
        fitted = loss(model, full).loss  # the whole set, after: lower than the first step's loss
    assert float(fitted) < summary["first_loss"]
    small = fit_heads(model, dataset, collator, loss, steps=2, batch_size=5, texts_per_step=4, lr=1e-2,
                      weight_decay=0.0, max_grad_norm=0.5, seed=1, device=torch.device("cpu"), env=DistEnv())
    assert small["texts"] == 8  # only what 2 steps of 4 texts need is encoded


def DataLoaderLike(dataset, collator):
    yield collator(dataset.items(range(len(dataset))))


def test_probe_metrics_are_r2_and_mean_pairwise_cosine(tiny_bert_dir):
    from transformers import AutoTokenizer

    dataset = toy_data(10)
    batch = Collator(AutoTokenizer.from_pretrained(tiny_bert_dir), ["a", "b"], 32)(dataset.items(range(10)))
    stats = {"a": (np.full(6, 0.2), np.full(6, 2.0)), "b": (np.zeros(3), np.ones(3))}
    model = MultiTeacherStudent(tiny_encoder(tiny_bert_dir), {"a": 6, "b": 3}, "cls", target_stats=stats).train()
    metrics = probe_metrics(model, batch)
    assert model.training  # left as found
    with torch.no_grad():
        model.eval()
        embedding = model.embed(batch["input_ids"], batch["attention_mask"]).numpy().astype(np.float64)
        mu = model.predict(torch.from_numpy(embedding).float())["a"][0].numpy().astype(np.float64)
    target = batch["targets"]["a"].numpy().astype(np.float64)
    mu = mu * 2.0 + 0.2  # the heads predict standardised targets: R2 is measured in the teacher's space
    r2 = 1 - ((target - mu) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    assert metrics["r2/a"] == pytest.approx(r2, rel=1e-4, abs=1e-5)
    unit = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
    cosines = [unit[i] @ unit[j] for i in range(10) for j in range(10) if i != j]
    assert metrics["cosine"] == pytest.approx(np.mean(cosines), abs=1e-5)
    assert mean_pairwise_cosine(torch.ones(4, 3)) == pytest.approx(1.0)


class StubStudent(torch.nn.Module):
    """Embeds every batch as ``self.vectors``; its heads predict zeros."""

    def __init__(self, vectors):
        super().__init__()
        self.vectors = vectors

    def embed(self, input_ids, attention_mask):
        return self.vectors

    def predict(self, embedding):
        return {"a": (torch.zeros(len(embedding), 2), None)}

    def scale_targets(self, targets):
        return targets

    def unscale_predictions(self, predictions):
        return predictions


def test_the_monitor_warns_once_when_the_embeddings_collapse_and_validates_every_n(caplog):
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3),
             "targets": {"a": torch.randn(4, 2)}}
    model = StubStudent(torch.eye(4))  # orthogonal: cosine 0
    validations = []
    selection = CheckpointSelection("last", None)
    hook = ValidationHook(lambda m: validations.append(1) or {"loss": 1.5}, selection, val_every=3)
    monitor = TrainingMonitor(batch, log_every=2, validation=hook)
    with caplog.at_level("WARNING", logger="embdistill.multiteacher.monitor"):
        rows = {step: monitor(model, step, finished=step == 7) for step in range(1, 8)}
        assert [s for s, row in rows.items() if "cosine" in row] == [2, 4, 6, 7]
        assert [s for s, row in rows.items() if "val/loss" in row] == [3, 6, 7] and len(validations) == 3
        assert selection.history[-1] == {"step": 7, "loss": 1.5} and rows[2]["cosine"] == pytest.approx(0.0)
        model.vectors = torch.ones(4, 4) + 0.01 * torch.eye(4)  # all one direction
        for step in (8, 10):
            assert monitor(model, step, finished=False)["cosine"] > 0.95
        model.vectors = torch.eye(4)
        monitor(model, 12, finished=False)
        model.vectors = torch.ones(4, 4)
        monitor(model, 14, finished=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "step 8" in warnings[0] and "step 14" in warnings[1]
    assert "collapsing" in warnings[0] and "\n" not in warnings[0]


# ------------------------------------------------------------------------- stages end to end

SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# Runs a stage script with one method wrapped to SIGKILL the process on its n-th call: a real
# kill -9 at a known point (no cleanup, no exception handlers).
def run_script(script: str, *args, status: int = 0) -> None:
    """A stage script in this process, as its command line runs it; it exits with ``status``."""
    assert run_stage(f"scripts/{script}", *args) == status


def run_killed(module, owner, method, n, script, *args) -> subprocess.CompletedProcess:
    command = killed_command(module, owner, method, n, REPO / "scripts" / script, *args)
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
    killed = run_killed("embdistill.multiteacher.sentence_teacher", "SentenceTeacher", "encode", 3,
                        "10_teacher_embeddings.py", *teacher_args(base, task_file, tiny_bert_dir))
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


def pipeline_teachers(folder: Path, tiny_bert_dir) -> dict[str, Path]:
    """Two sentence-transformers teachers on the tiny BERT whose embeddings are not the mean of
    its token states: CLS pooling, and mean pooling followed by a Dense layer (32 -> 16, tanh)
    and Normalize; both read up to 64 tokens."""
    from sentence_transformers import SentenceTransformer

    from embdistill.students import sentence_transformer_modules

    modules = sentence_transformer_modules()
    tails = {"cls-teacher": lambda: [modules.Pooling(32, pooling_mode="cls")],
             "dense-teacher": lambda: [modules.Pooling(32, pooling_mode="mean"), modules.Dense(32, 16),
                                       modules.Normalize()]}
    torch.manual_seed(1)
    for name, tail in tails.items():
        transformer = modules.Transformer(str(tiny_bert_dir), max_seq_length=64)
        SentenceTransformer(modules=[transformer, *tail()], device="cpu").save(str(folder / name))
    return {name: folder / name for name in tails}


def test_encoder_teachers_embed_through_their_own_sentence_transformers_pipeline(tmp_path, task_file,
                                                                                 tiny_bert_dir):
    from sentence_transformers import SentenceTransformer

    from embdistill.artifacts import read_manifest
    from embdistill.multiteacher.teacher_embeddings import load_encoder
    from embdistill.teachers import load_teacher

    teachers = pipeline_teachers(tmp_path, tiny_bert_dir)
    base = tmp_path / "base"
    run_script("00_texts.py", "--task", task_file, "--base-dir", base)
    stage = ["--task", task_file, "--base-dir", base, "--teachers", *teachers.values(), "--shard-size", 30,
             "--batch-size", 8, "--max-length", 16]
    run_script("10_teacher_embeddings.py", *stage)
    texts = json.loads((base / "embeddings" / "toy" / "corpus.json").read_text())

    def stored(name):
        return load_teacher_targets(base / "embeddings" / "toy" / name, texts).rows(np.arange(len(texts)))

    def encoded(folder, max_seq_length):
        model = SentenceTransformer(str(folder), device="cpu")
        model.max_seq_length = max_seq_length
        return model.encode(texts)

    for name, folder in teachers.items():
        expected = encoded(folder, 16)  # --max-length 16 cuts the teacher's own 64
        stage_encoder = load_encoder(str(folder), base, 16)
        np.testing.assert_allclose(stage_encoder.encode(texts, batch_size=8, progress=False), expected,
                                   rtol=0, atol=1e-5)
        np.testing.assert_allclose(stored(name), expected, rtol=1e-3, atol=1e-5)  # float16 storage
        assert np.abs(encoded(folder, 64) - expected).max() > 1e-3  # the cut was in force (noise: 1e-6)
        config = read_manifest(base / "embeddings" / "toy" / name / INDEX_NAME)["config"]
        assert config["max_length"] == 16
        assert [m["type"].rsplit(".", 1)[1] for m in config["pipeline"]["modules"]] == (
            ["Transformer", "Pooling"] if name == "cls-teacher" else ["Transformer", "Pooling", "Dense", "Normalize"])
    # what the shards held before: the mean of the token states, whatever the teacher's pipeline
    mean_pooled = load_teacher(str(teachers["cls-teacher"]), device="cpu").encode(texts, max_length=16)
    assert np.abs(stored("cls-teacher") - mean_pooled).max() > 0.1
    assert stored("dense-teacher").shape == (64, 16) and mean_pooled.shape == (64, 32)
    np.testing.assert_allclose(np.linalg.norm(stored("dense-teacher"), axis=1), 1, atol=2e-3)

    # the same pipeline is skipped; another pooling in the same folder redoes the shards
    index_manifest = base / "embeddings" / "toy" / "cls-teacher" / f"{INDEX_NAME}.manifest.json"
    before = index_manifest.read_text()
    run_script("10_teacher_embeddings.py", *stage)
    assert index_manifest.read_text() == before
    pooling = teachers["cls-teacher"] / "1_Pooling" / "config.json"
    pooling.write_text(pooling.read_text().replace('"cls"', '"mean"'))
    run_script("10_teacher_embeddings.py", *stage)
    assert index_manifest.read_text() != before
    np.testing.assert_allclose(stored("cls-teacher"), encoded(teachers["cls-teacher"], 16), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(stored("cls-teacher"), mean_pooled, rtol=1e-3, atol=1e-5)  # now it mean-pools


def test_a_teacher_without_a_sentence_transformers_pipeline_is_refused_in_one_line(minilm_dir):
    from embdistill.multiteacher.sentence_teacher import teacher_source

    assert teacher_source("minilm") == str(minilm_dir) and teacher_source("BAAI/bge-m3") == "BAAI/bge-m3"
    with pytest.raises(UserError, match="'llm2vec-llama3-8b' is not a sentence-transformers model"):
        teacher_source("llm2vec-llama3-8b")


def train_args(base, task_file, tiny_bert_dir, run):
    return ["--task", task_file, "--base-dir", base, "--teachers", tiny_bert_dir, "lsa", "--run", run,
            "--student", tiny_bert_dir, "--student-layers", 0, "--max-steps", 6, "--batch-size", 8,
            "--save-every", 2, "--log-every", 1, "--warmup-steps", 1, "--lr", 1e-3, "--max-length", 32,
            "--head-warmup-steps", 3, "--val-every", 4, "--keep-best", "loss"]


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
    # the validated steps (the untrained start included) and the kept one survive the kill
    selection = json.loads((runs / "reference" / "selection.json").read_text())
    assert selection == json.loads((runs / "resumed" / "selection.json").read_text())
    scores = {row["step"]: row["loss"] for row in selection["scores"]}
    assert list(scores) == [0, 4, 6] and selection["kept_step"] == min(scores, key=scores.get)
    kept = selection["kept_step"]
    metrics = [json.loads(line) for line in (runs / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [0, 1, 2, 3, 4, 5, 6]
    teacher = Path(tiny_bert_dir).name
    for row in metrics[1:]:  # the loss's parts, the heads' fit and the embeddings' spread, every row
        assert {f"log_lambda/{teacher}", "sq_err/lsa", f"r2/{teacher}", "r2/lsa", "cosine"} <= set(row)
    assert [row["step"] for row in metrics if "val/loss" in row] == [0, 4, 6]
    assert {"val/similarity", "val/cka"} <= set(metrics[0])
    assert metrics[-1]["val/loss"] == pytest.approx(validation["loss"])
    warmup = json.loads((runs / "reference" / "head_warmup.json").read_text())
    assert warmup["steps"] == 3 and warmup["texts"] == 3 * 8  # what 3 steps of 8 texts need (of 61)

    # standardisation (the NLL's default): numpy's statistics of the training split, in
    # config.json and the checkpoint
    config = json.loads((runs / "reference" / "config.json").read_text())["run"]
    assert config["standardize"] is True and set(config["target_stats"]) == {teacher, "lsa"}
    texts = json.loads((teacher_base / "embeddings" / "toy" / "corpus.json").read_text())
    train_index, _ = validation_split(len(texts), 0.05, 0)
    for k, name in enumerate((teacher, "lsa")):
        rows = load_teacher_targets(teacher_base / "embeddings" / "toy" / name, texts).rows(train_index)
        for field, expected in (("mean", rows.astype(np.float64).mean(0)), ("std", rows.astype(np.float64).std(0))):
            np.testing.assert_allclose(state_at(runs / "resumed", 6)[f"scalers.{k}.{field}"].numpy(),
                                       expected, rtol=1e-6, atol=1e-7)

    # the exported SentenceTransformer is the kept student: same embeddings as its weights'
    model = MultiTeacherStudent(tiny_encoder(tiny_bert_dir), {Path(tiny_bert_dir).name: 32, "lsa": 8}, "mean")
    best = torch.load(runs / "reference" / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == kept
    model.load_state_dict(best["model"])
    texts = make_texts(3, seed=9)
    batch = AutoTokenizer.from_pretrained(tiny_bert_dir)(texts, padding=True, truncation=True,
                                                          max_length=32, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(model.eval().embed(batch["input_ids"], batch["attention_mask"]), dim=-1)
    exported = SentenceTransformer(str(runs / "reference" / "export" / "st"), device="cpu")
    assert np.allclose(exported.encode(texts), expected.numpy(), atol=1e-5)
    # a checkpoint exported afterwards: the kept one is the export, another one another model
    for step in (6, 4):
        folder = export_checkpoint(runs / "reference" / "checkpoints" / f"step-{step:08d}.pt",
                                   teacher_base / "curve" / f"step-{step}")
        embedded = SentenceTransformer(str(folder / "st"), device="cpu").encode(texts)
        assert np.allclose(embedded, expected.numpy(), atol=1e-5) == (step == kept)

    # done: a rerun skips; bad input is one line
    run_script("11_train_multiteacher.py", *train_args(teacher_base, task_file, tiny_bert_dir, "reference"))


def state_at(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}.pt", weights_only=True)["model"]


def test_mse_trains_on_the_raw_targets_by_default_its_loss_a_plain_mse(teacher_base, task_file, tiny_bert_dir,
                                                                          capsys):
    from transformers import AutoTokenizer

    capsys.readouterr()
    run_script("11_train_multiteacher.py", "--task", task_file, "--base-dir", teacher_base, "--teachers",
               tiny_bert_dir, "lsa", "--run", "mse-default", "--loss", "mse", "--student", tiny_bert_dir,
               "--student-layers", 0, "--max-steps", 2, "--batch-size", 8, "--save-every", 2, "--lr", 1e-3,
               "--max-length", 32, "--head-warmup-steps", 0, "--val-every", 0)
    assert "mse-default (mse, raw targets): 2 steps" in capsys.readouterr().out
    run_dir = teacher_base / "runs" / "toy" / "mse-default"
    config = json.loads((run_dir / "config.json").read_text())["run"]
    assert config["standardize"] is False and config["target_stats"] is None

    # the validation loss, recomputed from the final weights: the sum over teachers of the mean
    # squared difference between the head's output and the teacher's stored vector
    teacher = Path(tiny_bert_dir).name
    model = MultiTeacherStudent(tiny_encoder(tiny_bert_dir), {teacher: 32, "lsa": 8}, "mean", heads="regression")
    model.load_state_dict(state_at(run_dir, 2))
    texts = json.loads((teacher_base / "embeddings" / "toy" / "corpus.json").read_text())
    _, val_index = validation_split(len(texts), 0.05, 0)
    batch = AutoTokenizer.from_pretrained(tiny_bert_dir)([texts[i] for i in val_index], padding=True,
                                                         truncation=True, max_length=32, return_tensors="pt")
    expected = 0.0
    with torch.no_grad():
        states = model.eval().encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].unsqueeze(-1).float()
        embedding = (states.last_hidden_state * mask).sum(1) / mask.sum(1)
        for k, name in enumerate((teacher, "lsa")):
            raw = load_teacher_targets(teacher_base / "embeddings" / "toy" / name, texts).rows(val_index)
            expected += float(((model.heads[k].mlp(embedding) - torch.from_numpy(raw)) ** 2).mean())
    validation = json.loads((run_dir / "validation.json").read_text())
    assert validation["texts"] == 3 and validation["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss, flags, standardized", [
    ("nll", [], True), ("mse", [], False), ("mse", ["--standardize"], True), ("nll", ["--no-standardize"], False)])
def test_standardize_defaults_by_loss_and_an_explicit_flag_wins(loss, flags, standardized):
    from embdistill.drivers import DRIVERS
    from embdistill.multiteacher.train import check_options

    args = DRIVERS["multiteacher"].stages["train"].parser.parse_args(["--task", "toy", "--loss", loss, *flags])
    check_options(args)
    assert args.standardize is standardized  # what run_identity records in config.json


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
    """Two NLL steps of a tiny student on 16 texts with random teachers, standardised targets,
    heads warmed up for 3 steps and trained at their own lr; its final state."""
    from transformers import AutoTokenizer

    from embdistill.distributed import dist_env
    from embdistill.train_config import TrainConfig
    from embdistill.training import Trainer

    dataset = toy_data(16)
    stats = {t.name: target_statistics(t) for t in dataset.targets}
    torch.manual_seed(0)
    encoder = tiny_encoder(tiny_bert_dir)
    encoder.pooler.requires_grad_(False)  # off the embedding's path (as build_student does)
    model = MultiTeacherStudent(encoder, {"a": 6, "b": 3}, "cls", target_stats=stats)
    config = TrainConfig(epochs=1, batch_size=batch_size, lr=1e-3, warmup_steps=0, max_steps=2,
                         max_grad_norm=0.5, save_every=100, log_every=1, schedule="constant")
    collator = Collator(AutoTokenizer.from_pretrained(tiny_bert_dir), ["a", "b"], 32)
    loss = KernelNLL()
    env = dist_env()

    def warm_up(module):
        fit_heads(module, dataset, collator, loss, steps=3, batch_size=batch_size, texts_per_step=8, lr=1e-2,
                  weight_decay=0.01, max_grad_norm=0.5, seed=0, device=torch.device("cpu"), env=env)

    trainer = Trainer(model, loss, dataset, collator, config, out_dir, run_config={"toy": 1}, device="cpu",
                      param_groups=model.param_groups(1e-3, 1e-2), on_fresh_start=warm_up)
    trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(out_dir: str, tiny_bert_dir: str, batch_size: str) -> None:
    from embdistill.distributed import cleanup, dist_env, init_distributed

    init_distributed(timeout_s=300)
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
