"""Benchmark: the heads' warm-up on cached student embeddings against a frozen student.

    PYTHONPATH=. python bench/bench_head_warmup.py --base-dir /tmp/mt-demo --steps 100

Both fit fresh heads (same initialisation, same seed, same batches of texts, same loss and
head lr) for --steps steps while the student does not move, in the same process:

* cached (what ``--head-warmup-steps`` does, embdistill.multiteacher.warmup.fit_heads): the
  student encodes the texts the steps need once, then every step is the heads' alone;
* frozen (the alternative): every step encodes its batch with the frozen student (no
  gradient, training mode as in the training loop), then steps the heads.

Reports seconds and the heads' R2 per teacher on the probe batch (the first 64 validation
texts) after the warm-up. Inputs: a multi-teacher base directory where stage 10 ran for
bbc-news+tweet-sentiment (e.g. after the README demo or bench/study_multiteacher.py).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from embdistill.distributed import DistEnv
from embdistill.multiteacher.corpus import read_corpus
from embdistill.validation import validation_split
from embdistill.multiteacher.model import Collator, MultiTeacherStudent
from embdistill.objectives import MULTITEACHER_OBJECTIVES
from embdistill.multiteacher.monitor import PROBE_TEXTS, probe_metrics
from embdistill.multiteacher.shards import load_teacher_targets, target_statistics
from embdistill.multiteacher.train import split_dataset
from embdistill.multiteacher.warmup import fit_heads
from embdistill.paths import Paths, base_dir
from embdistill.students import build_student
from embdistill.teachers import load_teacher
from embdistill.training import to_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-dir", required=True)
    parser.add_argument("--corpus", default="bbc-news+tweet-sentiment")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--loss", default="nll")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    paths = Paths(base_dir(args.base_dir), args.corpus)
    texts = read_corpus(paths)
    targets = [load_teacher_targets(paths.embeddings_dir(name), texts) for name in ("minilm", "lsa")]
    train_index, val_index = validation_split(len(texts), 0.05, 0)
    stats = {t.name: target_statistics(t, train_index) for t in targets}
    train_set, val_set = split_dataset(texts, targets, train_index), split_dataset(texts, targets, val_index)
    source = load_teacher("minilm", device="cpu")
    collator = Collator(source.tokenizer, ["minilm", "lsa"], args.max_length)
    probe = to_device(collator(val_set.items(range(min(PROBE_TEXTS, len(val_set))))), "cpu")
    loss = MULTITEACHER_OBJECTIVES[args.loss]()

    def fresh_model() -> MultiTeacherStudent:
        torch.manual_seed(0)
        return MultiTeacherStudent(build_student(source, 2), {t.name: t.dim for t in targets}, "mean",
                                   target_stats=stats)

    print(f"{len(train_set)} training texts, {args.steps} steps of {args.batch_size} texts, head lr {args.head_lr}, "
          f"{torch.get_num_threads()} threads")
    before = probe_metrics(fresh_model(), probe)
    print("before:  R2 " + ", ".join(f"{k} {v:.3f}" for k, v in before.items() if k.startswith("r2/")))

    model = fresh_model()
    started = time.perf_counter()
    summary = fit_heads(model, train_set, collator, loss, steps=args.steps, batch_size=args.batch_size,
                        texts_per_step=args.batch_size, lr=args.head_lr, weight_decay=0.01, max_grad_norm=0.5,
                        seed=0, device=torch.device("cpu"), env=DistEnv())
    cached_s = time.perf_counter() - started
    cached = probe_metrics(model, probe)

    model = fresh_model()
    started = time.perf_counter()
    frozen_student(model, train_set, collator, loss, args)
    frozen_s = time.perf_counter() - started
    frozen = probe_metrics(model, probe)

    for name, seconds, metrics, note in (
            ("cached", cached_s, cached, f"{summary['texts']} texts encoded once"),
            ("frozen", frozen_s, frozen, f"{args.steps * args.batch_size} text encodings")):
        print(f"{name}: {seconds:6.1f} s ({note}); R2 "
              + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("r2/")))
    print(f"cached / frozen time: {cached_s / frozen_s:.2f}")


def frozen_student(model, dataset, collator, loss, args) -> None:
    """The same steps, each encoding its batch with the student frozen (no gradient)."""
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.heads.parameters(), lr=args.head_lr, weight_decay=0.01)
    order: list[int] = []
    for _ in range(args.steps):
        if len(order) < args.batch_size:
            order += rng.permutation(len(dataset)).tolist()
        rows, order = order[: args.batch_size], order[args.batch_size:]
        batch = collator(dataset.items(rows))
        with torch.no_grad():
            embedding = model.embed(batch["input_ids"], batch["attention_mask"])
        value, _ = loss.of_predictions(model.predict(embedding), model.scale_targets(batch["targets"]))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.heads.parameters(), 0.5)
        optimizer.step()


if __name__ == "__main__":
    main()
