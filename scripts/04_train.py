"""Stage 3: train the SKD student (the teacher's first layers) and export it; runs/<task>/<run>/.

    python scripts/04_train.py --task bbc-news                 # the paper's settings
    python scripts/04_train.py --task bbc-news --epochs 1 --max-steps 300 --max-length 128 --lr 2e-5
    ./run_train.sh bbc-news --nproc_per_node 2 --max-steps 300  # torchrun, DDP

Writes runs/<task>/<run>/: config.json, checkpoints/, metrics.jsonl, loss.png, export/hf
(transformers folder: scripts/05_evaluate.py student:... and replace:...) and export/st
(SentenceTransformer folder). Resumes from the latest checkpoint unless --no-resume/--overwrite.
"""

import argparse
import functools
import os
from pathlib import Path

from embdistill.artifacts import fingerprint, skip_if_done, write_manifest
from embdistill.cli import log, positive_int, run_main, setup_logging, stage_parser
from embdistill.distributed import cleanup, default_device, print0, resolve_device
from embdistill.errors import UserError
from embdistill.losses import SenseLoss
from embdistill.paths import Paths, base_dir
from embdistill.senses.dictionary import load_sense_dict
from embdistill.students import (TokenDistillation, build_student, default_student_layers,
                                 default_teacher_device, export_student)
from embdistill.tasks import resolve_task
from embdistill.teachers import load_teacher
from embdistill.texts import read_train_texts
from embdistill.training import Trainer, TrainConfig, add_training_args, join_process_group


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__)
    parser.add_argument("--teacher", default="minilm", help="teacher: alias, hub id or folder")
    parser.add_argument("--loss", choices=("sense", "mse"), default="sense",
                        help="sense: SKD's loss over the sense dictionary; mse: token states (ablation)")
    parser.add_argument("--run", default=None, help="run name under runs/<task>/ (default: skd, or mse)")
    parser.add_argument("--sense-dict", default=None,
                        help="sense dictionary (default: sense_dict/<task>/<teacher>.kmeanspkl)")
    parser.add_argument("--allow-teacher-mismatch", action="store_true",
                        help="accept a sense dictionary whose manifest names another teacher "
                        "(e.g. the same model under another name)")
    parser.add_argument("--student-layers", type=int, default=None,
                        help="teacher layers the student keeps (default: 4 for Llama, 2 for encoders)")
    parser.add_argument("--max-length", type=positive_int, default=512, help="max tokens per example")
    parser.add_argument("--teacher-device", default=None,
                        help="default: a spare GPU per process when there is one, else the student's")
    # The original's reference run (per process; lr is multiplied by the world size).
    add_training_args(parser, TrainConfig(), lr_help="learning rate per process (x world size)")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    setup_logging(args.log_level)
    try:
        return train(args)
    finally:
        cleanup()


def train(args: argparse.Namespace) -> int:
    run = args.run or ("skd" if args.loss == "sense" else "mse")
    if "/" in run or run in (".", ".."):
        raise UserError(f"bad run name '{run}': a folder name under runs/<task>/")
    task = resolve_task(args.task, args.text_column, args.label_column)
    env = join_process_group(args.dist_timeout)
    config = TrainConfig.from_args(args, lr_scale=env.world_size)
    device = default_device(env)
    teacher_device = resolve_device(args.teacher_device) if args.teacher_device else default_teacher_device(
        device, env, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    teacher = load_teacher(args.teacher, device=teacher_device)
    paths = Paths(base_dir(args.base_dir), task.slug, teacher.slug, run)
    examples = read_train_texts(paths)
    layers = args.student_layers or default_student_layers(teacher)
    max_length = min(args.max_length, teacher.max_seq_length)
    if max_length < args.max_length:
        log.info("--max-length %d is cut to the teacher's %d", args.max_length, max_length)

    sense_dict_path = None
    if args.loss == "sense":
        sense_dict_path = paths.sense_dict if args.sense_dict is None else Path(args.sense_dict)
        if not sense_dict_path.is_file():
            raise UserError(f"missing sense dictionary {sense_dict_path}: run scripts/03_cluster.py "
                            f"--task {args.task} --teacher {args.teacher} first, or pass --sense-dict")
    run_config = {
        "task": task.name, "teacher": teacher.name, "student_layers": layers, "loss": args.loss,
        "max_length": max_length, "train_texts": fingerprint(paths.train_json),
        "sense_dict": fingerprint(sense_dict_path) if sense_dict_path else None,
    }
    resolved = {"run": run_config, "train": vars(config) | {"world_size": env.world_size}}
    if skip_if_done(paths.export_dir, config=resolved, overwrite=args.overwrite, what="train"):
        return 0

    student = build_student(teacher, layers)
    sense_loss = None
    if sense_dict_path is not None:
        senses = load_sense_dict(sense_dict_path, hidden_size=teacher.hidden_size,
                                 teacher=None if args.allow_teacher_mismatch else teacher.slug)
        vocab_size = max(student.config.vocab_size, len(teacher.tokenizer))
        sense_loss = SenseLoss(senses, vocab_size).to(device)
        log.info("sense dictionary %s: %d tokens, %d senses", sense_dict_path, len(senses),
                 sense_loss.centroids.shape[0])
    log.info("student: %d of %d layers of %s, %.1fM parameters; %d examples, lr %.3g (%d processes)",
             layers, teacher.model.config.num_hidden_layers, teacher.name,
             sum(p.numel() for p in student.parameters()) / 1e6, len(examples), config.lr, env.world_size)

    trainer = Trainer(
        student, TokenDistillation(teacher, sense_loss), examples,
        functools.partial(teacher.tokenize, max_length=max_length), config, paths.run_dir,
        run_config=run_config, device=device, resume=args.resume and not args.overwrite,
    )
    result = trainer.train()
    if env.is_main:
        export_student(trainer.module, teacher.tokenizer, paths.export_dir,
                       normalize=teacher.normalize, max_seq_length=max_length)
        write_manifest(paths.export_dir, stage="train", config=resolved,
                       extra={"global_step": result.global_step, "metrics": result.metrics,
                              "teacher": teacher.slug})
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                        if k in ("loss", "sense_accuracy"))
    print0(f"train: {task.name} {run}: {result.global_step} steps ({metrics}) -> {paths.export_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
