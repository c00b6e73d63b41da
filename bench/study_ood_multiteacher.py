"""Study: multi-teacher distillation out of domain: distil on tweets, evaluate on news
(bbc-news classification and clustering), per loss arm, along training.

    nice -n 5 python bench/study_ood_multiteacher.py --base-dir /tmp/ood-study       # the study
    python bench/study_ood_multiteacher.py --base-dir /tmp/ood-tiny --tweets 200 --steps 6 \
        --bbc-max-train 100 --bbc-max-test 40 --arms nll mse-raw --seeds 0 1 \
        --figure /tmp/ood-tiny/ood.png --out /tmp/ood-tiny                           # a tiny look

Runs the pipeline's own stage scripts, each skipped when done (a rerun resumes):

1. stage 0: --tweets tweet-sentiment texts (the distillation corpus; its labels are not used);
   bbc-news with --bbc-max-train training texts (the classifier's, 32 per label per
   experiment) and --bbc-max-test held-out articles (classification's test split, and the
   whole clustering task);
2. stage 10: MiniLM and LSA (--lsa-dim) embeddings of the tweets, once;
3. stage 11 for every arm x seed (the student is the stage's default: MiniLM's first 2 layers),
   --steps optimiser steps with a checkpoint every third of them (kept); each arm passes
   --standardize / --no-standardize explicitly (the stage's default for mse may change):

   ========  =========================================  =====================================
   nll       --loss nll --standardize                   the stage's default (Gaussian NLL)
   mse-raw   --loss mse --no-standardize                MSE on the teachers' raw vectors
   mse-std   --loss mse --standardize                   MSE on standardised targets
   nll-dim   --loss nll --standardize --normalize-by-dim   NLL divided by each teacher's dim
   ========  =========================================  =====================================

4. the checkpoints at 1/3 and 2/3 of the steps exported as students
   (:func:`embdistill.multiteacher.train.export_checkpoint`, beside the run's export/);
5. stage 6 once (--task-types Classification Clustering, 32 samples per label, 10
   experiments): the student before distillation (step 0, the run's initial/), every arm x
   seed at 1/3, 2/3 and the end (export/), and both teachers as reference lines.

Writes <out>/<name>.json and <name>.md (rows: arm; columns: bbc-news accuracy, bbc-news
V-measure, the family means and their mean, at the end, mean ± std over seeds (ddof 1)), and
--figure (each score against the step, per arm, mean ± std over seeds).

Sizing (the defaults; meant to take <= 30 min on the 2 CPU cores when idle). Not measured
idle: the machine was shared (load 5-9) throughout. From the repository's own records
(BENCHMARKS.md, multi-teacher study: 304-step runs of mixed bbc-news/tweet batches at max
length 128 took about 5 min at load ~4, i.e. ~1 s a step, and the same demo command ran 3.2x
faster idle than at load 4-5) a step of 32 tweets (~50 tokens, shorter than those batches) is
estimated at <= 0.5 s idle, and a run's fixed cost (loading, 100 head warm-up steps on cached
embeddings, the initial and final exports) at ~30 s. A tiny run (the second command, with
--train-args at max length 256; load 5-7, 2026-12-03) took 15 min: about 2 min per 6-step run
(mostly the fixed cost) and about 30 s per evaluated student (180 bbc-news texts at 256 tokens;
70 s for the MiniLM teacher). Hence: 12 runs (4 arms x 3 seeds) of 96 steps (--tweets 3200: one pass over the corpus) ~ 12 x (48 + 30) s ~ 16 min;
39 models (12 runs x 3 points, the student before, 2 teachers) each embedding ~600 bbc-news
texts (200 training texts the classifier draws from, 200 held-out articles embedded once per
task type) at 128 tokens ~ 39 x 10 s ~ 7 min (the 6-layer teachers, at their own 256 tokens,
longer); stages 0 and 10 ~ 1.5 min. About 25 min. --steps, --tweets and --bbc-max-test scale it;
rerun the full command on an idle machine to record its wall time (the .json's wall_s).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from common import study_parser
from study_multiteacher import REPO, minilm_folder, run_record, stage, training_summary

from embdistill.paths import EXPORT_FOLDER, ST_FOLDER, Paths  # noqa: E402 (study_multiteacher puts REPO on the path)

CORPUS = "tweet-sentiment"
EVAL_TASK = "bbc-news"
COLUMNS = {"bbc-news": "bbc-news accuracy", "bbc-news-clustering": "bbc-news V-measure",
           "Classification": "Classification mean", "Clustering": "Clustering mean", "mean": "mean"}
ARMS = {
    "nll": "--loss nll --standardize",
    "mse-raw": "--loss mse --no-standardize",
    "mse-std": "--loss mse --standardize",
    "nll-dim": "--loss nll --standardize --normalize-by-dim",
}
PLOTTED = ("bbc-news", "bbc-news-clustering", "mean")  # each family mean is one of these tasks
POINTS = 3  # checkpoints at 1/3, 2/3 and the end of training
# Max length 128: tweets are shorter, and the exported students read news at the length they were trained at.
TRAIN_ARGS = "--batch-size 32 --max-length 128 --lr 1e-4 --val-every 32 --log-every 16"


def run_name(name: str, arm: str, seed: int) -> str:
    return f"{name}-{arm}-s{seed}"


def main() -> int:
    parser = study_parser(__doc__, out=str(REPO / "bench" / "results"), out_help="where the summary goes")
    parser.add_argument("--figure", default=str(REPO / "docs" / "figures" / "ood_multiteacher_study.png"))
    parser.add_argument("--name", default="ood_multiteacher_study", help="file names, run and results prefix")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tweets", type=int, default=3200, help="tweet-sentiment texts to distil on")
    parser.add_argument("--steps", type=int, default=96, help="optimiser steps per run (a multiple of 3)")
    parser.add_argument("--bbc-max-train", type=int, default=200, help="bbc-news texts the classifier draws from")
    parser.add_argument("--bbc-max-test", type=int, default=200, help="held-out bbc-news articles")
    parser.add_argument("--lsa-dim", type=int, default=256)
    parser.add_argument("--train-args", default=TRAIN_ARGS, help="stage 11 options of every run")
    args = parser.parse_args()
    if args.steps < POINTS or args.steps % POINTS:
        parser.error(f"--steps must be a positive multiple of {POINTS}, got {args.steps}")
    base, out, figure = Path(args.base_dir).resolve(), Path(args.out).resolve(), Path(args.figure).resolve()
    for folder in (base, out, figure.parent):
        folder.mkdir(parents=True, exist_ok=True)
    log_file = base / f"{args.name}.log"
    started, load_before = time.perf_counter(), os.getloadavg()
    seconds: dict[str, float] = {}
    common = ["--base-dir", base]

    seconds["texts tweets"] = stage("00_texts.py", "--task", CORPUS, "--max-train", args.tweets, "--max-test", 10,
                                    *common, log_file=log_file)
    seconds["texts bbc-news"] = stage("00_texts.py", "--task", EVAL_TASK, "--max-train", args.bbc_max_train,
                                      "--max-test", args.bbc_max_test, *common, log_file=log_file)
    naming = ["--task", CORPUS, "--teachers", "minilm", "lsa"]
    seconds["teacher embeddings"] = stage("10_teacher_embeddings.py", *naming, "--lsa-dim", args.lsa_dim,
                                          *common, log_file=log_file)
    steps = [args.steps * k // POINTS for k in range(POINTS + 1)]  # 0 = before distillation
    runs = base / "runs" / CORPUS
    for arm in args.arms:
        for seed in args.seeds:
            run = run_name(args.name, arm, seed)
            seconds[f"train {run}"] = stage(
                "11_train_multiteacher.py", *naming, *shlex.split(ARMS[arm]), "--seed", seed, "--run", run,
                "--max-steps", args.steps, "--save-every", args.steps // POINTS, "--keep-last", 1000,
                *shlex.split(args.train_args), *common, log_file=log_file)
            seconds[f"export {run}"] = export_points(runs / run, steps[1:-1])

    before = Paths(base, CORPUS, run=run_name(args.name, args.arms[0], args.seeds[0])).initial_dir / ST_FOLDER
    models = [f"before=st:{before}",
              f"minilm=st:{minilm_folder()}",
              f"lsa=st:{base / 'embeddings' / CORPUS / 'lsa' / 'sentence-transformer'}"]
    for arm in args.arms:
        for seed in args.seeds:
            for step in steps[1:]:
                models.append(f"{arm}-s{seed}-{step}=st:{student_folder(runs / run_name(args.name, arm, seed), step, steps[-1])}")
    results = f"{args.name}-{EVAL_TASK}"
    seconds["evaluate"] = stage("06_evaluate.py", "--task", EVAL_TASK, "--task-types", "Classification", "Clustering",
                                "--run", results, "--throughput-texts", 32, "--models", *models, *common,
                                log_file=log_file)
    table = json.loads((base / "results" / results / "table.json").read_text())

    study = summarise(table, args.arms, args.seeds, steps)
    study.update(
        run_record(started, load_before, seconds),
        sizes={"tweets": args.tweets, "steps": args.steps, "bbc_max_train": args.bbc_max_train,
               "bbc_max_test": args.bbc_max_test, "lsa_dim": args.lsa_dim, "train_args": args.train_args},
        arms=ARMS, results_table=str(base / "results" / results / "table.json"),
        runs={arm: [training_summary(runs / run_name(args.name, arm, s)) for s in args.seeds] for arm in args.arms},
    )
    (out / f"{args.name}.json").write_text(json.dumps(study, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(study))
    plot(study, figure)
    print(markdown(study), end="")
    print(f"wrote {out / args.name}.json, .md and {figure} in {study['wall_s'] / 60:.1f} min")
    return 0


def student_folder(run_dir: Path, step: int, last: int) -> Path:
    """The st/ folder of the student at ``step``: the run's export/ at the end, else its curve/."""
    return run_dir / (EXPORT_FOLDER if step == last else f"curve/step-{step}") / ST_FOLDER


