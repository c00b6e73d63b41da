"""Evaluation beyond classification: the task-type selection (--task-types), the local
clustering task (bbc-news topics as an mteb AbsTaskClustering, V-measure) scored as an
independent k-means computation scores it, family means in the table, and bad types (exit 2)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from embdistill.errors import UserError
from embdistill.paths import Paths
from embdistill.tasks import resolve_task
from embdistill.texts import read_eval_split, write_texts
from test_evaluation import _single_line_error, _stage, _stage0, _topic_rows, _write_task


@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    """A base folder with a labelled two-topic task (tiny BERT's vocabulary)."""
    base = tmp_path_factory.mktemp("clustering")
    task_file = _write_task(base, "topics", _topic_rows(64))
    _stage0(base, task_file)
    return {"base": base, "task": str(task_file)}


def _independent_v_measure(embeddings: np.ndarray, labels: list[int], *, n_experiments: int, seed: int) -> float:
    """What mteb's AbsTaskClustering computes on one split, written out from its documented
    procedure with sklearn: ``n_experiments`` bootstrap samples of the split's size (Python's
    Random(seed).choices), MiniBatchKMeans (k = the number of labels, k-means++, n_init 1,
    batch 512, random_state seed) on each, the mean V-measure."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import v_measure_score

    rng, labels, scores = random.Random(seed), np.array(labels), []
    for _ in range(n_experiments):
        sample = rng.choices(range(len(labels)), k=len(labels))
        kmeans = MiniBatchKMeans(n_clusters=len(set(labels.tolist())), batch_size=512, init="k-means++",
                                 n_init=1, random_state=seed)
        scores.append(v_measure_score(labels[sample], kmeans.fit_predict(embeddings[sample])))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- selection


def pairs(selected) -> list[tuple[str, str]]:
    return [(task.name, task_type) for task, task_type in selected]


def test_task_type_selection():
    from embdistill.evaluation.local_tasks import resolve_evaluation_task, select_task_types

    bbc, banking, sts = (resolve_evaluation_task(t) for t in ("bbc-news", "2", "STSBenchmark"))
    assert (banking.kind, sts.kind, sts.mteb_name) == ("hub", "hub", "STSBenchmark")  # any MTEB name
    assert pairs(select_task_types([bbc, banking, sts], None)) == [
        ("bbc-news", "Classification"), ("Banking77Classification", "Classification"), ("STSBenchmark", "STS")]
    assert pairs(select_task_types([bbc, banking, sts], ["Clustering", "STS"])) == [
        ("bbc-news", "Clustering"), ("STSBenchmark", "STS")]
    assert pairs(select_task_types([bbc], ["Clustering", "Classification"])) == [
        ("bbc-news", "Clustering"), ("bbc-news", "Classification")]
    with pytest.raises(UserError, match="unknown task type 'Clusterin'"):
        select_task_types([bbc], ["Clusterin"])
    with pytest.raises(UserError, match="none of the tasks .* is of the task types STS"):
        select_task_types([bbc, banking], ["STS"])
    with pytest.raises(UserError, match="unknown task 'NoSuchTask'"):
        resolve_evaluation_task("NoSuchTask")


# --------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def both_types(topics, tiny_bert_dir):
    """tiny BERT twice (two rows, the same model) on the topics task as both types."""
    from embdistill.evaluation.run import EvaluationConfig, evaluate

    config = EvaluationConfig(run="types", tasks=(topics["task"],), task_types=("Classification", "Clustering"),
                              models=(f"a=st:{tiny_bert_dir}", f"b=st:{tiny_bert_dir}"),
                              samples_per_label=4, n_experiments=3, batch_size=8, max_length=64,
                              throughput_texts=8)
    return evaluate(config, topics["base"], device="cpu")


def test_clustering_variant_in_the_table(both_types, topics):
    from embdistill.evaluation.table import format_markdown

    table, out = both_types, topics["base"] / "results" / "types"
    assert table["tasks"]["topics-clustering"] == {"type": "Clustering", "main_score": "v_measure",
                                                   "eval_splits": ["test"], "n_experiments": 3}
    assert table["families"] == {"Classification": ["topics"], "Clustering": ["topics-clustering"]}
    a, b = table["models"]
    for model in (a, b):
        score = model["scores"]["topics-clustering"]
        entry = json.loads((out / score["result_file"]).read_text())["scores"]["test"][0]
        assert score["score"] == entry["main_score"] == entry["v_measure"]
        assert score["per_experiment"] == entry["v_measures"]["Level 0"] and len(score["per_experiment"]) == 3
        assert score["std"] == pytest.approx(np.std(score["per_experiment"], ddof=1))
        assert model["family_means"] == {"Classification": model["scores"]["topics"]["score"],
                                         "Clustering": score["score"]}
        assert model["mean"] == pytest.approx(np.mean(list(model["family_means"].values())))
    # mteb's clustering samples from a generator that advances per evaluation; reset before
    # each one, the same model in the second row is scored on the same samples.
    assert a["scores"]["topics-clustering"]["per_experiment"] == b["scores"]["topics-clustering"]["per_experiment"]
    markdown = (out / "table.md").read_text()
    assert markdown == format_markdown(table)
    assert ("| model | topics (accuracy) | topics-clustering (v_measure) | Classification mean | Clustering mean "
            "| mean over tasks | mean over families |") in markdown
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bbc_news_clustering_equals_an_independent_computation(tmp_path, minilm_dir, monkeypatch, capsys):
    """Stage 06 on real bbc-news topics (a few held-out articles) with the real MiniLM: the
    table's V-measure is the one sklearn gives on the same embeddings."""
    from sentence_transformers import SentenceTransformer

    task = resolve_task("bbc-news")
    write_texts(task, Paths(tmp_path, task.slug), task.load_splits(seed=0, max_train=40, max_test=60),
                config={"test": True})
    code, err = _stage(monkeypatch, capsys, "--base-dir", str(tmp_path), "--task", "bbc-news", "--run", "bbc",
                       "--task-types", "Clustering", "--n-experiments", "4", "--max-length", "128",
                       "--models", f"minilm=st:{minilm_dir}")
    assert code == 0, err
    table = json.loads((tmp_path / "results" / "bbc" / "table.json").read_text())
    assert list(table["tasks"]) == ["bbc-news-clustering"]  # Classification not selected
    score = table["models"][0]["scores"]["bbc-news-clustering"]

    test = read_eval_split(Paths(tmp_path, "bbc-news"))["test"]
    classes = sorted(set(test["label"]))
    assert len(classes) == 5 and len(test["text"]) == 60
    model = SentenceTransformer(str(minilm_dir), device="cpu")
    model.max_seq_length = 128  # an st: row reads the run's --max-length (issue 22 item 2)
    embeddings = model.encode(test["text"], batch_size=32)
    expected = _independent_v_measure(embeddings, [classes.index(y) for y in test["label"]], n_experiments=4, seed=0)
    assert score["score"] == pytest.approx(expected, abs=1e-6)
    assert 0.3 < score["score"] <= 1.0  # MiniLM separates news topics


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("types, message", [
    (["Clusterin"], "unknown task type 'Clusterin'"),
    (["STS"], "none of the tasks (topics) is of the task types STS"),
])
def test_bad_task_types_exit_2(types, message, topics, tiny_bert_dir, monkeypatch, capsys):
    code, err = _stage(monkeypatch, capsys, "--base-dir", str(topics["base"]), "--task", topics["task"],
                       "--run", "bad-types", "--task-types", *types, "--models", f"teacher:{tiny_bert_dir}")
    assert code == 2 and message in _single_line_error(err)
    assert not (topics["base"] / "results" / "bad-types").exists()


def test_hub_tasks_keep_mteb_s_code_path(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    """A hub task of another type is reached by name and loaded by mteb itself (offline: the
    one-line download error naming its dataset); a hub task of an unlisted type is left out."""
    code, err = _stage(monkeypatch, capsys, "--base-dir", str(tmp_path), "--tasks", "2", "STSBenchmark",
                       "--task-types", "STS", "--models", f"teacher:{tiny_bert_dir}")
    assert code == 2 and "could not download dataset mteb/stsbenchmark-sts" in _single_line_error(err)
