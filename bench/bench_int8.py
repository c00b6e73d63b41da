"""Benchmark: texts/s of the teacher, the fp32 student, the int8 student and model2vec, in one
process on the same texts (the issue's goal: int8 >= 2.5x the fp32 student's texts/s).

    python bench/bench_int8.py                         # after run_demo.sh, on its bbc-news outputs
    python bench/bench_int8.py --threads 2 --texts 256 --batch-size 64 --repeats 5

Every model is a SentenceTransformer folder loaded as users load it: the teacher's own folder
(MiniLM, its texts cut at the students' length), ``runs/<task>/skd/export/st`` (fp32 student,
with its prompt), ``.../st-int8``
(scripts/08_quantize.py) and ``baselines/model2vec/minilm`` (scripts/07_model2vec.py); a
folder that is missing is left out. All embed the same held-out texts of --task (the
package's data) in batches of --batch-size on --threads CPU threads (onnxruntime on as many
as torch). After one warm-up batch each, the models take turns, --repeats passes over all the
texts each (turns, so that a change in the machine's load hits every model alike); reported:
the median and best texts/s, the median's ratio to the fp32 student's, and the int8
embeddings' cosine to the fp32 ones (mean and lowest), the machine's load average beside them.
Then the two students' encoders alone on the same texts, tokenized once beforehand (the torch
model and the int8 folder's ONNX module, which runs each text alone, in turns): what the
folders' texts/s spend besides the encoder (tokenizing, pooling) is the difference.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, run as a script or imported
from common import add_machine_args, machine  # noqa: E402
from embdistill.paths import ST_FOLDER, ST_INT8_FOLDER, Paths, base_dir, baseline_dir  # noqa: E402
from embdistill.tasks import resolve_task  # noqa: E402
from embdistill.teachers import minilm_path  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="bbc-news", help="whose student and held-out texts")
    parser.add_argument("--base-dir", default=None, help="where run_demo.sh wrote its outputs")
    parser.add_argument("--run", default="skd", help="the training run (runs/<task>/<run>/export)")
    parser.add_argument("--texts", type=int, default=256, help="held-out texts embedded per pass")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per model")
    add_machine_args(parser, threads=0, device="cpu", seed=False)
    return parser.parse_args(argv)


def models(args) -> dict[str, Path]:
    """label -> SentenceTransformer folder, the fp32 student first (the ratios' reference)."""
    export = Paths(base_dir(args.base_dir), resolve_task(args.task).slug, run=args.run).export_dir
    folders = {"student fp32": export / ST_FOLDER, "student int8": export / ST_INT8_FOLDER, "teacher": minilm_path(),
               "model2vec": baseline_dir(base_dir(args.base_dir), "model2vec", "minilm")}
    missing = [f"{label} ({folder})" for label, folder in folders.items() if not (folder / "modules.json").is_file()]
    if "student fp32" in " ".join(missing):
        sys.exit(f"no fp32 student at {folders['student fp32']}: run run_demo.sh (or scripts/05_train.py) first")
    if missing:
        print(f"left out, not built: {', '.join(missing)}")
    return {label: folder for label, folder in folders.items() if (folder / "modules.json").is_file()}


def main(argv=None) -> None:
    args = parse_args(argv)
    machine(args)  # --threads before any model loads: onnxruntime takes torch's thread count then
    from sentence_transformers import SentenceTransformer

    texts = resolve_task(args.task).load_splits(max_train=1, max_test=args.texts).test_texts
    loaded = {label: SentenceTransformer(str(folder), device="cpu", trust_remote_code=True)
              for label, folder in models(args).items()}
    if "teacher" in loaded:  # cut texts where the students cut them (MiniLM's own limit is 256)
        loaded["teacher"].max_seq_length = loaded["student fp32"].max_seq_length
    embeddings, seconds = {}, {label: [] for label in loaded}
    for label, model in loaded.items():
        model.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
    for _ in range(args.repeats):
        for label, model in loaded.items():
            start = time.perf_counter()
            embeddings[label] = model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
            seconds[label].append(time.perf_counter() - start)
    reference = len(texts) / statistics.median(seconds["student fp32"])
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
          f"torch threads; load average {os.getloadavg()[0]:.2f}; {len(texts)} texts of {args.task}, "
          f"batch {args.batch_size}, {args.repeats} passes")
    print("| model | texts/s (median) | best | vs fp32 student |\n|---|---|---|---|")
    for label, times in seconds.items():
        median, best = len(texts) / statistics.median(times), len(texts) / min(times)
        print(f"| {label} | {median:.1f} | {best:.1f} | {median / reference:.2f}x |")
    if "student int8" in embeddings:
        a, b = embeddings["student fp32"], embeddings["student int8"]
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(f"int8 vs fp32 embeddings: cosine mean {cosine.mean():.4f}, lowest {cosine.min():.4f}")
        encoders_alone(loaded["student fp32"], loaded["student int8"], texts, args)


def encoders_alone(fp32, int8, texts: list[str], args) -> None:
    """texts/s of the fp32 encoder (torch) and the int8 one (the folder's OnnxEncoder) on batches
    tokenized beforehand, passes in turns; printed as a second table."""
    encoder, onnx_encoder = fp32[0], int8[0]
    # the int8 folder's tokenizer is the fp32 one's, cut at the same length (tests/test_quantize.py)
    batches = [onnx_encoder.tokenize(texts[i : i + args.batch_size]) for i in range(0, len(texts), args.batch_size)]

    def run_torch():
        with torch.inference_mode():
            for batch in batches:
                encoder.auto_model(**batch)

    def run_onnx():
        for batch in batches:
            onnx_encoder(dict(batch))  # a copy: forward adds the token states to the dict it is given

    runs, seconds = {"fp32 encoder (torch)": run_torch, "int8 encoder (onnxruntime)": run_onnx}, {}
    for run in runs.values():
        run()  # warm-up
    for _ in range(args.repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            seconds.setdefault(label, []).append(time.perf_counter() - start)
    reference = len(texts) / statistics.median(seconds["fp32 encoder (torch)"])
    print("| encoder alone | texts/s (median) | vs fp32 encoder |\n|---|---|---|")
    for label, times in seconds.items():
        median = len(texts) / statistics.median(times)
        print(f"| {label} | {median:.1f} | {median / reference:.2f}x |")


if __name__ == "__main__":
    main()