def export_points(run_dir: Path, steps: list[int]) -> float:
    """Export the checkpoints at ``steps`` to curve/step-N (once); the seconds it took."""
    from embdistill.multiteacher.train import export_checkpoint

    started = time.perf_counter()
    for step in steps:
        folder = run_dir / "curve" / f"step-{step}"
        if not (folder / ST_FOLDER).is_dir():
            checkpoint = run_dir / "checkpoints" / f"step-{step:08d}.pt"
            if not checkpoint.is_file():
                sys.exit(f"error: no checkpoint {checkpoint} (was the run trained with --save-every {steps[0]}?)")
            export_checkpoint(checkpoint, folder)
    return time.perf_counter() - started


def summarise(table: dict, arms: list[str], seeds: list[int], steps: list[int]) -> dict:
    """Per arm: every column at every step, mean ± std over seeds (step 0: the student before
    distillation, the same for every arm and seed); the reference rows as single values."""
    values = {model["label"]: {**{t: s["score"] for t, s in model["scores"].items()}, **model["family_means"],
                               "mean": model["mean"]} for model in table["models"]}
    columns = [c for c in COLUMNS if c in values["before"]]
    curves = {}
    for arm in arms:
        curves[arm] = {"step": steps, "mean": {c: [values["before"][c]] for c in columns},
                       "std": {c: [0.0] for c in columns}, "per_seed": {}}
        for step in steps[1:]:
            per_seed = [values[f"{arm}-s{seed}-{step}"] for seed in seeds]
            curves[arm]["per_seed"][step] = per_seed
            for c in columns:
                scores = [row[c] for row in per_seed]
                curves[arm]["mean"][c].append(float(np.mean(scores)))
                curves[arm]["std"][c].append(float(np.std(scores, ddof=1)) if len(scores) > 1 else None)
    return {"columns": columns, "column_names": {c: COLUMNS[c] for c in columns}, "seeds": seeds,
            "curves": curves, "references": {label: values[label] for label in ("before", "minilm", "lsa")},
            "std": "sample std (ddof 1) over the seeds of each arm's mteb main score"}


