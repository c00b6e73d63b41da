"""The results table of a run: ``table.json``, ``table.md`` and ``accuracy.png``.

Rows are models, columns tasks. Every score is read back from the mteb result file that
mteb wrote (``table.json`` keeps each file's path, relative to the table's folder), never
from memory: the table cannot disagree with the files it cites. A cell is mteb's main score
(accuracy: the mean over its experiments) +- the sample standard deviation (ddof=1) of the
per-experiment accuracies in the same file. Beside the tasks: the mean over tasks, the mean
relative to the first teacher row (when there is one), the parameter count (plus the sense
dictionary's values in replace mode) and the encoding throughput measured in the same run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifacts import atomic_open, load_json, save_json
from ..errors import UserError


@dataclass
class ModelRow:
    """What an evaluation knows about one model besides its scores."""

    label: str
    kind: str
    spec: str
    n_parameters: int
    dictionary_values: int
    texts_per_second: float
    result_files: dict[str, Path] = field(default_factory=dict)  # mteb task name -> file


def read_score(path: Path, eval_splits: list[str], main_score: str = "accuracy") -> dict:
    """Main score and per-experiment scores of one mteb result file.

    With several (split, subset) entries the main score is their mean and experiment i's
    score the mean of the entries' experiment i (our tasks have one entry)."""
    result = load_json(path)
    try:
        entries = [entry for split in eval_splits for entry in result["scores"][split]]
        main = float(np.mean([entry["main_score"] for entry in entries]))
        per_experiment = np.mean(
            [[experiment[main_score] for experiment in entry["scores_per_experiment"]]
             for entry in entries], axis=0).tolist()
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not an mteb classification result ({type(exc).__name__}: {exc})") from None
    std = float(np.std(per_experiment, ddof=1)) if len(per_experiment) > 1 else 0.0
    return {"accuracy": main, "std": std, "per_experiment": per_experiment}


def build_table(run: str, rows: list[ModelRow], tasks: dict[str, dict], table_dir: Path,
                throughput: dict | None = None) -> dict:
    """The table as a dict (the content of table.json).

    ``tasks``: mteb task name -> ``{"eval_splits", "samples_per_label", "n_experiments"}``;
    ``throughput``: how texts/s was measured (``task``, ``texts``, ``batch_size``, ``device``,
    ``cpu_threads``), the same for every row."""
    teacher = next((row.label for row in rows if row.kind == "teacher"), None)
    models = []
    for row in rows:
        scores = {}
        for name, protocol in tasks.items():
            path = Path(row.result_files[name])
            scores[name] = {**read_score(path, protocol["eval_splits"]),
                            "result_file": os.path.relpath(path, table_dir)}
        models.append({
            "label": row.label,
            "kind": row.kind,
            "spec": row.spec,
            "n_parameters": row.n_parameters,
            "dictionary_values": row.dictionary_values,
            "texts_per_second": row.texts_per_second,
            "scores": scores,
            "mean_accuracy": float(np.mean([s["accuracy"] for s in scores.values()])),
        })
    if teacher is not None:
        reference = next(model for model in models if model["label"] == teacher)
        for model in models:
            for name, score in model["scores"].items():
                score["relative_to_teacher"] = _ratio(score["accuracy"], reference["scores"][name]["accuracy"])
            model["relative_to_teacher"] = _ratio(model["mean_accuracy"], reference["mean_accuracy"])
    return {
        "run": run,
        "main_score": "accuracy",
        "std": "sample standard deviation (ddof=1) of the accuracy across mteb's experiments",
        "result_files_relative_to": "the folder of this file",
        "teacher": teacher,
        "tasks": tasks,
        "throughput": throughput,
        "models": models,
    }


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference else None  # None (JSON null): a teacher scoring 0


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def format_markdown(table: dict) -> str:
    """The table as GitHub markdown (accuracy in %, mean +- std over experiments)."""
    tasks = list(table["tasks"])
    has_teacher = table["teacher"] is not None
    header = ["model", *tasks, "mean"]
    if has_teacher:
        header.append(f"vs {table['teacher']}")
    header += ["params", "texts/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in table["models"]:
        cells = [model["label"]]
        cells += [f"{_percent(model['scores'][t]['accuracy'])} ± {_percent(model['scores'][t]['std'])}"
                  for t in tasks]
        cells.append(_percent(model["mean_accuracy"]))
        if has_teacher:
            relative = model["relative_to_teacher"]
            cells.append("n/a" if relative is None else f"{_percent(relative)}%")
        params = _millions(model["n_parameters"])
        if model["dictionary_values"]:
            params += f" + {_millions(model['dictionary_values'])} dict"
        cells += [params, f"{model['texts_per_second']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    protocol = "; ".join(f"{name}: {p['samples_per_label']} samples/label, {p['n_experiments']} experiments"
                         for name, p in table["tasks"].items())
    lines += ["", f"Accuracy (%) of mteb's logistic regression, mean ± std over experiments ({protocol}).",
              "Scores are read from the mteb result files listed in table.json."]
    speed = table.get("throughput")
    if speed:
        lines.append(f"texts/s: {speed['texts']} texts of {speed['task']} embedded in batches of "
                     f"{speed['batch_size']} on {speed['device']} ({speed['cpu_threads']} CPU threads, "
                     "onnxruntime models as many), after one warm-up batch, every model the same.")
    return "\n".join(lines) + "\n"


def plot_accuracy(table: dict, path: Path) -> None:
    """Grouped bars: one group per task (and the mean), one bar per model, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*table["tasks"], "mean"]
    models = table["models"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * len(models) + 2.0), 5.0))
    for i, model in enumerate(models):
        heights = [100 * model["scores"][t]["accuracy"] for t in table["tasks"]]
        errors = [100 * model["scores"][t]["std"] for t in table["tasks"]]
        heights.append(100 * model["mean_accuracy"])
        errors.append(0.0)
        positions = np.arange(len(groups)) + (i - (len(models) - 1) / 2) * width
        bars = ax.bar(positions, heights, width, yerr=errors, capsize=2, label=model["label"])
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small", padding=2)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=15 if len(groups) > 4 else 0)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{table['run']}: accuracy, mean ± std over experiments", fontsize="medium")
    ax.legend(fontsize="small", ncols=min(len(models), 4), loc="upper center",
              bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


def write_table(table: dict, table_dir: Path) -> dict[str, Path]:
    """Write table.json, table.md and accuracy.png atomically; return their paths."""
    files = {"json": table_dir / "table.json", "md": table_dir / "table.md",
             "png": table_dir / "accuracy.png"}
    save_json(table, files["json"])
    with atomic_open(files["md"], "w") as fh:
        fh.write(format_markdown(table))
    plot_accuracy(table, files["png"])
    return files
