"""Multi-teacher stage 2: train a student on the teachers' embeddings and export it.

    python scripts/11_train_multiteacher.py --task bbc-news tweet-sentiment --teachers minilm lsa
    python scripts/11_train_multiteacher.py --task bbc-news --loss mse            # the MSE baseline
    torchrun --nproc_per_node 2 scripts/11_train_multiteacher.py --task bbc-news --grad-accum 4

Reads embeddings/<corpus>/ (scripts/10_teacher_embeddings.py) and writes runs/<corpus>/<run>/:
config.json, checkpoints/, metrics.jsonl, loss.png, validation.json (loss on held-out corpus
texts, never trained on), initial/ (the student before distillation) and export/ (hf/ and
st/: scripts/06_evaluate.py reads st:runs/<corpus>/<run>/export/st). Resumes from the latest
checkpoint unless --no-resume/--overwrite.
"""

import argparse

import torch

from embdistill.artifacts import fingerprint, is_done, save_json, skip_if_done, write_manifest
from embdistill.cli import finite_float, log, positive_int, run_main, setup_logging, stage_parser
from embdistill.distributed import cleanup, default_device, print0
from embdistill.errors import UserError
from embdistill.multiteacher import initial_export_dir
from embdistill.multiteacher.corpus import (add_corpus_args, corpus_file, corpus_name, read_corpus,
                                            validation_split)
from embdistill.multiteacher.model import (LOSSES, POOLING, Collator, DistillationDataset,
                                           MultiTeacherStudent, evaluate_loss, make_loss_fn)
from embdistill.multiteacher.shards import INDEX_NAME, load_teacher_targets
from embdistill.paths import Paths, base_dir, slug
from embdistill.students import build_student, export_student
from embdistill.teachers import load_teacher
from embdistill.training import Trainer, TrainConfig, add_training_args, join_process_group


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__, task=False)
    add_corpus_args(parser, building=False)
    parser.add_argument("--teachers", nargs="+", default=["minilm", "lsa"],
                        help="teachers whose embeddings scripts/10_teacher_embeddings.py wrote")
    parser.add_argument("--loss", choices=LOSSES, default="nll",
                        help="nll: Gaussian-kernel negative log-likelihood; mse: baseline (mu only)")
    parser.add_argument("--normalize-by-dim", action="store_true",
                        help="divide each teacher's NLL by its dimension (no wide teacher dominates)")
    parser.add_argument("--run", default=None, help="run name under runs/<corpus>/ (default mt-<loss>)")
    parser.add_argument("--student", default="minilm",
                        help="the encoder to distil into: alias, sentence-transformers/hub id or folder")
    parser.add_argument("--student-layers", type=int, default=2,
                        help="keep the student's first N layers (0: all of them)")
    parser.add_argument("--pooling", choices=POOLING, default="mean", help="student embedding")
    parser.add_argument("--val-fraction", type=finite_float, default=0.05,
                        help="corpus share held out for the validation loss (never trained on)")
    parser.add_argument("--max-length", type=positive_int, default=256, help="max tokens per text")
    # The paper's settings: AdamW 5e-5, clipping 0.5 (batch: --grad-accum for its 2048).
    add_training_args(parser, TrainConfig(epochs=1, batch_size=64, lr=5e-5, weight_decay=0.01,
                                          warmup_steps=100, max_grad_norm=0.5, save_every=2000))
    return parser


