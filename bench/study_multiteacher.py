"""Study: does the Gaussian-kernel NLL distil better than MSE (arXiv 2510.18680's claim)?

    nice -n 5 python bench/study_multiteacher.py --base-dir /tmp/mt-study     # the study (one command)
    python bench/study_multiteacher.py --base-dir /tmp/mt-demo --bbc-max-train 400 --tweet-max-train 400 \
        --max-test 300 --lsa-dim 128 --seeds 0 --name ablation \
        --variant default= constant="--schedule constant --warmup-steps 0" separate:mse="--mse-head separate"

Runs the pipeline's own stage scripts, each skipped when done (a rerun resumes):

1. stage 0: every training text of bbc-news (about 1,700) and --tweet-max-train (3,400)
   tweet-sentiment texts; --max-test held-out texts per task for the evaluation;
2. stage 10: MiniLM and LSA (--lsa-dim 256) embeddings of the corpus, once;
3. stage 11 for every variant x loss (nll, mse; NAME:LOSS limits a variant to one) x seed (0, 1, 2): the run's defaults
   (targets standardised for nll, the authors' raw targets for mse; heads fitted on cached
   embeddings first) plus --train-args (about 2 epochs) and the variant's arguments; the seed
   sets the heads' initialisation, the shuffling and the validation split;
4. stage 6 (mteb, 32 samples per label, 10 experiments): the students of each variant, and
   once the student before distillation and both teachers;

then writes <out>/<name>.json, <name>.md (accuracy, mean +- std over the seeds; each student row
says which targets its runs trained on, as their config.json records) and <name>.png.
The paper's ordering (NLL above MSE) counts as shown on a task only where the NLL student's
mean exceeds the MSE student's by more than twice the larger of their seed stds.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from common import study_parser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embdistill.drivers import run_stage  # noqa: E402
from embdistill.paths import ST_FOLDER, Paths  # noqa: E402

TASKS = ("bbc-news", "tweet-sentiment")
TASK_NAMES = {"bbc-news": "bbc-news", "tweet-sentiment": "tweet-sentiment"}  # mteb task names
CORPUS = "+".join(TASKS)
DEFAULT_TRAIN_ARGS = "--epochs 2 --batch-size 32 --max-length 128 --lr 1e-4 --val-every 50 --save-every 1000"


def stage(script: str, *args, log_file: Path) -> float:
    """Run a stage script (this repository first on the path); its seconds. Output to log_file."""
    script, args = f"scripts/{script}", [str(arg) for arg in args]
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TQDM_MININTERVAL": "30"}
    started = time.perf_counter()
    with open(log_file, "a") as log:
        log.write(f"\n$ {shlex.join([script, *args])}\n")
        log.flush()
        status = run_stage(script, args, env=env, output=log)
    if status:
        sys.exit(f"error: {script} failed (exit {status}); see {log_file}")
    return time.perf_counter() - started


def run_name(name: str, variant: str, loss: str, seed: int) -> str:
    return f"{name}-{variant}-{loss}-s{seed}"


def main() -> int:
    parser = study_parser(__doc__, out=str(REPO / "bench" / "results"), out_help="where the table and plot go")
    parser.add_argument("--name", default="multiteacher_study", help="file names, run and results prefix")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=["nll", "mse"], choices=["nll", "mse"])
    parser.add_argument("--bbc-max-train", type=int, default=None, help="bbc-news training texts [all]")
    parser.add_argument("--tweet-max-train", type=int, default=3400)
    parser.add_argument("--max-test", type=int, default=1000, help="held-out texts per task (bbc-news has 425)")
    parser.add_argument("--lsa-dim", type=int, default=256)
    parser.add_argument("--train-args", default=DEFAULT_TRAIN_ARGS, help="stage 11 options of every run")
    parser.add_argument("--variant", nargs="+", default=["default="], metavar="NAME[:LOSS]=ARGS",
                        help="stage 11 variants (extra options each, only LOSS's runs when given); the "
                        "first, with every loss, is the study's own")
    args = parser.parse_args()
    variants, variant_losses = {}, {}
    for item in args.variant:
        key, _, extra = item.partition("=")
        name, _, loss = key.partition(":")
        if name in variants:
            parser.error(f"variant name '{name}' given twice (names name runs and results)")
        variants[name], variant_losses[name] = extra, [loss] if loss else args.losses
    base, out = Path(args.base_dir).resolve(), Path(args.out).resolve()
    base.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log_file = base / f"{args.name}.log"
    started, load_before = time.perf_counter(), os.getloadavg()
    seconds: dict[str, float] = {}
    common = ["--base-dir", base]

    for task, max_train in zip(TASKS, (args.bbc_max_train, args.tweet_max_train)):
        caps = (["--max-train", max_train] if max_train else []) + ["--max-test", args.max_test]
        seconds[f"texts {task}"] = stage("00_texts.py", "--task", task, *caps, *common, log_file=log_file)
    naming = ["--task", *TASKS, "--teachers", "minilm", "lsa"]
    seconds["teacher embeddings"] = stage("10_teacher_embeddings.py", *naming, "--lsa-dim", args.lsa_dim,
                                          *common, log_file=log_file)
    for variant, extra in variants.items():
        for loss in variant_losses[variant]:
            for seed in args.seeds:
                run = run_name(args.name, variant, loss, seed)
                seconds[f"train {run}"] = stage(
                    "11_train_multiteacher.py", *naming, "--loss", loss, "--seed", seed, "--run", run,
                    *shlex.split(args.train_args), *shlex.split(extra), *common, log_file=log_file)

    runs = base / "runs" / CORPUS
    first_run = run_name(args.name, next(iter(variants)), args.losses[0], args.seeds[0])
    reference = [f"student-before=st:{Paths(base, CORPUS, run=first_run).initial_dir / ST_FOLDER}",
                 f"minilm=st:{minilm_folder()}",
                 lsa_spec(base, CORPUS)]
    evaluations = {f"{args.name}-reference": reference}
    for variant in variants:
        evaluations[f"{args.name}-{variant}"] = [
            f"{variant}-{loss}-s{seed}=st:{Paths(base, CORPUS, run=run_name(args.name, variant, loss, seed)).export_st}"
            for loss in variant_losses[variant] for seed in args.seeds]
    tables = {}
    for results, models in evaluations.items():
        seconds[f"evaluate {results}"] = stage("06_evaluate.py", "--tasks", *TASKS, "--run", results,
                                               "--models", *models, *common, log_file=log_file)
        tables[results] = json.loads((base / "results" / results / "table.json").read_text())

    targets = {(variant, loss): targets_of([runs / run_name(args.name, variant, loss, s) for s in args.seeds])
               for variant in variants for loss in variant_losses[variant]}
    study = summarise(tables, args, variants, variant_losses, targets)
    study.update(
        run_record(started, load_before, seconds),
        runs={variant: {loss: [training_summary(runs / run_name(args.name, variant, loss, s)) for s in args.seeds]
                        for loss in variant_losses[variant]} for variant in variants},
    )
    (out / f"{args.name}.json").write_text(json.dumps(study, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(study))
    plot(study, out / f"{args.name}.png")
    print(markdown(study), end="")
    print(f"wrote {out / args.name}.json, .md, .png in {study['wall_s'] / 60:.1f} min")
    return 0


def minilm_folder() -> Path:
    from embdistill.teachers import minilm_path

    return minilm_path()


def lsa_spec(base: Path, corpus: str) -> str:
    """Stage 6's row of the LSA teacher stage 10 saved for ``corpus``: a bag of words has no
    token limit to cut to the evaluation's --max-length, so it reads each text whole
    (@own-length), as it was fitted."""
    from embdistill.evaluation.specs import OWN_LENGTH

    return f"lsa=st:{base / 'embeddings' / corpus / 'lsa' / 'sentence-transformer'}{OWN_LENGTH}"


def targets_of(run_dirs: list[Path]) -> str:
    """'standardised' or 'raw': the targets the runs trained on, as their config.json records."""
    from embdistill.multiteacher.model import targets_kind

    kinds = {targets_kind(json.loads((d / "config.json").read_text())["run"]["standardize"]) for d in run_dirs}
    return "/".join(sorted(kinds))  # one kind, unless the seeds' runs were made with other options


def accuracies(table: dict) -> dict[str, dict[str, float]]:
    """label -> task -> accuracy (mteb's mean over its experiments)."""
    return {model["label"]: {task: score["score"] for task, score in model["scores"].items()}
            for model in table["models"]}


def summarise(tables: dict[str, dict], args, variants: dict[str, str], variant_losses: dict[str, list],
              targets: dict[tuple[str, str], str]) -> dict:
    """Rows of mean +- std over seeds (students, named with their targets) or single values
    (reference models), and for each variant the NLL - MSE difference against twice the larger
    seed std."""
    scores = {}
    for table in tables.values():
        scores.update(accuracies(table))
    columns = [TASK_NAMES[t] for t in TASKS]
    rows = []
    for label in ("student-before", "minilm", "lsa"):
        values = {c: scores[label][c] for c in columns}
        rows.append({"model": label, "seeds": 1, "mean": values | {"mean": float(np.mean(list(values.values())))},
                     "std": None})
    differences = {}
    for variant in variants:
        for loss in variant_losses[variant]:
            per_seed = [{c: scores[f"{variant}-{loss}-s{s}"][c] for c in columns} for s in args.seeds]
            for entry in per_seed:
                entry["mean"] = float(np.mean([entry[c] for c in columns]))
            keys = [*columns, "mean"]
            name = f"{loss}-student" if len(variants) == 1 else f"{variant} {loss}"
            rows.append({"model": f"{name} ({targets[variant, loss]} targets)", "targets": targets[variant, loss],
                         "variant": variant, "loss": loss, "seeds": len(per_seed), "per_seed": per_seed,
                         "mean": {k: float(np.mean([e[k] for e in per_seed])) for k in keys},
                         "std": ({k: float(np.std([e[k] for e in per_seed], ddof=1)) for k in keys}
                                 if len(per_seed) > 1 else None)})
        by_loss = {row["loss"]: row for row in rows if row.get("variant") == variant}
        if {"nll", "mse"} <= set(by_loss) and by_loss["nll"]["std"] is not None:
            nll, mse = by_loss["nll"], by_loss["mse"]
            differences[variant] = {
                k: {"nll_minus_mse": nll["mean"][k] - mse["mean"][k],
                    "twice_seed_std": 2 * max(nll["std"][k], mse["std"][k]),
                    "paper_ordering_shown": nll["mean"][k] - mse["mean"][k] > 2 * max(nll["std"][k], mse["std"][k])}
                for k in [*columns, "mean"]}
    return {"columns": [*columns, "mean"], "rows": rows, "nll_vs_mse": differences,
            "std": "sample std (ddof 1) over the seeds of each model's mteb accuracy",
            "train_args": args.train_args, "variants": variants, "seeds": args.seeds}


def training_summary(run_dir: Path) -> dict:
    """What the run's metrics say about collapse and fit: the probe metrics of its last row."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1]
    keep = [k for k in last if k.startswith(("r2/", "val/loss")) or k in ("cosine", "step", "loss")]
    first_probe = next(row for row in rows if "cosine" in row)
    return {**{k: last[k] for k in keep}, "first_cosine": first_probe["cosine"]}


def markdown(study: dict) -> str:
    columns = study["columns"]

    def cell(row, k):
        value = f"{100 * row['mean'][k]:.1f}"
        return value + (f" ± {100 * row['std'][k]:.1f}" if row["std"] else "")

    lines = ["| model | " + " | ".join(columns) + " | seeds |", "|---" * (len(columns) + 2) + "|"]
    for row in study["rows"]:
        lines.append(f"| {row['model']} | " + " | ".join(cell(row, k) for k in columns) + f" | {row['seeds']} |")
    for variant, diff in study["nll_vs_mse"].items():
        name = "NLL − MSE" if len(study["nll_vs_mse"]) == 1 else f"{variant}: NLL − MSE"
        lines.append(f"| {name} (2× seed std) | " + " | ".join(
            f"{100 * d['nll_minus_mse']:+.1f} ({100 * d['twice_seed_std']:.1f})"
            + (" shown" if d["paper_ordering_shown"] else "") for d in diff.values()) + " | |")
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, rows = study["columns"], study["rows"]
    width = 0.8 / len(rows)
    fig, axis = plt.subplots(figsize=(8, 4))
    for i, row in enumerate(rows):
        x = np.arange(len(columns)) + (i - (len(rows) - 1) / 2) * width
        errors = [100 * row["std"][k] for k in columns] if row["std"] else None
        axis.bar(x, [100 * row["mean"][k] for k in columns], width, yerr=errors, capsize=3, label=row["model"])
    axis.set_xticks(np.arange(len(columns)), columns)
    axis.set_ylabel("accuracy (%)")
    low = min(100 * row["mean"][k] for row in rows for k in columns)
    axis.set_ylim(max(0, low - 10), 100)
    axis.legend(fontsize=8, ncol=2)
    axis.set_title(f"multi-teacher study ({study['date']}; error bars: std over {len(study['seeds'])} seeds)",
                   fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_record(started: float, load_before: tuple[float, ...], seconds: dict[str, float]) -> dict:
    """How a study ran: its command, date, machine, wall time, load before and after, and the
    seconds of each stage (``started``: its time.perf_counter() at the start)."""
    return dict(
        command=shlex.join([Path(sys.executable).name, *sys.argv]),
        date=dt.date.today().isoformat(), machine=machine(), wall_s=round(time.perf_counter() - started, 1),
        load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in os.getloadavg()],
        stage_seconds={k: round(v, 1) for k, v in seconds.items()},
    )


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"


if __name__ == "__main__":
    raise SystemExit(main())
