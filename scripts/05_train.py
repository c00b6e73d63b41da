"""Stage 5: train the SKD student (the teacher's first layers) and export it; runs/<task>/<run>/.

    python scripts/05_train.py --task bbc-news                 # the paper's settings
    python scripts/05_train.py --task bbc-news --epochs 1 --max-steps 300 --max-length 128 --lr 2e-5
    ./run_train.sh bbc-news --nproc_per_node 2 --max-steps 300  # targets, then torchrun, DDP

--loss sense (SKD) trains on the stored sense targets of scripts/04_targets.py: no teacher runs;
the loss scores senses by the dictionary's rule (03_cluster.py --sense-rule) and leaves out
tokens of a single sense (their share is logged and kept in the export manifest).
--loss mse (the ablation) runs the frozen teacher on the fly, on each example once while the
states fit in --teacher-cache-gb (kept in memory for later epochs). Writes runs/<task>/<run>/:
config.json, checkpoints/ (and best.pt), metrics.jsonl, loss.png, selection.json, export/hf
(transformers folder: scripts/06_evaluate.py student:... and replace:...) and export/st
(SentenceTransformer folder). Resumes from the latest checkpoint unless --no-resume/--overwrite.

Validation (embdistill/validation.py): --val-fraction of the texts (at most 256; none when that
is fewer than 8: pass --val-texts) are held out, seeded by --seed, never trained on; the student
is scored on them at step 0 and every --val-every steps, and the export holds the best validated
step by --keep-best (the untrained student when training never beats it).
"""

import argparse
from pathlib import Path

import torch

from embdistill.artifacts import fingerprint, skip_if_done, write_manifest
from embdistill.cli import (bounded_float, log, non_negative_float, non_negative_int, positive_int, run_main,
                            setup_logging, stage_parser)
from embdistill.distributed import (DEVICE_HELP, DistEnv, bind_device, cleanup, dist_env, init_distributed,
                                    print0, resolve_device)
from embdistill.errors import UserError
from embdistill.input_format import MaxLength
from embdistill.paths import Paths, base_dir, check_run_name
from embdistill.senses.dictionary import SenseDictionary
from embdistill.senses.targets import TargetCollator, TargetsConfig, load_targets, single_sense_count
from embdistill.students import (SenseDistillation, StateMatching, build_student, default_student_layers,
                                 default_teacher_device, example_collator, export_student)
from embdistill.tasks import resolve_task
from embdistill.teachers import load_teacher, load_tokenizer
from embdistill.texts import instruction_of, read_train_texts
from embdistill.teachers import mean_pool
from embdistill.training import Trainer, TrainConfig, add_training_args, resolved_config, to_device
from embdistill.validation import (BEST_NAME, CheckpointSelection, Validation, ValidationHook, add_selection_arg,
                                   evaluate_loss, indices_digest, validation_split, write_selection)

