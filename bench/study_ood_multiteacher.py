"""Study: multi-teacher distillation out of domain: distil on tweets, evaluate on news
(bbc-news classification, clustering and headline -> body retrieval; STS on the Lee corpus),
per loss arm, along training.

    nice -n 5 python bench/study_ood_multiteacher.py --base-dir /tmp/ood-study       # the study
    python bench/study_ood_multiteacher.py --base-dir /tmp/ood-tiny --tweets 200 --steps 6 \
        --bbc-max-train 100 --bbc-max-test 40 --arms nll mse-raw --seeds 0 1 \
        --figure /tmp/ood-tiny/ood.png --out /tmp/ood-tiny                           # a tiny look

Runs the pipeline's own stage scripts, each skipped when done (a rerun resumes):

1. stage 0: --tweets tweet-sentiment texts (the distillation corpus; its labels are not used);
   bbc-news with --bbc-max-train training texts (the classifier's, 32 per label per
   experiment) and --bbc-max-test held-out articles (classification's test split, the whole
   clustering task, and the retrieval task's headlines and bodies, near duplicates left out);
   the Lee corpus needs no stage 0 (it ships with the gensim wheel);
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
5. stage 6 once, on the four families the project scores offline (--tasks bbc-news lee-sts
   --task-types Classification Clustering Retrieval STS; 32 samples per label, 10
   experiments): the student before distillation (step 0, the run's initial/), every arm x
   seed at 1/3, 2/3 and the end (export/), and both teachers as reference lines. Every row is
   one sentence-transformers model for all tasks, so lee-sts needs no --student-of.

Writes <out>/<name>.json and <name>.md (rows: arm; columns: each family's score and the mean
over families, as stage 6's table.json gives them (family_means, mean_over_families), in %, at
the end, mean ± std over seeds (ddof 1), and each arm's gain over step 0, per family in a
second table), and --figure (a panel per family and one for the mean: each score against the
step, per arm, mean ± std over seeds, the legend giving each arm's gain at the end).

Sizing (the defaults). Measured with the four families (2026-12-07, the 2-core CPU shared, load
5-7; BENCHMARKS.md): a training 280-472 s, stage 6 on 39 models 1,336 s. Earlier estimates: The two-family version
(classification and clustering only) took 35.2 min on one thread of the 2-core CPU, the other
core busy for its first 22 min (BENCHMARKS.md, 2026-12-03): teacher embeddings 64 s, each of
the 12 trainings of 96 steps 117-146 s, stage 6 on 39 models 527 s (~13.5 s a model). Retrieval
embeds, per model, the held-out articles' headlines and bodies again (<= 2 x --bbc-max-test
texts, the bodies as long as the clustering task's) and STS the Lee corpus's 50 documents: an
estimated +50-70 % of a model's evaluation, i.e. stage 6 ~13-15 min on one thread (the 6-layer
teachers, at their own 256 tokens, the longest), and the whole study ~40-45 min on one thread,
less with both cores idle. --steps, --tweets and --bbc-max-test scale it; the .json records
the wall time and each stage's seconds (wall_s, stage_seconds). Measured on a smaller tiny
look than the second command (--steps 3 --arms nll --seeds 0 1, else the same; 2026-12-07,
the 2-core CPU shared, load 3.4-5.3): stage 6 on 9 models 186 s, a student 13-20 s (of which
retrieval and STS 4-5 s, with 40 held-out articles), MiniLM 63 s, LSA 4 s.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from common import family_scores, study_parser
from study_multiteacher import REPO, lsa_spec, minilm_folder, run_record, stage, training_summary

from embdistill.evaluation.offline_tasks import LEE_STS  # noqa: E402 (study_multiteacher puts REPO on the path)
from embdistill.paths import EXPORT_FOLDER, ST_FOLDER, Paths  # noqa: E402

CORPUS = "tweet-sentiment"
EVAL_TASK = "bbc-news"
# The four families the project scores offline: bbc-news classification, clustering and
# headline -> body retrieval, and STS on the Lee corpus (news too, evaluation only).
FAMILIES = ("Classification", "Clustering", "Retrieval", "STS")
ARMS = {
    "nll": "--loss nll --standardize",
    "mse-raw": "--loss mse --no-standardize",
    "mse-std": "--loss mse --standardize",
    "nll-dim": "--loss nll --standardize --normalize-by-dim",
}
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
              lsa_spec(base, CORPUS)]
    for arm in args.arms:
        for seed in args.seeds:
            for step in steps[1:]:
                models.append(f"{arm}-s{seed}-{step}=st:{student_folder(runs / run_name(args.name, arm, seed), step, steps[-1])}")
    # st: rows are one model for every task (no {task} in them), so lee-sts needs no --student-of.
    results = f"{args.name}-{EVAL_TASK}-{LEE_STS}"
    seconds["evaluate"] = stage("06_evaluate.py", "--tasks", EVAL_TASK, LEE_STS, "--task-types", *FAMILIES,
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
    """Per arm: each family's score and the mean over families (stage 6's family_means and
    mean_over_families, in %) at every step, mean ± std over seeds (step 0: the student before
    distillation, the same for every arm and seed), and the end's gain over step 0; the
    reference rows as single values."""
    scores = family_scores(table)
    columns = [*table["families"], "mean"]
    main_scores = {family: ", ".join(f"{t} {table['tasks'][t]['main_score']}" for t in tasks)
                   for family, tasks in table["families"].items()}
    names = {family: f"{family} ({tasks})" for family, tasks in main_scores.items()} | {"mean": "mean over families"}
    before = scores["before"]
    curves = {}
    for arm in arms:
        curves[arm] = {"step": steps, "mean": {c: [before[c]] for c in columns},
                       "std": {c: [0.0] for c in columns}, "per_seed": {}}
        for step in steps[1:]:
            per_seed = [scores[f"{arm}-s{seed}-{step}"] for seed in seeds]
            curves[arm]["per_seed"][step] = per_seed
            for c in columns:
                values = [row[c] for row in per_seed]
                curves[arm]["mean"][c].append(float(np.mean(values)))
                curves[arm]["std"][c].append(float(np.std(values, ddof=1)) if len(values) > 1 else None)
        curves[arm]["gain_over_step_0"] = {c: curves[arm]["mean"][c][-1] - before[c] for c in columns}
    return {"columns": columns, "column_names": names, "seeds": seeds, "curves": curves,
            "references": {label: scores[label] for label in ("before", "minilm", "lsa")},
            "scores": "mteb main scores in %: each family's mean over its tasks (one task each here) and "
                      "their mean, as stage 6's table.json gives them (family_means, mean_over_families)",
            "std": "sample std (ddof 1) over the seeds of each arm",
            "gain_over_step_0": "the arm's mean over seeds at the end minus the student before distillation "
                                "(its std: the end's)"}


def markdown(study: dict) -> str:
    columns, names = study["columns"], study["column_names"]

    def cell(value: float, std: float | None, sign: str = "") -> str:
        return f"{value:{sign}.1f}" + ("" if std is None else f" ± {std:.1f}")

    lines = [f"| model | {' | '.join(names[c] for c in columns)} | gain over step 0 (mean) |",
             "|---" * (len(columns) + 2) + "|"]
    for arm, curve in study["curves"].items():
        cells = [cell(curve["mean"][c][-1], curve["std"][c][-1]) for c in columns]
        gain = cell(curve["gain_over_step_0"]["mean"], curve["std"]["mean"][-1], "+")
        lines.append(f"| {arm} (end, {len(study['seeds'])} seeds) | " + " | ".join(cells) + f" | {gain} |")
    for label, values in study["references"].items():
        name = "student before distillation (step 0)" if label == "before" else f"teacher {label}"
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.1f}" for c in columns) + " | |")
    lines += ["", "Gain over step 0 per family (points; mean over seeds at the end minus the student before distillation):",
              "", f"| arm | {' | '.join(names[c] for c in columns)} |", "|---" * (len(columns) + 1) + "|"]
    for arm, curve in study["curves"].items():
        lines.append(f"| {arm} | " + " | ".join(f"{curve['gain_over_step_0'][c]:+.1f}" for c in columns) + " |")
    lines += ["", "Main scores (%) of news tasks, distilled on tweets: bbc-news accuracy (32 samples per label, "
              "10 experiments), V-measure (k-means on held-out articles, 10 bootstrap samples), headline -> "
              "body nDCG@10 (held-out articles), Lee-corpus STS cosine Spearman; mean ± std over seeds. "
              "Along training: the .json's curves and the figure."]
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = study["columns"]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6), squeeze=False)
    for axis, column in zip(axes[0], columns):
        for arm, curve in study["curves"].items():
            mean = np.array(curve["mean"][column])
            std = np.array([s or 0.0 for s in curve["std"][column]])
            axis.plot(curve["step"], mean, marker="o", label=f"{arm} ({curve['gain_over_step_0'][column]:+.1f} at the end)")
            axis.fill_between(curve["step"], mean - std, mean + std, alpha=0.2)
        for label, style in (("minilm", ":"), ("lsa", "--")):
            axis.axhline(study["references"][label][column], color="grey", linestyle=style, label=f"teacher {label}")
        axis.set_title(study["column_names"][column], fontsize=9)
        axis.set_xlabel("step (0: before distillation)")
        axis.legend(fontsize=6)  # per panel: each arm's gain over step 0 is the panel's own
    axes[0][0].set_ylabel("main score (%)")
    fig.suptitle(f"distilled on tweets, evaluated on news: bbc-news and the Lee corpus ({study['date']}; bands: std over "
                 f"{len(study['seeds'])} seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
