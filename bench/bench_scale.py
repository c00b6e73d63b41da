"""Cost as the work grows: every pipeline stage at N training texts, N doubling.

    PYTHONPATH=. .venv/bin/python bench/bench_scale.py --out /work/scale_out            # 1k..16k tweets
    PYTHONPATH=. .venv/bin/python bench/bench_scale.py --task bbc-news --sizes 250 500 1000 2000

Per N: a fresh base directory, then each stage as its own command line runs it (the stage
script in a child process, as the drivers start a stage of its own process): texts (stage 0,
N training texts and N/4 held-out), count, gather, combine, cluster, targets, a fixed number of
training steps, evaluation of the exported student, and the multi-teacher teacher embeddings
(stage 10, MiniLM and LSA of 64 dimensions). Each stage's wall seconds, peak host RSS (``ru_maxrss`` of that
child, from ``os.wait4``), CPU seconds (user + system of that child: with one thread, the wall
time of an idle machine, and far less disturbed by other jobs than the wall time) and disk written (growth of the base directory's bytes) are recorded,
with what the plan (embdistill/plan.py) reads as the work: texts, text tokens and kept states
(``sum(min(count, cap))`` over the token counts). Writes, under --out: ``scale.json``,
``scale.md`` (table and log-log slopes), ``scale.png`` (log-log, one line per stage) and the
stages' logs; --fit-max-n then fits the plan's constants (``bench/plan_constants.json`` with
--write-constants) on the sizes up to it and checks their prediction at the largest size. The
CPU rates that growing N cannot measure (``embdistill.plan.UNIT_RATE_TERMS``: stage 0's and the
count's, which are start-up at these sizes, and the combine's per byte of states) are measured
after the stage runs, in this process (``measure_unit_rates``, ~10 s: after them, because a stage
forked from this process counts its memory at the fork in its peak), and recorded in scale.json.

``bbc-news`` has 2,225 articles (about 1,780 for training): N larger than that gives all of
them, and the recorded N is the count stage 0 wrote.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embdistill.plan import STAGES, Options  # noqa: E402
from embdistill.torchrun import die_with_parent  # noqa: E402

CAP = 500  # per-token cap of gather and combine: small, so that it binds at these N
COMBINE_ROWS = (2_000, 20_000)  # rows per id of the synthetic rank files the combine's byte rate compares


def stage_commands(task: str, n: int, args) -> dict[str, list[str]]:
    """Each stage's script and options (paths relative to the base directory)."""
    length = ["--max-length", str(args.max_length)]
    return {
        "texts": ["scripts/00_texts.py", "--task", task, "--max-train", str(n), "--max-test", str(max(n // 4, 50))],
        "count": ["scripts/01_count.py", "--task", task, *length],
        "gather": ["scripts/02_gather.py", "--task", task, *length, "--per-token", str(args.cap), "--batch-size", "32",
                   "--flush-every", str(args.flush_every)],
        "combine": ["a0_generate_combinepkl.py", "--task", task, "--cap", str(args.cap)],
        "cluster": ["scripts/03_cluster.py", "--task", task, "--k-rule", "fixed", "--senses", str(args.senses),
                    "--max-iter", "20", "--threads", str(args.threads)],
        "targets": ["scripts/04_targets.py", "--task", task, *length, "--batch-size", "32"],
        "train": ["scripts/05_train.py", "--task", task, "--loss", "sense", *length, "--epochs", "1",
                  "--max-steps", str(args.train_steps), "--batch-size", "16", "--lr", "3e-4", "--warmup-steps", "2",
                  "--save-every", "100000", "--log-every", "10"],
        "evaluate": ["scripts/06_evaluate.py", "--task", task, "--run", "scale", *length, "--batch-size", "64",
                     "--n-experiments", "3", "--throughput-texts", "16", "--models", "skd=st:runs/{task}/skd/export/st"],
        "teacher_embeddings": ["scripts/10_teacher_embeddings.py", "--task", task, "--teachers", "minilm", "lsa", "--lsa-dim", "64",
                               *length, "--batch-size", "64"],
    }


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def run_child(command: list[str], base: Path, log: Path, threads: int) -> dict:
    """Run one stage script in a child; its wall seconds, peak RSS and the disk it added."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    before = tree_bytes(base)
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, str(REPO / command[0]), *command[1:], "--base-dir", str(base)],
                                 cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 preexec_fn=functools.partial(die_with_parent, os.getpid()))
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: its peak RSS alone
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode:
        raise SystemExit(f"error: {command[0]} failed (status {child.returncode}); see {log}")
    return {"wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "disk_mb": round((tree_bytes(base) - before) / 2**20, 3)}


def work_of(base: Path, cap: int, senses: int) -> dict:
    """What the plan reads as the work of this N: texts, characters, text tokens, kept states."""
    from embdistill.artifacts import load_pickle

    [train] = base.glob("text_train/*/train.json")
    [evaluation] = base.glob("text_train/*/eval.json")
    [counts_file] = base.glob("work/*/*/counts.pkl")
    texts = json.loads(train.read_text())  # as the stages read them: the instruction, then the text
    counts = load_pickle(counts_file).values()
    return {"texts": len(texts), "chars": sum(map(len, texts)),
            "eval_texts": len(json.loads(evaluation.read_text())["test"]["text"]), "tokens": sum(counts),
            "token_ids": len(counts), "kept_states": sum(min(c, cap) for c in counts),
            "dictionary_states": sum(min(c, senses) for c in counts)}


def slope(xs, ys) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def slopes(records: list[dict]) -> dict:
    """Per stage and metric: the log-log slope over all N and over the last doubling."""
    ns = [r["work"]["texts"] for r in records]
    out = {}
    for stage in STAGES:
        out[stage] = {}
        for metric in ("wall_s", "cpu_s", "peak_rss_mb", "disk_mb"):
            ys = [r["stages"][stage][metric] for r in records]
            if min(ys) <= 0.01:  # nothing written (or all of it deleted again): no slope
                out[stage][metric] = {"all": None, "last": None}
                continue
            out[stage][metric] = {"all": round(slope(ns, ys), 2), "last": round(slope(ns[-2:], ys[-2:]), 2)}
    return out


def markdown(result: dict) -> str:
    records, fitted = result["records"], result["slopes"]
    ns = [r["work"]["texts"] for r in records]
    lines = [f"N (training texts): {', '.join(map(str, ns))}; tokens: "
             f"{', '.join(str(r['work']['tokens']) for r in records)}; kept states (cap {result['settings']['cap']}): "
             f"{', '.join(str(r['work']['kept_states']) for r in records)}", "",
             "| stage | wall s | CPU s | peak RSS MB | disk MB | slope wall | slope CPU | slope RSS | slope disk |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(s):
        return "-" if s["all"] is None else f"{s['all']:.2f} ({s['last']:.2f})"

    for stage in STAGES:
        metrics = ("wall_s", "cpu_s", "peak_rss_mb", "disk_mb")
        cells = [" / ".join(f"{r['stages'][stage][m]:.4g}" for r in records) for m in metrics]
        lines.append(f"| {stage} | {' | '.join(cells)} | {' | '.join(fmt(fitted[stage][m]) for m in metrics)} |")
    lines += ["", "Each cell: the sizes in order; slope: log-log over all N (over the last doubling)."]
    if "validation" in result:
        lines += ["", f"Plan fitted at N <= {result['validation']['fit_max_n']}, predicting N = {ns[-1]}:", "",
                  "| stage | CPU s pred / meas | RSS MB pred / meas | disk MB pred / meas |", "|---|---|---|---|"]
        for stage, row in result["validation"]["stages"].items():
            lines.append(f"| {stage} | " + " | ".join(
                f"{row[m]['predicted']:.4g} / {row[m]['measured']:.4g} ({row[m]['error']:+.0%})"
                for m in ("cpu_s", "peak_rss_mb", "disk_mb")) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["work"]["texts"] for r in result["records"]]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
    for ax, (metric, label) in zip(axes, [("wall_s", "wall seconds (shared machine)"), ("cpu_s", "CPU seconds"),
                                           ("peak_rss_mb", "peak host RSS (MB)"),
                                           ("disk_mb", "disk written (MB)")]):
        for stage in STAGES:
            ys = [r["stages"][stage][metric] for r in result["records"]]
            if min(ys) > 0:
                ax.plot(ns, ys, marker="o", label=stage)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training texts N")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"bench_scale: {result['settings']['task']}, {result['settings']['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="tweet-sentiment", help="tweet-sentiment (short) or bbc-news (long texts)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 16000])
    parser.add_argument("--out", type=Path, default=Path("scale_out"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every stage")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--cap", type=int, default=CAP, help="per-token cap of gather and combine")
    parser.add_argument("--senses", type=int, default=5, help="k of the fixed k rule")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--flush-every", type=int, default=Options.flush_every, help="texts of a gather part (02_gather.py's)")
    parser.add_argument("--fit-max-n", type=int, default=4000, help="fit the plan's constants on N up to this")
    parser.add_argument("--write-constants", type=Path, default=None,
                        help="write the fitted constants there (bench/plan_constants.json)")
    parser.add_argument("--keep", action="store_true", help="keep each N's base directory")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="no runs: refit and report an earlier scale.json (written to --out)")
    args = parser.parse_args()
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        report(result, args)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()}, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f} at start", "settings": settings, "records": []}
    for n in args.sizes:
        base = args.out / f"n{n}"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        stages = {}
        for stage, command in stage_commands(args.task, n, args).items():
            stages[stage] = run_child(command, base, args.out / f"n{n}.{stage}.log", args.threads)
            print(f"N={n} {stage}: {stages[stage]}", flush=True)
        result["records"].append({"n": n, "load": os.getloadavg()[0], "work": work_of(base, args.cap, args.senses),
                                  "stages": stages})
        if not args.keep:
            shutil.rmtree(base)
        result["slopes"] = slopes(result["records"]) if len(result["records"]) > 1 else {}
        (args.out / "scale.json").write_text(json.dumps(result, indent=1))  # what has finished, if stopped

    result["unit_rates"] = measure_unit_rates(max_length=args.max_length)
    print(f"unit rates: {json.dumps(result['unit_rates'])}", flush=True)
    report(result, args)


def measure_unit_rates(n_texts: int = 20_000, max_length: int = 128) -> dict:
    """The CPU rates the plan does not fit (embdistill.plan.UNIT_RATE_TERMS), measured in this
    process on work large enough to dwarf start-up: seconds per character of stage 0's own work
    (format, write train.json, read it back), per token of the count's (MiniLM's tokenizer,
    count_tokens), and per byte of states of the combine's (the real combine of a synthetic rank
    file of 16 token ids, at 2,000 and at 20,000 rows each: the difference over the bytes, so that
    neither start-up nor the per-token work counts). The stage runs are dominated by their imports
    at bench sizes, and the combine's time by its per-token work: fitted, these rates are noise."""
    import tempfile

    import numpy as np
    import torch

    from embdistill.artifacts import save_json, save_pickle
    from embdistill.plan import UNIT_RATE_TERMS
    from embdistill.input_format import format_example
    from embdistill.senses.combine import combine
    from embdistill.senses.gather import count_tokens
    from embdistill.tasks import resolve_task
    from embdistill.teachers import load_tokenizer
    from embdistill.texts import JsonTextList

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the stage runs have it
    splits = resolve_task("tweet-sentiment").load_splits(max_train=n_texts, max_test=1)
    texts = list(splits.train_texts)
    chars = sum(map(len, texts))
    tokenizer = load_tokenizer("minilm")
    combine_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.process_time()
        save_json([format_example("Classify the sentiment", t) for t in texts], Path(tmp) / "train.json")
        examples = JsonTextList(Path(tmp) / "train.json")
        stage0 = time.process_time() - start
        start = time.process_time()
        counts = count_tokens(tokenizer.tokenize, examples, max_length, progress=False)
        count = time.process_time() - start
        rng = np.random.default_rng(0)
        for rows in COMBINE_ROWS:
            rank_file = Path(tmp) / f"r{rows}" / "rank0.pkl"
            rank_file.parent.mkdir()
            save_pickle({t: rng.standard_normal((rows, 384)).astype(np.float16) for t in range(16)}, rank_file)
            start = time.process_time()
            combine([[rank_file]], rows, 0, rank_file.with_name("combined.pkl"), {}, {"input0": rank_file})
            combine_s[rows] = time.process_time() - start
    tokens = sum(counts.values())
    small, large = COMBINE_ROWS
    state_bytes = 16 * (large - small) * 384 * 2
    rates = {"texts": (stage0 / chars, {"chars": chars, "cpu_s": stage0}),
             "count": (count / tokens, {"tokens": tokens, "cpu_s": count}),
             "combine": (max(combine_s[large] - combine_s[small], 0) / state_bytes,
                         {"state_bytes": state_bytes, "cpu_s": combine_s})}
    return {**{stage: {"term": UNIT_RATE_TERMS[stage], "rate": rate, **measured} for stage, (rate, measured) in rates.items()},
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()}, load {os.getloadavg()[0]:.1f}"}


def report(result: dict, args) -> None:
    """The plan's fit and check, then scale.json, scale.md and scale.png under --out."""
    from embdistill.plan import fit_constants, validate

    fit_on = [r for r in result["records"] if r["work"]["texts"] <= args.fit_max_n]
    if len(fit_on) >= 2 and len(fit_on) < len(result["records"]):
        if "unit_rates" not in result:
            raise SystemExit("error: this scale.json has no unit rates (a run before they were measured, or "
                             "one stopped early): run bench_scale.py again to fit the plan")
        constants = fit_constants(fit_on, result["settings"], result["date"], result["machine"], result["unit_rates"])
        result["validation"] = {"fit_max_n": args.fit_max_n, "stages": validate(constants, result["records"][-1])}
        if args.write_constants:
            args.write_constants.parent.mkdir(parents=True, exist_ok=True)
            args.write_constants.write_text(json.dumps(constants, indent=1) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=1))
    (args.out / "scale.md").write_text(markdown(result))
    plot(result, args.out / "scale.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
