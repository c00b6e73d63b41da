"""Quality study: what SKD's training adds, against the MSE ablation, the untrained student and the
teacher, plain and replace mode, over training steps, seeds and both offline tasks.

    PYTHONPATH=. python bench/study_skd.py                    # ~1 h on 2 CPU cores
    PYTHONPATH=. python bench/study_skd.py --train 200 --test 100 --seeds 0 --points 2   # a quick look

For each task (bbc-news, tweet-sentiment): the training texts (more than the demo's), the MiniLM
teacher's token states, the sense dictionary and the sense targets, by the stage scripts
themselves (00 -> 04), once. Then, for each seed and each loss (sense = SKD, mse = the ablation),
one training run (scripts/05_train.py, the demo's optimiser settings) keeping a checkpoint at
--points evenly spaced steps; each checkpoint is saved as a student folder. One evaluation
(embdistill.evaluation, the project's own mteb protocol: 32 samples per label, 10 experiments)
scores every checkpoint in plain and in replace mode, with the teacher, the teacher in replace
mode (the dictionary's ceiling), the untrained 2-layer student and the untrained student in
replace mode as reference lines. Writes, under --out: the evaluation's results/ (table.md/json
with the mteb result file behind every number), study.md (mean +- std over seeds of each
point, per task and their mean) and study.png (the learning curves).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embdistill.artifacts import atomic_open  # noqa: E402
from embdistill.evaluation.run import EvaluationConfig, evaluate  # noqa: E402
from embdistill.paths import Paths  # noqa: E402
from embdistill.students import build_student, save_hf  # noqa: E402
from embdistill.teachers import load_teacher  # noqa: E402

TASKS = ("bbc-news", "tweet-sentiment")
LOSSES = {"sense": "skd", "mse": "mse"}
REFERENCES = ("teacher", "teacher-replace", "untrained", "untrained-replace")


def stage(script: str, *args: str) -> None:
    """One stage script, as a user runs it (its own process, its own skip rules)."""
    command = [sys.executable, str(REPO / script), *args]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"})
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    print(f"  {Path(script).name} {' '.join(args[:2])}: {time.perf_counter() - started:.0f} s", flush=True)


def prepare(task: str, base: Path, args) -> None:
    common = ["--task", task, "--base-dir", str(base), "--seed", "0"]
    length = ["--max-length", str(args.max_length)]
    stage("scripts/00_texts.py", *common, "--max-train", str(args.train), "--max-test", str(args.test))
    stage("scripts/01_count.py", *common, *length)
    stage("scripts/02_gather.py", *common, *length, "--batch-size", "32")
    stage("a0_generate_combinepkl.py", *common)
    stage("scripts/03_cluster.py", *common)
    stage("scripts/04_targets.py", *common, *length, "--batch-size", "32")


def train(task: str, base: Path, loss: str, seed: int, args) -> list[int]:
    """One run keeping a checkpoint every total/points steps; each saved as a student folder.
    Returns the steps."""
    run = f"{LOSSES[loss]}-s{seed}"
    paths = Paths(base, task, "minilm", run)
    n_texts = len(json.loads(paths.train_json.read_text()))
    total = args.epochs * -(-n_texts // args.batch_size)
    every = max(1, total // args.points)
    stage("scripts/05_train.py", "--task", task, "--base-dir", str(base), "--loss", loss, "--run", run,
          "--seed", str(seed), "--max-length", str(args.max_length), "--epochs", str(args.epochs),
          "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", "10",
          "--save-every", str(every), "--keep-last", "1000", "--log-every", "5", "--no-export-replace")
    teacher = load_teacher("minilm", device="cpu", layers=2)
    steps = []
    for checkpoint in sorted(paths.checkpoint_dir.glob("step-*.pt")):
        step = int(checkpoint.stem.split("-")[1])
        if step % every and step != total:
            continue  # an epoch-end checkpoint between the evenly spaced ones
        folder = paths.run_dir / "curve" / f"step-{step:06d}"
        if not (folder / "config.json").is_file():
            student = build_student(teacher, 2)
            student.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
            save_hf(student, teacher.tokenizer, folder, input_format=teacher.input_format,
                    normalize=teacher.normalize)
        steps.append(step)
    return steps


def specs(steps: dict[tuple[str, int], list[int]], base: Path) -> list[str]:
    dictionary = f"{base}/sense_dict/{{task}}/minilm.kmeanspkl"
    models = ["teacher=teacher:minilm", f"teacher-replace=replace:minilm@{dictionary}",
              "untrained=untrained:minilm@2", f"untrained-replace=replace:minilm@2@{dictionary}"]
    for (loss, seed), points in steps.items():
        for step in points:
            folder = f"{base}/runs/{{task}}/{LOSSES[loss]}-s{seed}/curve/step-{step:06d}"
            label = f"{LOSSES[loss]}-s{seed}-{step}"
            models += [f"{label}=student:{folder}", f"{label}-replace=replace:{folder}@{dictionary}"]
    return models


def summarise(table: dict, steps: dict, out: Path) -> dict:
    """mean +- std over seeds of each (loss, step, mode), per task and over tasks."""
    tasks = list(table["tasks"])
    accuracy = {m["label"]: {**{t: 100 * m["scores"][t]["accuracy"] for t in tasks},
                             "mean": 100 * m["mean_accuracy"]} for m in table["models"]}
    curves = {}
    for loss in LOSSES.values():
        for mode in ("", "-replace"):
            seeds = sorted({seed for (name, seed) in steps if LOSSES[name] == loss})
            points = steps[next(key for key in steps if LOSSES[key[0]] == loss)]
            curves[f"{loss}{mode}"] = {
                column: [(step, *_mean_std([accuracy[f"{loss}-s{seed}-{step}{mode}"][column] for seed in seeds]))
                         for step in points]
                for column in [*tasks, "mean"]}
    references = {name: accuracy[name] for name in REFERENCES}
    lines = ["| model | step | " + " | ".join(tasks) + " | mean |", "|---|---|" + "---|" * (len(tasks) + 1)]
    for name, values in references.items():
        lines.append(f"| {name} | - | " + " | ".join(f"{values[c]:.1f}" for c in [*tasks, "mean"]) + " |")
    for name, columns in curves.items():
        for i, (step, *_) in enumerate(columns["mean"]):
            cells = [f"{columns[c][i][1]:.1f} ± {columns[c][i][2]:.1f}" for c in [*tasks, "mean"]]
            lines.append(f"| {name} | {step} | " + " | ".join(cells) + " |")
    with atomic_open(out / "study.md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    _plot(curves, references, [*tasks, "mean"], out / "study.png")
    return {"references": references, "curves": curves}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _plot(curves: dict, references: dict, columns: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(columns), figsize=(4.2 * len(columns), 7), sharex=True, squeeze=False)
    for row, mode in enumerate(("", "-replace")):
        for col, column in enumerate(columns):
            axis = axes[row, col]
            for loss, colour in (("skd", "tab:blue"), ("mse", "tab:orange")):
                points = np.array(curves[f"{loss}{mode}"][column])
                axis.plot(points[:, 0], points[:, 1], marker="o", color=colour, label=f"{loss}{mode}")
                axis.fill_between(points[:, 0], points[:, 1] - points[:, 2], points[:, 1] + points[:, 2],
                                  color=colour, alpha=0.2)
            for name, style in (("teacher", "k--"), ("untrained", "k:")):
                reference = f"{name}{mode}"
                axis.axhline(references[reference][column], color=style[0], linestyle=style[1:], label=reference)
            axis.set_title(f"{column} ({'replace' if mode else 'plain'} mode)", fontsize=10)
            axis.grid(alpha=0.3)
            if row == 1:
                axis.set_xlabel("training step")
            if col == 0:
                axis.set_ylabel("accuracy (%)")
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    fig.suptitle("SKD vs MSE: exported student's accuracy over training (mean ± std over seeds)")
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "study_skd"), help="base dir of everything")
    parser.add_argument("--train", type=int, default=1000, help="training texts per task (the demo: 400)")
    parser.add_argument("--test", type=int, default=300, help="held-out texts per task")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--points", type=int, default=5, help="checkpoints scored per run")
    args = parser.parse_args()
    base = Path(args.out).resolve()
    started = time.perf_counter()
    steps = {}
    for task in TASKS:
        print(f"{task}: texts, gather, dictionary, targets", flush=True)
        prepare(task, base, args)
        for seed in args.seeds:
            for loss in LOSSES:
                points = train(task, base, loss, seed, args)
                if steps.setdefault((loss, seed), points) != points:
                    raise SystemExit(f"the tasks' runs have other checkpoints ({points} vs {steps[(loss, seed)]}): "
                                     "give both tasks as many training texts")
    models = specs(steps, base)
    print(f"evaluating {len(models)} models on {len(TASKS)} tasks", flush=True)
    config = EvaluationConfig(run="study_skd", tasks=TASKS, models=tuple(models), max_length=args.max_length,
                              batch_size=64, throughput_texts=16)
    table = evaluate(config, base, device=torch.device("cpu"))
    summary = summarise(table, steps, base)
    minutes = (time.perf_counter() - started) / 60
    with atomic_open(base / "study.json", "w") as fh:
        json.dump({"args": vars(args), "minutes": round(minutes, 1), **summary}, fh, indent=2)
    print((base / "study.md").read_text())
    print(f"{minutes:.1f} min; {base / 'study.png'}, {base / 'study.md'}, results/study_skd/table.md")


if __name__ == "__main__":
    main()
