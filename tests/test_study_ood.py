"""bench/study_ood_multiteacher.py's summary: stage 6's family means, their mean, and each arm's gain over step 0."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import study_ood_multiteacher as study  # noqa: E402

FAMILIES = {"Classification": ["bbc-news"], "Clustering": ["bbc-news-clustering"],
            "Retrieval": ["bbc-news-retrieval"], "STS": ["lee-sts"]}
MAIN_SCORES = {"bbc-news": "accuracy", "bbc-news-clustering": "v_measure", "bbc-news-retrieval": "ndcg_at_10",
               "lee-sts": "cosine_spearman"}


def model(label: str, score: float) -> dict:
    # mean_over_families deliberately not the mean of family_means: the summary must take stage 6's
    family_means = {family: score + 0.01 * i for i, family in enumerate(FAMILIES)}
    return {"label": label, "family_means": family_means, "mean_over_families": score + 0.1}


def test_summary_scores_every_family_and_the_gain_over_step_0():
    labels = {"before": 0.5, "minilm": 0.8, "lsa": 0.4, "nll-s0-3": 0.6, "nll-s1-3": 0.62,
              "nll-s0-6": 0.7, "nll-s1-6": 0.72}
    table = {"families": FAMILIES, "tasks": {t: {"main_score": s} for t, s in MAIN_SCORES.items()},
             "models": [model(label, score) for label, score in labels.items()]}

    summary = study.summarise(table, ["nll"], [0, 1], [0, 3, 6])

    assert summary["columns"] == [*FAMILIES, "mean"]
    curve = summary["curves"]["nll"]
    assert curve["mean"]["mean"] == pytest.approx([60.0, 71.0, 81.0])  # stage 6's mean_over_families, in %
    assert curve["mean"]["STS"] == pytest.approx([53.0, 64.0, 74.0])
    assert curve["gain_over_step_0"] == pytest.approx({**{f: 21.0 for f in FAMILIES}, "mean": 21.0})
    text = study.markdown(summary)
    assert "Retrieval (bbc-news-retrieval ndcg_at_10)" in text and "STS (lee-sts cosine_spearman)" in text
    assert "| nll (end, 2 seeds) | 71.0 ± 1.4 | 72.0 ± 1.4 | 73.0 ± 1.4 | 74.0 ± 1.4 | 81.0 ± 1.4 | +21.0 ± 1.4 |" in text
