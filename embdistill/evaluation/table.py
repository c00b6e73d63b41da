"""The results table of a run: ``table.json``, ``table.md`` and ``scores.png``.

Rows are models, columns tasks, then the mean per task family (mteb task type: Classification,
Clustering, STS, ...) and the mean over all tasks. Every score is read back from the mteb
result file that mteb wrote (``table.json`` keeps each file's path, relative to the table's
folder), never from memory: the table cannot disagree with the files it cites. A cell is the
task's main score as mteb computed it (its ``main_score``: accuracy for classification, the
V-measure for clustering, cosine Spearman for STS, max AP for pair classification), and for
the types that repeat an experiment (classification's logistic-regression fits, clustering's
k-means runs) +- the sample standard deviation (ddof=1) of the per-experiment scores in the
same file. Beside the tasks: the family means, the mean over tasks (as MTEB's "Mean (Task)")
and the mean over families (each family counts once, as MTEB's "Mean (TaskType)"; with one
family the two are the same and the table shows one), the mean over families relative to the
first teacher row (when there is one), each other row's gain over the untrained row of its
mode (plain, or replace: with a sense dictionary; issue 25: a student below the model it
started from is marked), the parameter count (plus the sense dictionary's values in replace
mode), the tokens each text is cut to (what the row's model read: the run's max length cut to
the model's own limit, or "whole text" for a model that reads it all) and the encoding
throughput measured in the same run.
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
    tokens: int | str  # the tokens the model read per text, or "whole text"
    result_files: dict[str, Path] = field(default_factory=dict)  # mteb task name -> file
    untrained: bool = False  # the student before training (untrained:, replace:MODEL@N@DICT)


def read_score(path: Path, eval_splits: list[str], main_score: str) -> dict:
    """Main score and per-experiment scores of one mteb result file.

    With several (split, subset) entries the main score is their mean and experiment i's
    score the mean of the entries' experiment i (our tasks have one entry). Per-experiment
    scores: classification's ``scores_per_experiment``, clustering's ``v_measures`` (per
    hierarchy level, flattened as mteb averages them); none for the other types (std None)."""
    result = load_json(path)
    try:
        entries = [entry for split in eval_splits for entry in result["scores"][split]]
        main = float(np.mean([entry["main_score"] for entry in entries]))
        per_experiment = np.mean([_experiments(entry, main_score) for entry in entries], axis=0).tolist()
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not an mteb result with main score {main_score} "
                        f"({type(exc).__name__}: {exc})") from None
    std = float(np.std(per_experiment, ddof=1)) if len(per_experiment) > 1 else None
    return {"score": main, "std": std, "per_experiment": per_experiment}


def _experiments(entry: dict, main_score: str) -> list[float]:
    if "scores_per_experiment" in entry:
        return [experiment[main_score] for experiment in entry["scores_per_experiment"]]
    if main_score == "v_measure" and "v_measures" in entry:
        levels = entry["v_measures"]  # {"Level 0": [...], ...}, or a list in the legacy format
        return [v for level in (levels.values() if isinstance(levels, dict) else [levels]) for v in level]
    return []


def build_table(run: str, rows: list[ModelRow], tasks: dict[str, dict], table_dir: Path,
                throughput: dict | None = None, student_of: dict[str, str] | None = None) -> dict:
    """The table as a dict (the content of table.json).

    ``tasks``: mteb task name -> its protocol (``local_tasks.protocol``: at least ``type``,
    ``main_score`` and ``eval_splits``); ``throughput``: how texts/s was measured (``task``,
    ``texts``, ``batch_size``, ``device``, ``cpu_threads``), the same for every row;
    ``student_of``: mteb task name -> the task whose models per-task rows used for it."""
    teacher = next((row.label for row in rows if row.kind == "teacher"), None)
    families = {}
    for name, protocol in tasks.items():
        families.setdefault(protocol["type"], []).append(name)
    models = []
    for row in rows:
        scores = {}
        for name, protocol in tasks.items():
            path = Path(row.result_files[name])
            scores[name] = {**read_score(path, protocol["eval_splits"], protocol["main_score"]),
                            "result_file": os.path.relpath(path, table_dir)}
        family_means = {family: float(np.mean([scores[t]["score"] for t in names]))
                        for family, names in families.items()}
        models.append({
            "label": row.label,
            "kind": row.kind,
            "spec": row.spec,
            "mode": "replace" if row.dictionary_values else "plain",
            "untrained": row.untrained,
            "n_parameters": row.n_parameters,
            "dictionary_values": row.dictionary_values,
            "texts_per_second": row.texts_per_second,
            "tokens": row.tokens,
            "scores": scores,
            "family_means": family_means,
            "mean": float(np.mean([s["score"] for s in scores.values()])),
            "mean_over_families": float(np.mean(list(family_means.values()))),
        })
    if teacher is not None:
        reference = next(model for model in models if model["label"] == teacher)
        for model in models:
            for name, score in model["scores"].items():
                score["relative_to_teacher"] = _ratio(score["score"], reference["scores"][name]["score"])
            model["relative_to_teacher"] = _ratio(model["mean_over_families"], reference["mean_over_families"])
    _add_gains_over_untrained(models)
    return {
        "run": run,
        "score": "each task's mteb main score (tasks.<name>.main_score)",
        "std": "sample standard deviation (ddof=1) of the main score across mteb's experiments "
               "(null for task types without experiments)",
        "mean": "mean over tasks; family_means: mean over the tasks of each task type; mean_over_families: "
                "mean of the family means (relative_to_teacher and vs_untrained compare it)",
        "vs_untrained": "mean_over_families minus that of the first untrained row of the same mode (plain, "
                        "or replace: with a sense dictionary); null for the teacher, untrained rows, and "
                        "rows without an untrained row of their mode",
        "tokens": "the tokens the model read per text (longer texts cut), or 'whole text'",
        "result_files_relative_to": "the folder of this file",
        "teacher": teacher,
        "student_of": student_of or {},
        "tasks": tasks,
        "families": families,
        "throughput": throughput,
        "models": models,
    }


def _add_gains_over_untrained(models: list[dict]) -> None:
    """Set each model's ``vs_untrained`` (see build_table's description of it)."""
    untrained = {}
    for model in models:
        if model["untrained"]:
            untrained.setdefault(model["mode"], model)
    for model in models:
        reference = untrained.get(model["mode"])
        compared = reference is not None and not model["untrained"] and model["kind"] != "teacher"
        model["vs_untrained"] = ({"row": reference["label"],
                                  "gain": model["mean_over_families"] - reference["mean_over_families"]}
                                 if compared else None)


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference else None  # None (JSON null): a teacher scoring 0


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def _gain(vs_untrained: dict | None) -> str:
    """'+5.6', or '-2.1 ▼' below the untrained row; '' where there is no comparison."""
    if vs_untrained is None:
        return ""
    points = 100 * vs_untrained["gain"]
    return f"{points:+.1f}" + (" ▼" if points < 0 else "")


def _family_columns(table: dict) -> list[str]:
    """Family means are columns when the tasks span more than one family (else: the mean)."""
    return list(table["families"]) if len(table["families"]) > 1 else []


def format_markdown(table: dict) -> str:
    """The table as GitHub markdown (main scores in %, mean +- std over experiments)."""
    tasks = list(table["tasks"])
    families = _family_columns(table)
    has_teacher = table["teacher"] is not None
    has_gains = any(model.get("vs_untrained") for model in table["models"])
    means = ["mean over tasks", "mean over families"] if families else ["mean"]
    header = ["model", *(f"{t} ({table['tasks'][t]['main_score']})" for t in tasks),
              *(f"{family} mean" for family in families), *means]
    if has_teacher:
        header.append(f"vs {table['teacher']}")
    if has_gains:
        header.append("vs untrained")
    header += ["params", "tokens", "texts/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in table["models"]:
        cells = [model["label"]]
        for t in tasks:
            score = model["scores"][t]
            cells.append(_percent(score["score"]) + ("" if score["std"] is None else f" ± {_percent(score['std'])}"))
        cells += [_percent(model["family_means"][family]) for family in families]
        cells.append(_percent(model["mean"]))
        if families:
            cells.append(_percent(model["mean_over_families"]))
        if has_teacher:
            relative = model["relative_to_teacher"]
            cells.append("n/a" if relative is None else f"{_percent(relative)}%")
        if has_gains:
            cells.append(_gain(model["vs_untrained"]))
        params = _millions(model["n_parameters"])
        if model["dictionary_values"]:
            params += f" + {_millions(model['dictionary_values'])} dict"
        cells += [params, str(model["tokens"]), f"{model['texts_per_second']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Main scores (%) as mteb computes them, mean ± std over experiments where the task "
              f"repeats one ({'; '.join(_protocol_text(name, p) for name, p in table['tasks'].items())}).",
              "Scores are read from the mteb result files listed in table.json."]
    if families:
        compared = f" (vs {table['teacher']} compares it)" if has_teacher else ""
        lines.append("mean over tasks: each task counts once; mean over families: the mean of the family "
                     f"means, each family counting once{compared}.")
    if has_gains:
        lines.append("vs untrained: the row's mean over families minus that of the untrained row of its mode "
                     "(plain, or replace: with a sense dictionary), in points; ▼: below the model it started from.")
    lines += [f"{task}: the per-task rows ({{task}} in the spec) used the models of {source} (--student-of)."
              for task, source in table.get("student_of", {}).items()]
    lines.append("tokens: how many tokens of each text the row's model read (longer texts cut); "
                 "'whole text': all of it.")
    speed = table.get("throughput")
    if speed:
        lines.append(f"texts/s: {speed['texts']} texts of {speed['task']} embedded in batches of "
                     f"{speed['batch_size']} on {speed['device']} ({speed['cpu_threads']} CPU threads, "
                     "onnxruntime models as many), after one warm-up batch, every model the same.")
    return "\n".join(lines) + "\n"


def _protocol_text(name: str, protocol: dict) -> str:
    text = f"{name}: {protocol['type']}, {protocol['main_score']}"
    if "samples_per_label" in protocol:
        text += f", {protocol['samples_per_label']} samples/label"
    if "n_experiments" in protocol:
        text += f", {protocol['n_experiments']} experiments"
    return text


def plot_scores(table: dict, path: Path) -> None:
    """Grouped bars: one group per task (then the family means and the mean), one bar per
    model, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, families = list(table["tasks"]), _family_columns(table)
    means = ["mean over tasks", "mean over families"] if families else ["mean"]
    groups = [*tasks, *(f"{family} mean" for family in families), *means]
    models = table["models"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * len(models) + 2.0), 5.0))
    for i, model in enumerate(models):
        heights = [model["scores"][t]["score"] for t in tasks]
        errors = [model["scores"][t]["std"] or 0.0 for t in tasks]
        heights += [model["family_means"][family] for family in families] + [model["mean"]]
        heights += [model["mean_over_families"]] if families else []
        errors += [0.0] * (len(heights) - len(errors))
        positions = np.arange(len(groups)) + (i - (len(models) - 1) / 2) * width
        bars = ax.bar(positions, 100 * np.array(heights), width, yerr=100 * np.array(errors), capsize=2,
                      label=model["label"])
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small", padding=2)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=15 if len(groups) > 4 else 0)
    ax.set_ylabel("main score (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{table['run']}: main scores, mean ± std over experiments", fontsize="medium")
    ax.legend(fontsize="small", ncols=min(len(models), 4), loc="upper center",
              bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


def write_table(table: dict, table_dir: Path) -> dict[str, Path]:
    """Write table.json, table.md and scores.png atomically; return their paths."""
    files = {"json": table_dir / "table.json", "md": table_dir / "table.md",
             "png": table_dir / "scores.png"}
    save_json(table, files["json"])
    with atomic_open(files["md"], "w") as fh:
        fh.write(format_markdown(table))
    plot_scores(table, files["png"])
    return files
