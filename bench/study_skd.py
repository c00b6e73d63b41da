"""Quality study: what SKD's training adds, against the MSE ablation, the untrained student and the
teacher, plain and replace mode, over training, seeds and both offline tasks.

    PYTHONPATH=. python bench/study_skd.py                    # 39 min on 2 CPU cores (2026-11-29)
    PYTHONPATH=. python bench/study_skd.py --train 200 400 --test 100 --seeds 0 --epochs 1   # a quick look

For each task (bbc-news, tweet-sentiment): the training texts (more than the demo's), the MiniLM
teacher's token states, the sense dictionary and the sense targets, by the stage scripts
themselves (00 -> 04), once. Then, for each seed and each loss (sense = SKD, mse = the ablation),
one training run (scripts/05_train.py with the demo's optimiser settings) keeping a checkpoint
every half epoch; each is saved as a student folder. One evaluation (embdistill.evaluation, the
project's own mteb protocol: 32 samples per label, 10 experiments) scores every checkpoint in
plain mode and the last one in replace mode too, with the teacher, the teacher in replace mode
(the dictionary's ceiling), the untrained 2-layer student and the untrained student in replace
mode as reference lines. Writes, under --out: the evaluation's results/study_skd/ (table.md and
table.json, with the mteb result file behind every number), study.md (mean +- std over seeds of
each point, per task and their mean), study.json and study.png (the learning curves).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embdistill.artifacts import atomic_open  # noqa: E402
from embdistill.drivers import run_stage  # noqa: E402
from embdistill.evaluation.run import EvaluationConfig, evaluate  # noqa: E402
from embdistill.paths import Paths  # noqa: E402
from embdistill.students import build_student, save_hf  # noqa: E402
from embdistill.input_format import effective_max_length  # noqa: E402
from embdistill.teachers import load_teacher  # noqa: E402

TASKS = ("bbc-news", "tweet-sentiment")
LOSSES = {"sense": "skd", "mse": "mse"}
REFERENCES = ("teacher", "teacher-replace", "untrained", "untrained-replace")


def stage(script: str, *args: str) -> None:
    """One stage script, as a user runs it (its own process, its own skip rules)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        if run_stage(script, args, env={"PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}, output=output):
            output.seek(0)
            raise SystemExit(f"{script} {' '.join(args)} failed:\n{output.read()[-3000:]}")
    print(f"  {Path(script).name} {' '.join(args[:2])}: {time.perf_counter() - started:.0f} s", flush=True)


POINTS_PER_EPOCH = 2


def gather(task: str, base: Path, texts: int, args) -> None:
    """The task's training and held-out texts and the teacher's combined token states."""
    common = ["--task", task, "--base-dir", str(base), "--seed", "0"]
    length = ["--max-length", str(args.max_length)]
    stage("scripts/00_texts.py", *common, "--max-train", str(texts), "--max-test", str(args.test))
    stage("scripts/01_count.py", *common, *length)
    stage("scripts/02_gather.py", *common, *length, "--batch-size", "32")
    stage("a0_generate_combinepkl.py", *common)


def prepare(task: str, base: Path, texts: int, args) -> None:
    gather(task, base, texts, args)
    common = ["--task", task, "--base-dir", str(base), "--seed", "0"]
    stage("scripts/03_cluster.py", *common)
    stage("scripts/04_targets.py", *common, "--max-length", str(args.max_length), "--batch-size", "32")


def training_args(args) -> list[str]:
    """scripts/05_train.py's options for the demo's optimiser settings (run_demo.sh) as set by
    --max-length, --epochs, --batch-size and --lr."""
    return ["--max-length", str(args.max_length), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--warmup-steps", "10"]


def study_parser(doc: str, name: str, train: list[int]) -> argparse.ArgumentParser:
    """A study's options: --out (default bench/out/<name>), the data and training settings
    (defaults: the demo's, but ``train`` texts per task) and --seeds."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / name), help="base dir of everything")
    parser.add_argument("--train", type=int, nargs=2, default=train, metavar=("BBC", "TWEETS"),
                        help="training texts of bbc-news and tweet-sentiment (the demo: 800 and 1600)")
    parser.add_argument("--test", type=int, default=300, help="held-out texts per task")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return parser


def train(task: str, base: Path, loss: str, seed: int, args) -> int:
    """One run keeping a checkpoint every half epoch, each saved as a student folder
    ``curve/point-<p>`` (p = 1 .. epochs x 2); returns the number of points."""
    run = f"{LOSSES[loss]}-s{seed}"
    paths = Paths(base, task, "minilm", run)
    per_epoch = -(-len(json.loads(paths.train_json.read_text())) // args.batch_size)
    stage("scripts/05_train.py", "--task", task, "--base-dir", str(base), "--loss", loss, "--run", run,
          "--seed", str(seed), *training_args(args),
          "--save-every", str(max(1, per_epoch // POINTS_PER_EPOCH)), "--keep-last", "1000",
          "--log-every", "5", "--no-export-replace")
    saved = {int(c.stem.split("-")[1]): c for c in paths.checkpoint_dir.glob("step-*.pt")}
    teacher = load_teacher("minilm", device="cpu", layers=2)
    points = args.epochs * POINTS_PER_EPOCH
    for point in range(1, points + 1):  # the checkpoint nearest to each half epoch
        step = min(saved, key=lambda s: abs(s - point * per_epoch / POINTS_PER_EPOCH))
        folder = paths.run_dir / "curve" / f"point-{point}"
        if not (folder / "config.json").is_file():
            student = build_student(teacher, 2)
            student.load_state_dict(torch.load(saved[step], map_location="cpu", weights_only=True)["model"])
            save_hf(student, teacher.tokenizer, folder, input_format=teacher.input_format,
                    normalize=teacher.normalize,
                    max_seq_length=effective_max_length(args.max_length, teacher.max_seq_length))
    return points


def specs(points: int, seeds: list[int], base: Path) -> list[str]:
    dictionary = f"{base}/sense_dict/{{task}}/minilm.kmeanspkl"
    models = ["teacher=teacher:minilm", f"teacher-replace=replace:minilm@{dictionary}",
              "untrained=untrained:minilm@2", f"untrained-replace=replace:minilm@2@{dictionary}"]
    for loss in LOSSES.values():
        for seed in seeds:
            for point in range(1, points + 1):
                folder = f"{base}/runs/{{task}}/{loss}-s{seed}/curve/point-{point}"
                models.append(f"{loss}-s{seed}-{point}=student:{folder}")
            models.append(f"{loss}-s{seed}-{points}-replace=replace:{folder}@{dictionary}")
    return models


def summarise(table: dict, points: int, seeds: list[int], out: Path) -> dict:
    """mean +- std over seeds of each (loss, point), per task and over tasks; replace mode at
    the last point."""
    tasks = list(table["tasks"])
    accuracy = accuracy_of(table)
    columns = [*tasks, "mean"]
    curves = {loss: {c: [(p / POINTS_PER_EPOCH, *mean_std([accuracy[f"{loss}-s{s}-{p}"][c] for s in seeds]))
                         for p in range(1, points + 1)] for c in columns}
              for loss in LOSSES.values()}
    replaced = {f"{loss}-replace": {c: mean_std([accuracy[f"{loss}-s{s}-{points}-replace"][c] for s in seeds])
                                    for c in columns} for loss in LOSSES.values()}
    references = {name: accuracy[name] for name in REFERENCES}
    lines = ["| model | epochs | " + " | ".join(tasks) + " | mean |", "|---|---|" + "---|" * len(columns)]
    for name, values in references.items():
        lines.append(f"| {name} | - | " + " | ".join(f"{values[c]:.1f}" for c in columns) + " |")
    for name, curve in curves.items():
        for i, (epoch, *_) in enumerate(curve["mean"]):
            lines.append(f"| {name} | {epoch:g} | " + " | ".join(
                f"{curve[c][i][1]:.1f} ± {curve[c][i][2]:.1f}" for c in columns) + " |")
    for name, values in replaced.items():
        lines.append(f"| {name} | {points / POINTS_PER_EPOCH:g} | " + " | ".join(
            f"{values[c][0]:.1f} ± {values[c][1]:.1f}" for c in columns) + " |")
    with atomic_open(out / "study.md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    _plot(curves, replaced, references, columns, out / "study.png")
    return {"references": references, "curves": curves, "replace_mode_at_the_end": replaced}


def accuracy_of(table: dict) -> dict[str, dict[str, float]]:
    """An evaluation table's main scores in %: model label -> {task: score, "mean": their mean}."""
    return {m["label"]: {**{t: 100 * m["scores"][t]["score"] for t in table["tasks"]},
                         "mean": 100 * m["mean"]} for m in table["models"]}


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _plot(curves: dict, replaced: dict, references: dict, columns: list[str], path: Path) -> None:
    """Per column (task, mean): accuracy against epochs, SKD and MSE (mean +- std over seeds),
    the references as lines, replace mode at the end as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 4.2), squeeze=False)
    for axis, column in zip(axes[0], columns):
        for loss, colour in (("skd", "tab:blue"), ("mse", "tab:orange")):  # from the untrained student
            points = np.array([(0.0, references["untrained"][column], 0.0), *curves[loss][column]])
            axis.plot(points[:, 0], points[:, 1], marker="o", color=colour, label=f"{loss} (plain)")
            axis.fill_between(points[:, 0], points[:, 1] - points[:, 2], points[:, 1] + points[:, 2],
                              color=colour, alpha=0.2)
            mean, std = replaced[f"{loss}-replace"][column]
            axis.errorbar([points[-1, 0] + 0.08], [mean], yerr=[std], fmt="s", color=colour, capsize=3,
                          label=f"{loss} (replace, end)")
        for name, style in (("teacher", "k--"), ("teacher-replace", "k-."), ("untrained", "k:"),
                            ("untrained-replace", "0.6")):
            line = style[1:] if style.startswith("k") else "--"
            colour = "k" if style.startswith("k") else style
            axis.axhline(references[name][column], color=colour, linestyle=line, linewidth=1, label=name)
        axis.set_title(column, fontsize=10)
        axis.set_xlabel("epochs of training")
        axis.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[0, -1].legend(fontsize=7, loc="lower right")
    fig.suptitle("SKD vs MSE: the exported student's accuracy over training (mean ± std over seeds)")
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def main() -> None:
    args = study_parser(__doc__, "study_skd", train=[1000, 2000]).parse_args()
    base = Path(args.out).resolve()
    started = time.perf_counter()
    for task, texts in zip(TASKS, args.train):
        print(f"{task}: texts, gather, dictionary, targets", flush=True)
        prepare(task, base, texts, args)
        for seed in args.seeds:
            for loss in LOSSES:
                points = train(task, base, loss, seed, args)
    models = specs(points, args.seeds, base)
    print(f"evaluating {len(models)} models on {len(TASKS)} tasks", flush=True)
    config = EvaluationConfig(run="study_skd", tasks=TASKS, models=tuple(models), max_length=args.max_length,
                              batch_size=64, throughput_texts=16)
    table = evaluate(config, base, device=torch.device("cpu"))
    summary = summarise(table, points, args.seeds, base)
    minutes = (time.perf_counter() - started) / 60
    with atomic_open(base / "study.json", "w") as fh:
        json.dump({"args": vars(args), "minutes": round(minutes, 1), **summary}, fh, indent=2)
    print((base / "study.md").read_text())
    print(f"{minutes:.1f} min; {base / 'study.png'}, {base / 'study.md'}, results/study_skd/table.md")


if __name__ == "__main__":
    main()