def markdown(study: dict) -> str:
    columns, names = study["columns"], study["column_names"]
    lines = [f"| model | {' | '.join(names[c] for c in columns)} |", "|---" * (len(columns) + 1) + "|"]
    for arm, curve in study["curves"].items():
        cells = [f"{100 * curve['mean'][c][-1]:.1f}" + ("" if curve["std"][c][-1] is None
                                                         else f" ± {100 * curve['std'][c][-1]:.1f}")
                 for c in columns]
        lines.append(f"| {arm} (end, {len(study['seeds'])} seeds) | " + " | ".join(cells) + " |")
    for label, values in study["references"].items():
        name = "student before distillation" if label == "before" else f"teacher {label}"
        lines.append(f"| {name} | " + " | ".join(f"{100 * values[c]:.1f}" for c in columns) + " |")
    lines += ["", "Main scores (%) on bbc-news (news; distilled on tweets): mteb accuracy (32 samples "
              "per label, 10 experiments) and V-measure (k-means on held-out articles, 10 bootstrap "
              "samples); mean ± std over seeds. Along training: the .json's curves and the figure."]
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in study["columns"] if c in PLOTTED]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 3.6), squeeze=False)
    for axis, column in zip(axes[0], columns):
        for arm, curve in study["curves"].items():
            mean = 100 * np.array(curve["mean"][column])
            std = 100 * np.array([s or 0.0 for s in curve["std"][column]])
            axis.plot(curve["step"], mean, marker="o", label=arm)
            axis.fill_between(curve["step"], mean - std, mean + std, alpha=0.2)
        for label, style in (("minilm", ":"), ("lsa", "--")):
            axis.axhline(100 * study["references"][label][column], color="grey", linestyle=style, label=f"teacher {label}")
        axis.set_title(study["column_names"][column], fontsize=9)
        axis.set_xlabel("step")
    axes[0][0].set_ylabel("main score (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"distilled on tweets, evaluated on bbc-news ({study['date']}; bands: std over "
                 f"{len(study['seeds'])} seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