VALIDATION_TEXTS_CAP = 256  # --val-fraction's: each validation costs a forward pass over them
FRACTION_MIN_TEXTS = 8  # fewer: a rank correlation over < 28 pairs picks checkpoints by noise
VALIDATIONS_PER_EPOCH = 4  # --val-every 0


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
    parser.add_argument("--targets", default=None,
                        help="sense targets of scripts/04_targets.py (default: work/<task>/<teacher>/targets.npz)")
    parser.add_argument("--student-layers", type=positive_int, default=None,
                        help="teacher layers the student keeps (default: 4 for Llama, 2 for encoders)")
    parser.add_argument("--max-length", type=positive_int, default=512,
                        help="max tokens per example, cut to the teacher's own limit (MiniLM: 256)")
    parser.add_argument("--allow-max-length-mismatch", action="store_true",
                        help="use a dictionary gathered with another --max-length")
    parser.add_argument("--export-replace", action=argparse.BooleanOptionalAction, default=True,
                        help="sense loss: also export/st-replace, the student in replace mode")
    parser.add_argument("--device", default=None, help="the student's: " + DEVICE_HELP)
    parser.add_argument("--teacher-device", default=None,
                        help="mse: default and cuda: a spare GPU per process (cuda:LOCAL_RANK + LOCAL_WORLD_SIZE) "
                        "when the node has one, else the student's (default) or this process's GPU (cuda); "
                        "otherwise as --device")
    parser.add_argument("--teacher-cache-gb", type=non_negative_float, default=4.0,
                        help="mse: keep each example's teacher states in memory after its first batch, up "
                        "to this many GB per machine (split between its processes); the teacher runs only "
                        "on examples not kept; 0: none")
    group = parser.add_argument_group("validation and the kept checkpoint")
    group.add_argument("--val-fraction", type=bounded_float(0, 1), default=0.05,
                       help=f"share of the texts held out for validation (at most {VALIDATION_TEXTS_CAP}; none "
                       f"when that is fewer than {FRACTION_MIN_TEXTS}); 0: no validation, the last step is exported")
    group.add_argument("--val-texts", type=non_negative_int, default=None,
                       help="hold out exactly this many texts instead (0: none)")
    group.add_argument("--val-every", type=non_negative_int, default=0,
                       help=f"steps between validations (also at step 0 and the last step; 0: "
                       f"{VALIDATIONS_PER_EPOCH} per epoch)")
    add_selection_arg(group)
    # The original's reference run (per process; lr is multiplied by the world size).
    add_training_args(parser, TrainConfig(), lr_help="learning rate per process (x world size)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return train(args)
    finally:
        cleanup()


def resolve_teacher_device(arg: str | None, student_device, env: DistEnv):
    """--teacher-device: None and ``cuda`` give the teacher a spare GPU of its own when the node
    has one per process; None falls back to the student's device, ``cuda`` to this process's
    GPU; anything else reads as --device does."""
    if arg is None:
        return default_teacher_device(student_device, env, env.local_world_size)
    if arg == "cuda":
        return default_teacher_device(resolve_device("cuda", env), env, env.local_world_size)
    return resolve_device(arg, env)


def stage_validation(args: argparse.Namespace, teacher, tokenizer, val_examples: list[str], max_length: int,
                     device, loss) -> Validation:
    """The student's scores on the held-out examples: its pooled embeddings as export/st
    computes them (the text tokens mean-pooled, normalised as the teacher), against the whole
    teacher's, computed once here."""
    whole = teacher if args.loss == "mse" else load_teacher(args.teacher, device="cpu", dtype=torch.float32)
    teacher_embeddings = whole.encode(val_examples, batch_size=args.batch_size, max_length=max_length)
    normalize = teacher.normalize
    batches = [tokenizer.tokenize(val_examples[i : i + args.batch_size], max_length)
               for i in range(0, len(val_examples), args.batch_size)]

    def embed(model: torch.nn.Module) -> torch.Tensor:
        pooled = []
        for batch in batches:
            states = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).last_hidden_state
            pooled.append(mean_pool(states, batch["embed_mask"]))
        embedding = torch.cat(pooled)
        return torch.nn.functional.normalize(embedding, dim=-1) if normalize else embedding

    return Validation(embed, {teacher.slug: teacher_embeddings}, loss)


