"""Quality study: which sense rule (dot, the original's; l2; cos) makes the better SKD student,
on the demo's tasks with the demo's settings.

    PYTHONPATH=. python bench/study_sense_rule.py              # the demo's sizes and settings, 3 seeds
    PYTHONPATH=. python bench/study_sense_rule.py --train 40 60 --test 40 --epochs 1 --seeds 0   # a check

For each task (bbc-news, tweet-sentiment; the demo's 800 and 1600 training texts, 300 held out,
max length 128): the texts and the MiniLM teacher's token states once (bench/study_skd.py's
``gather``); then for each rule the sense dictionary (scripts/03_cluster.py --sense-rule; the
k-means does not depend on the rule, and the three files are checked to be byte-identical, so
only the rule differs between them; clustering again costs seconds), its sense targets
(scripts/04_targets.py) and, for each seed, an SKD student (scripts/05_train.py with the demo's
optimiser: 2 epochs, batch 16, lr 3e-4, 10 warm-up steps). One evaluation (embdistill.evaluation,
what scripts/06_evaluate.py runs: 32 samples per label, 10 experiments) scores the teacher, the
teacher in replace mode under each rule (the dictionary's ceiling), and each student in plain
and replace mode. Writes, under --out: results/study_sense_rule/ (the evaluation's table, with
the mteb result files), study_sense_rule.md and .json: accuracy (%) per rule, model and task
(mean +- std over seeds), and per rule and task the targets' single-sense share, the share of
scored tokens whose target equals dot's, and the students' last sense accuracy.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/study_skd.py
from study_skd import (TASKS, accuracy_of, gather, mean_std, stage, study_parser,  # noqa: E402
                       training_args)

from embdistill.artifacts import atomic_open, read_manifest  # noqa: E402
from embdistill.evaluation.run import EvaluationConfig, evaluate  # noqa: E402
from embdistill.paths import Paths  # noqa: E402
from embdistill.senses.packed import SENSE_RULES  # noqa: E402

RUN = "study_sense_rule"


def rule_paths(base: Path, task: str, rule: str) -> tuple[Path, Path]:
    """The rule's dictionary and targets, beside the defaults (sense_dict/<task>/minilm.<rule>.kmeanspkl,
    work/<task>/minilm/targets.<rule>.npz)."""
    paths = Paths(base, task, "minilm")
    return (paths.sense_dict.with_name(f"minilm.{rule}.kmeanspkl"),
            paths.targets.with_name(f"targets.{rule}.npz"))


def build_rule(task: str, base: Path, rule: str, args) -> None:
    """The rule's dictionary, targets and one SKD student per seed (runs/<task>/skd-<rule>-s<seed>)."""
    dictionary, targets = rule_paths(base, task, rule)
    common = ["--task", task, "--base-dir", str(base), "--seed", "0"]
    stage("scripts/03_cluster.py", *common, "--sense-rule", rule, "--output", str(dictionary))
    stage("scripts/04_targets.py", *common, "--max-length", str(args.max_length), "--batch-size", "32",
          "--sense-dict", str(dictionary), "--targets", str(targets))
    for seed in args.seeds:
        stage("scripts/05_train.py", "--task", task, "--base-dir", str(base), "--loss", "sense",
              "--run", f"skd-{rule}-s{seed}", "--seed", str(seed), *training_args(args),
              "--sense-dict", str(dictionary), "--targets", str(targets), "--log-every", "10",
              "--no-export-replace")


def check_same_senses(task: str, base: Path) -> None:
    """The rules' dictionaries hold the same senses byte for byte (else the study would compare
    clusterings, not rules)."""
    files = {rule: rule_paths(base, task, rule)[0].read_bytes() for rule in SENSE_RULES}
    if len(set(files.values())) != 1:
        raise SystemExit(f"{task}: the rules' dictionaries differ in their senses: k-means is not "
                         "deterministic here, the comparison would not isolate the rule")


def specs(base: Path, seeds: list[int]) -> list[str]:
    models = ["teacher=teacher:minilm"]
    for rule in SENSE_RULES:
        dictionary = f"{base}/sense_dict/{{task}}/minilm.{rule}.kmeanspkl"
        models.append(f"teacher-replace-{rule}=replace:minilm@{dictionary}")
        for seed in seeds:
            student = f"{base}/runs/{{task}}/skd-{rule}-s{seed}/export/hf"
            models += [f"skd-{rule}-s{seed}=student:{student}",
                       f"skd-{rule}-s{seed}-replace=replace:{student}@{dictionary}"]
    return models