def main() -> int:
    args = build_parser().parse_args()
    setup_logging(args.log_level)

    if args.student_layers < 0:
        raise UserError("--student-layers must be at least 0")
    run = args.run or f"mt-{args.loss}"
    if "/" in run or run in (".", ".."):
        raise UserError(f"bad run name '{run}': a folder name under runs/<corpus>/")
    paths = Paths(base_dir(args.base_dir), corpus_name(args), run=run)
    texts = read_corpus(paths)
    teachers = list(dict.fromkeys(slug(t) for t in args.teachers))
    folders = {name: paths.embeddings_dir(name) for name in teachers}
    targets = [load_teacher_targets(folder, texts) for folder in folders.values()]
    train_index, val_index = validation_split(len(texts), args.val_fraction, args.seed)

    env = join_process_group(args.dist_timeout)
    config = TrainConfig.from_args(args)
    run_config = {
        "corpus": paths.task, "corpus_texts": fingerprint(corpus_file(paths)),
        "teachers": {name: fingerprint(folder / INDEX_NAME) for name, folder in folders.items()},
        "student": args.student, "student_layers": args.student_layers, "pooling": args.pooling,
        "loss": args.loss, "normalize_by_dim": args.normalize_by_dim, "max_length": args.max_length,
        "val_fraction": args.val_fraction,
    }
    resolved = {"run": run_config, "train": vars(config) | {"world_size": env.world_size}}
    if skip_if_done(paths.export_dir, config=resolved, overwrite=args.overwrite, what="train"):
        return 0

    device = default_device(env)
    source = load_teacher(args.student, device=device)
    encoder = build_student(source, args.student_layers or source.model.config.num_hidden_layers)
    torch.manual_seed(args.seed)  # the heads' initialisation: reruns and resumed runs agree
    model = MultiTeacherStudent(encoder, {t.name: t.dim for t in targets}, args.pooling)
    initial_dir = initial_export_dir(paths)
    initial_config = {k: run_config[k] for k in ("student", "student_layers", "pooling", "max_length")}
    if env.is_main and (args.overwrite or not is_done(initial_dir, config=initial_config)):
        export(model, source.tokenizer, initial_dir, args)
        write_manifest(initial_dir, stage="train_multiteacher", config=initial_config)

    loss_fn = make_loss_fn(args.loss, args.normalize_by_dim)
    collator = Collator(source.tokenizer, teachers, args.max_length)
    train_set = DistillationDataset([texts[i] for i in train_index], [t.subset(train_index) for t in targets])
    log.info("student: %d layers of %s (%s pooling), %.1fM parameters with heads; %d training texts, "
             "%d validation texts, teachers %s, loss %s", encoder.config.num_hidden_layers, args.student,
             args.pooling, sum(p.numel() for p in model.parameters()) / 1e6, len(train_index),
             len(val_index), ", ".join(f"{t.name} ({t.dim}-d)" for t in targets), args.loss)
    trainer = Trainer(model, loss_fn, train_set, collator, config, paths.run_dir, run_config=run_config,
                      device=device, resume=args.resume and not args.overwrite)
    result = trainer.train()
    if env.is_main:
        validation = {"global_step": result.global_step, "texts": len(val_index)}
        if len(val_index):
            val_set = DistillationDataset([texts[i] for i in val_index], [t.subset(val_index) for t in targets])
            validation.update(evaluate_loss(trainer.module, loss_fn, val_set, collator, args.batch_size,
                                            trainer.device))
            log.info("validation loss %.4f on %d held-out texts", validation["loss"], len(val_index))
        save_json(validation, paths.run_dir / "validation.json")
        export(trainer.module, source.tokenizer, paths.export_dir, args)
        write_manifest(paths.export_dir, stage="train_multiteacher", config=resolved,
                       extra={"global_step": result.global_step, "train_metrics": result.metrics,
                              "validation": validation})
    print0(f"train: {paths.task} {run}: {result.global_step} steps, train loss "
           f"{result.metrics.get('loss', float('nan')):.4f} -> {paths.export_dir}")
    cleanup()
    return 0


def export(model: MultiTeacherStudent, tokenizer, out_dir, args) -> None:
    """The encoder alone (the heads only serve training), as hf/ and st/."""
    export_student(model.encoder, tokenizer, out_dir, normalize=True, max_seq_length=args.max_length,
                   pooling=model.pooling)


if __name__ == "__main__":
    run_main(main)
