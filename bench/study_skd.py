"""Quality study: what each stage-5 objective (and sense rule) gives the student users ship, on
four task families, over training and seeds, on the demo's bbc-news and on a user file of short
texts nobody tuned for; and which validation criterion picks the checkpoint mteb prefers.

    pip install --no-deps chatterbot-corpus     # the user file's source (once)
    PYTHONPATH=. python bench/study_skd.py --base-dir /work/studies/quality     # the study (times in BENCHMARKS.md)
    PYTHONPATH=. python bench/study_skd.py --base-dir /tmp/q --datasets bbc-news --variants skd mse \\
        --train 200 --test 60 --seeds 0 --epochs 1                          # a quick look

Datasets (``--datasets``): ``bbc-news`` (the demo's: 800 training texts, 300 held out, max
length 128), its students scored on four families (bbc-news classification and clustering,
bbc-news headline -> body retrieval, Lee STS, and tweet-sentiment classification: short texts
the students never saw, ``--student-of``); ``chatterbot``, a user data file of short texts with 21
labels (the chatterbot-corpus wheel's English conversations, one label per topic file; texts
deduplicated, a text under two topics left out, at most 150 per topic; stage 0 holds out 20 %),
scored on its own classification and clustering.

Per dataset, once: stages 00-02 and the combine (the MiniLM teacher's token states), then per
sense rule a variant needs, its dictionary (03 --sense-rule) and targets (04). Per variant
(``--variants``: an objective and sense rule, :data:`VARIANTS`) and seed: one stage-5 run with the
demo's optimiser (2 epochs, batch 16, lr 3e-4, 10 warm-up steps), validated and checkpointed
every half epoch (``--val-every`` = ``--save-every``); each validated step's weights are saved
as a student folder (``curve/step-<s>``; step 0 is the untrained student). One evaluation per
dataset (embdistill.evaluation, what scripts/06_evaluate.py runs) scores every point in plain
mode, the last in replace mode for sense variants, and the references: the teacher, the teacher
and the untrained student with the dictionary (replace mode), the untrained student and
model2vec at the same 128 tokens.

Writes results/study_skd-<dataset>/ under --base-dir (the evaluation's tables with the mteb
result files), and study_skd.md / .json / .png under --out:
* per dataset, model and family: the mean +- std over seeds of the last step, of the step each
  validation criterion keeps (similarity, cka, loss: what the export would ship), and of replace
  mode; the gain over the untrained student;
* per criterion: Spearman's rank correlation, within each run, between the criterion at the
  validated steps and the mteb mean over families at the same steps (mean +- std over runs),
  and the regret of its pick (the best step's mteb mean minus the picked step's);
* the learning curves (mean over families against epochs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import family_scores, study_parser  # noqa: E402

from embdistill.artifacts import atomic_open, load_json  # noqa: E402
from embdistill.drivers import run_stage  # noqa: E402
from embdistill.evaluation.run import EvaluationConfig, evaluate  # noqa: E402
from embdistill.input_format import effective_max_length  # noqa: E402
from embdistill.paths import Paths  # noqa: E402
from embdistill.students import build_student, save_hf  # noqa: E402
from embdistill.tasks import resolve_task  # noqa: E402
from embdistill.teachers import load_teacher  # noqa: E402
from embdistill.validation import HIGHER_IS_BETTER  # noqa: E402

CRITERIA = tuple(HIGHER_IS_BETTER)


@dataclass(frozen=True)
class Variant:
    loss: str  # scripts/05_train.py --loss
    rule: str | None = None  # the sense rule of its dictionary and targets (sense objectives)
    lr: float | None = None  # the recipe's, where it is not the study's --lr
    schedule: str = "cosine"  # scripts/05_train.py --schedule


VARIANTS = {
    "skd": Variant("sense", "dot"),  # the paper's objective and rule
    "mse": Variant("mse"),  # token states to the teacher's (the ablation)
    "pooled-mse": Variant("pooled-mse"),  # the pooled sentence embedding to the teacher's
    "skd-pooled": Variant("sense-pooled", "dot"),  # sense + the pooled term
    "skd-l2": Variant("sense", "l2"),
    "skd-cos": Variant("sense", "cos"),
    # the recipe study (bench/study_recipe.py): the default objective at other learning rates and
    # without the cosine decay
    "pooled-mse-lr1e-4": Variant("pooled-mse", lr=1e-4),
    "pooled-mse-lr1e-3": Variant("pooled-mse", lr=1e-3),
    "pooled-mse-constant": Variant("pooled-mse", schedule="constant"),
}
DEFAULT_VARIANTS = ("skd", "mse", "pooled-mse", "skd-pooled")


@dataclass(frozen=True)
class Dataset:
    train: int | None  # training texts (None: all stage 0 keeps)
    test: int | None  # held-out texts (None: stage 0's 20 %)
    scored_on: tuple[str, ...]  # evaluated tasks, the dataset's own first ("{file}": its data file)
    task_types: tuple[str, ...]
    student_of: tuple[str, ...] = ()


DATASETS = {
    "bbc-news": Dataset(800, 300, ("bbc-news", "tweet-sentiment", "lee-sts"),
                        ("Classification", "Clustering", "Retrieval", "STS"),
                        ("tweet-sentiment=bbc-news", "lee-sts=bbc-news")),
    "chatterbot": Dataset(None, None, ("{file}",), ("Classification", "Clustering")),
}
TWEETS_DEMO = ("1600", "300")  # tweet-sentiment's held-out texts: the demo's split
CHATTERBOT_PER_TOPIC = 150


def stage(script: str, *args: str) -> None:
    """One stage script, as a user runs it (its own process, its own skip rules)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        if run_stage(script, args, env={"PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}, output=output):
            output.seek(0)
            raise SystemExit(f"{script} {' '.join(args)} failed:\n{output.read()[-3000:]}")
    print(f"  {Path(script).name} {' '.join(args[:2])}: {time.perf_counter() - started:.0f} s", flush=True)


def chatterbot_file(base: Path) -> Path:
    """The user file (JSONL, text and label) from the installed chatterbot-corpus wheel."""
    path = base / "data" / "chatterbot.jsonl"
    if path.is_file():
        return path
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise SystemExit("the chatterbot dataset needs the chatterbot-corpus wheel: pip install --no-deps chatterbot-corpus")
    import yaml

    folder = Path(spec.submodule_search_locations[0]) / "data" / "english"
    labels: dict[str, set[str]] = {}
    for topic in sorted(folder.glob("*.yml")):
        for conversation in yaml.safe_load(topic.read_text(encoding="utf-8")).get("conversations", []):
            for statement in conversation if isinstance(conversation, list) else [conversation]:
                text = " ".join(str(statement).split())
                if text:
                    labels.setdefault(text, set()).add(topic.stem)
    per_topic: dict[str, list[str]] = {}
    for text, topics in sorted(labels.items()):
        if len(topics) == 1:  # a text under two topics has no label
            per_topic.setdefault(next(iter(topics)), []).append(text)
    rows = []
    for topic, texts in sorted(per_topic.items()):
        random.Random(f"chatterbot-{topic}").shuffle(texts)
        rows += [{"text": text, "label": topic} for text in texts[:CHATTERBOT_PER_TOPIC]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    ambiguous = sum(len(topics) > 1 for topics in labels.values())
    print(f"  {path}: {len(rows)} texts, {len(per_topic)} topics ({ambiguous} texts under two topics left out)")
    return path


def rule_paths(base: Path, task: str, rule: str) -> tuple[Path, Path]:
    """The rule's dictionary and targets (sense_dict/<task>/minilm.<rule>.kmeanspkl,
    work/<task>/minilm/targets.<rule>.npz)."""
    paths = Paths(base, task, "minilm")
    return (paths.sense_dict.with_name(f"minilm.{rule}.kmeanspkl"),
            paths.targets.with_name(f"targets.{rule}.npz"))


def prepare(name: str, task: str, base: Path, rules: set[str], args) -> None:
    """The dataset's texts, the teacher's combined token states, each rule's dictionary and targets."""
    dataset = DATASETS[name]
    common = ["--task", task, "--base-dir", str(base), "--seed", "0"]
    length = ["--max-length", str(args.max_length)]
    sizes = [*(["--max-train", str(args.train or dataset.train)] if args.train or dataset.train else []),
             *(["--max-test", str(args.test or dataset.test)] if args.test or dataset.test else [])]
    stage("scripts/00_texts.py", *common, *sizes)
    if "tweet-sentiment" in dataset.scored_on:
        stage("scripts/00_texts.py", "--task", "tweet-sentiment", "--base-dir", str(base), "--seed", "0",
              "--max-train", TWEETS_DEMO[0], "--max-test", TWEETS_DEMO[1])
    stage("scripts/01_count.py", *common, *length)
    stage("scripts/02_gather.py", *common, *length, "--batch-size", "32")
    stage("a0_generate_combinepkl.py", *common)
    for rule in sorted(rules):
        dictionary, targets = rule_paths(base, resolve_task(task).slug, rule)
        stage("scripts/03_cluster.py", *common, "--sense-rule", rule, "--output", str(dictionary))
        stage("scripts/04_targets.py", *common, *length, "--batch-size", "32", "--sense-dict", str(dictionary),
              "--targets", str(targets))


def train(task: str, base: Path, variant: str, seed: int, args) -> list[int]:
    """One run validated and checkpointed every half epoch; each validated step's weights saved
    as ``curve/step-<s>`` (step 0: the untrained student, not saved); returns the steps."""
    paths = Paths(base, resolve_task(task).slug, "minilm", f"{variant}-s{seed}")
    spec = VARIANTS[variant]
    every = max(1, -(-len(load_json(paths.train_json)) // args.batch_size) // 2)
    sense = []
    if spec.rule:
        dictionary, targets = rule_paths(base, paths.task, spec.rule)
        sense = ["--sense-dict", str(dictionary), "--targets", str(targets)]
    stage("scripts/05_train.py", "--task", task, "--base-dir", str(base), "--loss", spec.loss,
          "--run", paths.run, "--seed", str(seed), "--max-length", str(args.max_length), "--epochs", str(args.epochs),
          "--batch-size", str(args.batch_size), "--lr", str(spec.lr or args.lr), "--warmup-steps", "10",
          "--schedule", spec.schedule,
          "--save-every", str(every), "--val-every", str(every), "--keep-last", "1000", "--log-every", "10",
          *sense, *(["--no-export-replace"] if spec.rule else []))
    saved = {int(c.stem.split("-")[1]): c for c in paths.checkpoint_dir.glob("step-*.pt")}
    steps = [row["step"] for row in load_json(paths.run_dir / "selection.json")["scores"]]
    if len(steps) < 2:
        raise SystemExit(f"{paths.run_dir}: no validation (too few texts to hold out 8): use more --train texts")
    teacher = None
    for step in steps[1:]:
        folder = paths.run_dir / "curve" / f"step-{step}"
        if not (folder / "config.json").is_file():
            if step not in saved:
                raise SystemExit(f"{paths.run_dir}: step {step} was validated but not checkpointed")
            teacher = teacher or load_teacher("minilm", device="cpu", layers=2)
            student = build_student(teacher, 2)
            student.load_state_dict(torch.load(saved[step], map_location="cpu", weights_only=True)["model"])
            save_hf(student, teacher.tokenizer, folder, input_format=teacher.input_format,
                    normalize=teacher.normalize,
                    max_seq_length=effective_max_length(args.max_length, teacher.max_seq_length))
    return steps


def model_specs(base: Path, runs: dict[str, list[int]]) -> list[str]:
    """The references, then every run's validated steps (plain) and last step (replace mode)."""
    dot = f"{base}/sense_dict/{{task}}/minilm.dot.kmeanspkl"
    models = ["teacher=teacher:minilm", f"teacher-replace=replace:minilm@{dot}", "untrained=untrained:minilm@2",
              f"untrained-replace=replace:minilm@2@{dot}", f"model2vec=st:{base}/baselines/model2vec/minilm"]
    for run, steps in runs.items():
        for step in steps[1:]:
            models.append(f"{run}.step{step}=student:{base}/runs/{{task}}/{run}/curve/step-{step}")
        rule = VARIANTS[run.rsplit("-s", 1)[0]].rule
        if rule:
            dictionary = f"{base}/sense_dict/{{task}}/minilm.{rule}.kmeanspkl"
            models.append(f"{run}.step{steps[-1]}-replace=replace:{base}/runs/{{task}}/{run}/curve/step-{steps[-1]}"
                          f"@{dictionary}")
    return models


def kept_step(history: list[dict], criterion: str) -> int:
    """The step a criterion keeps: the best validated one, step 0 included, a later step
    replacing it only when strictly better (embdistill.validation.CheckpointSelection's rule)."""
    sign = 1 if HIGHER_IS_BETTER[criterion] else -1
    best = history[0]
    for row in history[1:]:
        if sign * row[criterion] > sign * best[criterion]:
            best = row
    return best["step"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(name: str, table: dict, base: Path, task_slug: str, runs: dict[str, list[int]], args) -> dict:
    """Per variant: last step, each criterion's kept step, replace mode (mean +- std over seeds);
    per criterion: within-run rank correlation with the mteb mean and the regret of its pick."""
    scores = family_scores(table)
    columns = [*table["families"], "mean"]

    def at(run: str, step: int) -> dict[str, float]:
        return scores["untrained"] if step == 0 else scores[f"{run}.step{step}"]

    rows = {label: {c: (scores[label][c], 0.0) for c in columns}
            for label in ("teacher", "teacher-replace", "untrained", "untrained-replace", "model2vec")}
    agreement = {c: {"spearman": [], "regret": []} for c in CRITERIA}
    curves = {}
    for variant in args.variants:
        seeds = {f"{variant}-s{seed}": runs[f"{variant}-s{seed}"] for seed in args.seeds}
        histories = {run: load_json(Paths(base, task_slug, "minilm", run).run_dir / "selection.json")["scores"]
                     for run in seeds}
        picks = {"last": {run: steps[-1] for run, steps in seeds.items()}}
        picks.update({f"kept by {c}": {run: kept_step(histories[run], c) for run in seeds} for c in CRITERIA})
        for pick, steps in picks.items():
            rows[f"{variant} ({pick})"] = {c: mean_std([at(run, step)[c] for run, step in steps.items()])
                                           for c in columns}
        if VARIANTS[variant].rule:
            rows[f"{variant}-replace (last)"] = {
                c: mean_std([scores[f"{run}.step{steps[-1]}-replace"][c] for run, steps in seeds.items()]) for c in columns}
        for run, history in histories.items():
            mteb = [at(run, row["step"])["mean"] for row in history]
            for criterion in CRITERIA:
                values = [row[criterion] for row in history]
                rho = spearmanr(values, mteb).statistic
                agreement[criterion]["spearman"].append(
                    float(rho if HIGHER_IS_BETTER[criterion] else -rho))
                agreement[criterion]["regret"].append(max(mteb) - at(run, kept_step(history, criterion))["mean"])
        curves[variant] = [(row["step"], *mean_std([at(run, seeds[run][i])["mean"] for run in seeds]))
                           for i, row in enumerate(histories[next(iter(seeds))])]
    untrained = scores["untrained"]["mean"]
    lines = [f"### {name}: mteb main scores (%), mean over each family's tasks; mean ± std over seeds "
             f"{args.seeds}", "", "| model | " + " | ".join(columns) + " | vs untrained |",
             "|---|" + "---|" * (len(columns) + 1)]
    for label, values in rows.items():
        cells = [f"{values[c][0]:.1f}" + (f" ± {values[c][1]:.1f}" if values[c][1] else "") for c in columns]
        gain = values["mean"][0] - untrained if "replace" not in label else values["mean"][0] - \
            scores["untrained-replace"]["mean"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {gain:+.1f}{' ▼' if gain < 0 else ''} |")
    lines += ["", f"criterion agreement with the mteb mean over families, within each run's validated steps "
              f"(step 0 included; {len(next(iter(agreement.values()))['spearman'])} runs):", "",
              "| criterion | Spearman (mean ± std over runs) | regret of its pick (points) |", "|---|---|---|"]
    for criterion, values in agreement.items():
        rho, regret = mean_std(values["spearman"]), mean_std(values["regret"])
        lines.append(f"| {criterion} | {rho[0]:.2f} ± {rho[1]:.2f} | {regret[0]:.2f} ± {regret[1]:.2f} |")
    return {"markdown": "\n".join(lines), "rows": {k: {c: list(v) for c, v in r.items()} for k, r in rows.items()},
            "agreement": agreement, "curves": curves, "references": {k: scores[k]["mean"] for k in
                                                                    ("teacher", "untrained", "model2vec")}}


def plot(summaries: dict[str, dict], path: Path) -> None:
    """Per dataset: the mteb mean over families against training steps, per variant (mean +- std
    over seeds), the references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 4.2), squeeze=False)
    for axis, (name, summary) in zip(axes[0], summaries.items()):
        for variant, curve in summary["curves"].items():
            points = np.array(curve)
            axis.plot(points[:, 0], points[:, 1], marker="o", label=variant)
            axis.fill_between(points[:, 0], points[:, 1] - points[:, 2], points[:, 1] + points[:, 2], alpha=0.15)
        for label, style in (("teacher", "--"), ("untrained", ":"), ("model2vec", "-.")):
            axis.axhline(summary["references"][label], color="k", linestyle=style, linewidth=1, label=label)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
    axes[0, 0].set_ylabel("mteb mean over families (%)")
    axes[0, -1].legend(fontsize=7, loc="best")
    fig.suptitle("the exported student over training, per objective (mean ± std over seeds)")
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def quality_parser(doc: str, variants: tuple[str, ...]) -> argparse.ArgumentParser:
    """The quality studies' options: --base-dir (everything), --out (the summary; default
    --base-dir), datasets, variants, sizes, the demo's training settings and --seeds."""
    parser = study_parser(doc, out="", out_help="folder of the summary (default: --base-dir)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(variants))
    parser.add_argument("--train", type=int, help="training texts of every dataset (default: each dataset's)")
    parser.add_argument("--test", type=int, help="held-out texts of every dataset (default: each dataset's)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return parser


def run_study(args, name: str, check: Callable[[Path, str], None] | None = None) -> dict[str, dict]:
    """Every dataset's preparation, runs and evaluation; writes <name>.md / .json / .png.
    ``check(base, task_slug)`` runs after a dataset's dictionaries are built."""
    base, out = Path(args.base_dir).resolve(), Path(args.out or args.base_dir).resolve()
    started = time.perf_counter()
    stage("scripts/07_model2vec.py", "--teacher", "minilm", "--base-dir", str(base))
    summaries = {}
    for dataset in args.datasets:
        task = str(chatterbot_file(base)) if dataset == "chatterbot" else dataset
        print(f"{dataset}: texts, gather, dictionaries, targets", flush=True)
        prepare(dataset, task, base, {VARIANTS[v].rule for v in args.variants if VARIANTS[v].rule} | {"dot"}, args)
        if check:
            check(base, resolve_task(task).slug)
        runs = {f"{variant}-s{seed}": train(task, base, variant, seed, args)
                for variant in args.variants for seed in args.seeds}
        models = model_specs(base, runs)
        spec = DATASETS[dataset]
        print(f"{dataset}: evaluating {len(models)} models", flush=True)
        config = EvaluationConfig(run=f"{name}-{dataset}", tasks=tuple(t.replace("{file}", task) for t in spec.scored_on),
                                  models=tuple(models), task_types=spec.task_types, student_of=spec.student_of,
                                  max_length=args.max_length, batch_size=64, throughput_texts=16)
        table = evaluate(config, base, device=torch.device("cpu"))
        summaries[dataset] = summarise(dataset, table, base, resolve_task(task).slug, runs, args)
        summaries[dataset]["minutes_so_far"] = round((time.perf_counter() - started) / 60, 1)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / f"{name}.md", "w") as fh:
        fh.write("\n\n".join(s["markdown"] for s in summaries.values()) + "\n")
    with atomic_open(out / f"{name}.json", "w") as fh:
        json.dump({"args": vars(args), "minutes": round((time.perf_counter() - started) / 60, 1),
                   **{k: {kk: vv for kk, vv in v.items() if kk != "markdown"} for k, v in summaries.items()}},
                  fh, indent=2)
    plot(summaries, out / f"{name}.png")
    print((out / f"{name}.md").read_text())
    print(f"{(time.perf_counter() - started) / 60:.1f} min; {out / name}.md / .json / .png, {base}/results/{name}-*/")
    return summaries


def main() -> None:
    run_study(quality_parser(__doc__, DEFAULT_VARIANTS).parse_args(), "study_skd")


if __name__ == "__main__":
    main()