def target_stats(task: str, base: Path, seeds: list[int]) -> dict[str, dict]:
    """Per rule: the targets' single-sense share, the share of scored tokens whose target is
    dot's, and the students' last logged sense accuracy (one per seed)."""
    with np.load(rule_paths(base, task, "dot")[1]) as data:
        dot = data["targets"]
    stats = {}
    for rule in SENSE_RULES:
        targets_path = rule_paths(base, task, rule)[1]
        with np.load(targets_path) as data:
            targets = data["targets"]
        scored = targets >= 0
        sense_accuracy = [read_manifest(Paths(base, task, "minilm", f"skd-{rule}-s{seed}").export_dir)
                          ["extra"]["metrics"]["sense_accuracy"] for seed in seeds]
        stats[rule] = {"single_sense_share": read_manifest(targets_path)["extra"]["single_sense_share"],
                       "same_target_as_dot": round(float((targets[scored] == dot[scored]).mean()), 4),
                       "sense_accuracy": sense_accuracy}
    return stats


def summarise(table: dict, stats: dict, seeds: list[int], out: Path) -> dict:
    """Accuracy per rule, model and task (mean, std over seeds), the markdown table, the json."""
    tasks, accuracy = list(table["tasks"]), accuracy_of(table)
    columns = [*tasks, "mean"]
    rows = {"teacher": {c: (accuracy["teacher"][c], 0.0) for c in columns}}
    for rule in SENSE_RULES:
        rows[f"teacher-replace ({rule})"] = {c: (accuracy[f"teacher-replace-{rule}"][c], 0.0) for c in columns}
        for model in ("skd", "skd-replace"):
            suffix = "-replace" if model == "skd-replace" else ""
            rows[f"{model} ({rule})"] = {c: mean_std([accuracy[f"skd-{rule}-s{s}{suffix}"][c] for s in seeds])
                                         for c in columns}
    lines = [f"accuracy (%), mean ± std over seeds {seeds}", "",
             "| model (sense rule) | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(f"{values[c][0]:.1f}" + (f" ± {values[c][1]:.1f}" if len(seeds) > 1
                                                                   and values[c][1] else "") for c in columns) + " |"
              for name, values in rows.items()]
    lines += ["", "| task | sense rule | single-sense share of scored tokens | same target as dot | "
              "students' last sense accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {task} | {rule} | {s['single_sense_share']:.3f} | {s['same_target_as_dot']:.3f} | "
              + ", ".join(f"{a:.3f}" for a in s["sense_accuracy"]) + " |"
              for task, per_rule in stats.items() for rule, s in per_rule.items()]
    with atomic_open(out / "study_sense_rule.md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return {"accuracy": {name: {c: list(v) for c, v in values.items()} for name, values in rows.items()},
            "targets": stats}


def main() -> None:
    args = study_parser(__doc__, RUN, train=[800, 1600]).parse_args()
    base = Path(args.out).resolve()
    started = time.perf_counter()
    for task, texts in zip(TASKS, args.train):
        print(f"{task}: texts, gather; per rule: dictionary, targets, students", flush=True)
        gather(task, base, texts, args)
        for rule in SENSE_RULES:
            build_rule(task, base, rule, args)
        check_same_senses(task, base)
    models = specs(base, args.seeds)
    print(f"evaluating {len(models)} models on {len(TASKS)} tasks", flush=True)
    config = EvaluationConfig(run=RUN, tasks=TASKS, models=tuple(models), max_length=args.max_length,
                              batch_size=64, throughput_texts=16)
    table = evaluate(config, base, device=torch.device("cpu"))
    summary = summarise(table, {task: target_stats(task, base, args.seeds) for task in TASKS}, args.seeds, base)
    minutes = (time.perf_counter() - started) / 60
    with atomic_open(base / "study_sense_rule.json", "w") as fh:
        json.dump({"args": vars(args), "minutes": round(minutes, 1), **summary}, fh, indent=2)
    print((base / "study_sense_rule.md").read_text())
    print(f"{minutes:.1f} min; {base / 'study_sense_rule.md'}, {base / 'study_sense_rule.json'}, "
          f"results/{RUN}/table.md")


if __name__ == "__main__":
    main()