def train(args: argparse.Namespace) -> int:
    run = check_run_name(args.run or ("skd" if args.loss == "sense" else "mse"), "runs/<task>/")
    task = resolve_task(args.task, args.text_column, args.label_column)
    device = bind_device(resolve_device(args.device, dist_env()))  # before NCCL joins on it
    env = init_distributed(timeout_s=args.dist_timeout)
    config = TrainConfig.from_args(args, lr_scale=env.world_size)
    tokenizer = load_tokenizer(args.teacher)
    paths = Paths(base_dir(args.base_dir), task.slug, tokenizer.slug, run)
    examples = read_train_texts(paths)
    length = MaxLength.of(args.max_length, tokenizer.max_seq_length)
    max_length = length.used
    if max_length < args.max_length:
        log.info("--max-length %d is cut to the teacher's %d", args.max_length, max_length)

    inputs = {"texts": paths.train_json}
    if args.loss == "sense":
        inputs["sense_dict"] = paths.sense_dict if args.sense_dict is None else Path(args.sense_dict)
        inputs["targets"] = paths.targets if args.targets is None else Path(args.targets)
        if not inputs["sense_dict"].is_file():
            raise UserError(f"missing sense dictionary {inputs['sense_dict']}: run run_sep_cluster.sh "
                            f"{args.task} --teacher {args.teacher} first, or pass --sense-dict")
        dictionary = SenseDictionary.open(inputs["sense_dict"])
        dictionary.check_gathered_with(length, tokenizer.input_format.name, args.allow_max_length_mismatch)
        targets_config = TargetsConfig.of(tokenizer, max_length, dictionary)
        if not inputs["targets"].is_file():
            raise UserError(f"missing sense targets {inputs['targets']}: run scripts/04_targets.py "
                            f"--task {args.task} --teacher {args.teacher} first (run_train.sh does)")
    layers = args.student_layers or default_student_layers(tokenizer.model_type)
    train_index, val_index = validation_split(len(examples), args.val_fraction, args.seed, count=args.val_texts,
                                              cap=VALIDATION_TEXTS_CAP, min_texts=FRACTION_MIN_TEXTS)
    criterion = args.keep_best if len(val_index) else "last"
    run_config = {
        "task": task.name, "teacher": tokenizer.name, "input_format": tokenizer.input_format.name,
        "student_layers": layers, "loss": args.loss, "max_length": max_length,
        **{key: fingerprint(path) for key, path in inputs.items() if key != "sense_dict"},
        "validation": {"texts": len(val_index), "seed": args.seed, "indices_sha256": indices_digest(val_index),
                       "every": args.val_every, "keep_best": criterion},
    }
    if args.loss == "sense":  # its manifest too (the sense rule is not in the pickle): what replace mode binds to
        run_config["sense_dict"] = dictionary.identity
    resolved = resolved_config(run_config, config, env.world_size) | {
        "export_replace": args.loss == "sense" and args.export_replace}
    if skip_if_done(paths.export_dir, config=resolved, overwrite=args.overwrite, what="train"):
        return 0

    target_stats = {}
    if args.loss == "sense":
        # the teacher only gives the student its first layers: those alone, on the CPU
        teacher = load_teacher(args.teacher, device="cpu", dtype=torch.float32, layers=layers)
        senses = dictionary.packed(teacher.vocab_size, hidden_size=teacher.hidden_size,
                                   teacher=None if args.allow_teacher_mismatch else teacher.slug).to(device)
        stored = load_targets(inputs["targets"], targets_config,
                              {"sense_dict": inputs["sense_dict"], "texts": paths.train_json}, senses, len(examples))
        single, scored, target_stats["single_sense_share"] = single_sense_count(stored.token_ids, stored.targets,
                                                                                senses)
        log.info("sense dictionary %s: %d tokens, %d senses, sense rule %s; targets %s: %d of %d scored "
                 "tokens have a single sense and are left out of the loss", inputs["sense_dict"],
                 len(senses.sizes), len(senses.centroids), senses.rule, inputs["targets"], single, scored)
        loss_fn, collate = SenseDistillation(senses), TargetCollator(tokenizer.tokenize, examples, stored, max_length)
    else:
        teacher = load_teacher(args.teacher, device=resolve_teacher_device(args.teacher_device, device, env))
        # the budget is the machine's: its processes share it
        loss_fn = StateMatching(teacher, cache_bytes=int(args.teacher_cache_gb * 2**30 / env.local_world_size))
        collate = example_collator(tokenizer.tokenize, examples, max_length)
    student = build_student(teacher, layers).to(device)
    normalize = teacher.normalize
    selection = CheckpointSelection(criterion, paths.checkpoint_dir / BEST_NAME if env.is_main else None)
    hook = None
    if len(val_index) and env.is_main:
        val_batches = [to_device(collate(ids), device) for ids in
                       (val_index[i : i + args.batch_size].tolist() for i in range(0, len(val_index), args.batch_size))]
        validation = stage_validation(args, teacher, tokenizer, [examples[i] for i in val_index], max_length,
                                      device, lambda model: evaluate_loss(model, loss_fn, val_batches))
        hook = ValidationHook(validation, selection, args.val_every)
    if args.loss == "sense":
        del teacher  # the student has its own copy of the layers; nothing else is needed
    log.info("student: the first %d layers of %s, %.1fM parameters; %d examples (%d held out for validation), "
             "lr %.3g (%d processes)", layers, tokenizer.name, sum(p.numel() for p in student.parameters()) / 1e6,
             len(train_index), len(val_index), config.lr, env.world_size)

    trainer = Trainer(student, loss_fn, train_index.tolist(), collate, config, paths.run_dir,
                      run_config=run_config, device=device, resume=args.resume and not args.overwrite,
                      on_step_end=hook, caller_state=selection)
    if hook is not None:
        hook.val_every = args.val_every or max(1, trainer.steps_per_epoch // VALIDATIONS_PER_EPOCH)
    result = trainer.train()
    kept = result.global_step
    if env.is_main:
        kept = selection.restore_kept(trainer.module, result.global_step)
        export_student(trainer.module, tokenizer.tokenizer, paths.export_dir, normalize=normalize,
                       max_seq_length=max_length, input_format=tokenizer.input_format,
                       instruction=instruction_of(examples),
                       senses=senses if args.loss == "sense" and args.export_replace else None)
        summary = selection.summary(kept, result.global_step, run_config["validation"] | {
            "every": hook.val_every if hook else None, "indices": val_index.tolist()})
        write_selection(summary, paths.run_dir)
        write_manifest(paths.export_dir, stage="train", config=resolved,
                       extra={"global_step": result.global_step, "metrics": {**result.metrics, **target_stats},
                              "teacher": tokenizer.slug,
                              "selection": {k: summary[k] for k in ("criterion", "kept_step", "kept_score")}})
    if args.loss == "mse":
        log.info("teacher states kept in memory: %d of %d examples (%.0f MB); the teacher ran on %d examples",
                 len(loss_fn.kept), len(examples), loss_fn.kept_bytes / 2**20, loss_fn.teacher_examples)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in {**result.metrics, **target_stats}.items()
                        if k in ("loss", "sense_accuracy", "single_sense_share"))
    print0(f"train: {task.name} {run}: {result.global_step} steps ({metrics}), exported step {kept} "
           f"({criterion}) -> {paths.export_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
