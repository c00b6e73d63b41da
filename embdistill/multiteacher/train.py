"""Stage 11: a student trained on the teachers' embeddings, then exported
(scripts/11_train_multiteacher.py).

    targets (shards) -> per-teacher statistics (standardisation) -> student + heads
    -> initial/ (the student before distillation) -> heads fitted on cached embeddings
    -> Trainer (probe metrics, validation at step 0 and every --val-every steps, the kept step
    by --keep-best) -> validation.json, selection.json, export/ (the kept step's student)

:func:`export_checkpoint` exports the student of one of the run's checkpoints as export/ is
(to follow a quality along training).

What identifies a run (:func:`run_identity`) is recorded in config.json, every checkpoint and
the export's manifest: a resumed run must match it, and a finished one is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from ..artifacts import fingerprint, is_done, save_json, skip_if_done, write_manifest
from ..distributed import DistEnv, cleanup, default_device, init_distributed, print0
from ..errors import UserError
from ..input_format import effective_max_length
from ..paths import HF_FOLDER, Paths, base_dir, check_run_name, slug
from ..students import build_student, export_student
from ..teachers import load_teacher, load_tokenizer
from ..train_config import TrainConfig, resolved_config
from ..training import Trainer, to_device
from ..validation import (BEST_NAME, STRUCTURE_TEXTS, CheckpointSelection, Validation, ValidationHook,
                          evaluate_loss, validation_split, write_selection)
from .corpus import corpus_name, read_corpus
from ..objectives import MULTITEACHER_OBJECTIVES, MultiTeacherObjective, objective_named
from .model import Collator, DistillationDataset, MultiTeacherStudent, batches, targets_kind
from .monitor import PROBE_TEXTS, TrainingMonitor
from .shards import INDEX_NAME, TeacherTargets, load_teacher_targets, target_statistics
from .warmup import fit_heads

log = logging.getLogger("embdistill.multiteacher.train")

TargetStats = dict[str, tuple[np.ndarray, np.ndarray]]


def stats_record(stats: TargetStats | None) -> dict | None:
    """What config.json records of the statistics: per teacher, a digest of the exact values
    (a resumed run that computes others is refused) and two readable summaries."""
    if stats is None:
        return None
    return {name: {"sha256": hashlib.sha256(mean.tobytes() + std.tobytes()).hexdigest()[:16],
                   "mean_of_means": round(float(mean.mean()), 6), "mean_of_stds": round(float(std.mean()), 6)}
            for name, (mean, std) in stats.items()}


def run_identity(args: argparse.Namespace, paths: Paths, folders: dict[str, Path],
                 stats: TargetStats | None, max_length: int) -> dict:
    """Every input and option that changes what the run computes (besides TrainConfig's);
    ``max_length``: the tokens per text the student reads (--max-length cut to its limit)."""
    return {
        "corpus": paths.task, "corpus_texts": fingerprint(paths.corpus_file),
        "teachers": {name: fingerprint(folder / INDEX_NAME) for name, folder in folders.items()},
        "student": args.student, "student_layers": args.student_layers, "pooling": args.pooling,
        "loss": args.loss, "normalize_by_dim": args.normalize_by_dim, "max_length": max_length,
        "val_fraction": args.val_fraction, "standardize": args.standardize,
        "target_stats": stats_record(stats), "heads": MULTITEACHER_OBJECTIVES[args.loss].heads(args),
        "head_layers": args.head_layers,
        "head_lr": args.head_lr, "head_warmup_steps": args.head_warmup_steps,
        "export_normalize": args.export_normalize, "keep_best": args.keep_best if args.val_fraction else "last",
    }


def check_options(args: argparse.Namespace) -> str:
    """One-line errors for bad values; the run's name. Resolves --standardize's default (the
    objective's ``standardizes_targets``), so that config.json records what the run does."""
    if args.student_layers < 0:  # --max-length is checked by its parser type
        raise UserError("--student-layers must be at least 0")
    if args.head_warmup_steps < 0 or args.val_every < 0:
        raise UserError("--head-warmup-steps and --val-every must not be negative")
    if not args.head_lr >= 0:
        raise UserError(f"--head-lr must not be negative, got {args.head_lr}")
    args.standardize = objective_named(MULTITEACHER_OBJECTIVES, args.loss).standardizes(args.standardize)
    return check_run_name(args.run or f"mt-{args.loss}", "runs/<corpus>/")


def train_student(args: argparse.Namespace) -> None:
    """The whole stage, from the script's options; every rank calls it."""
    run = check_options(args)
    paths = Paths(base_dir(args.base_dir), corpus_name(args), run=run)
    texts = read_corpus(paths)
    teachers = list(dict.fromkeys(slug(t) for t in args.teachers))
    folders = {name: paths.embeddings_dir(name) for name in teachers}
    targets = [load_teacher_targets(folder, texts) for folder in folders.values()]
    train_index, val_index = validation_split(len(texts), args.val_fraction, args.seed)
    stats = ({t.name: target_statistics(t, train_index) for t in targets} if args.standardize else None)

    env = init_distributed(timeout_s=args.dist_timeout)
    config = TrainConfig.from_args(args)
    max_length = effective_max_length(args.max_length, load_tokenizer(args.student).max_seq_length)
    run_config = run_identity(args, paths, folders, stats, max_length)
    resolved = resolved_config(run_config, config, env.world_size)
    if skip_if_done(paths.export_dir, config=resolved, overwrite=args.overwrite, what="train"):
        return

    device = default_device(env)
    source = load_teacher(args.student, device=device)
    objective = MULTITEACHER_OBJECTIVES[args.loss]
    encoder = build_student(source, args.student_layers or source.model.config.num_hidden_layers)
    torch.manual_seed(args.seed)  # the heads' initialisation: reruns and resumed runs agree
    model = MultiTeacherStudent(encoder, {t.name: t.dim for t in targets}, args.pooling,
                                heads=objective.heads(args), head_layers=args.head_layers, target_stats=stats)
    export_initial(model, source.tokenizer, paths, run_config, args, env)

    loss_fn = objective(args.normalize_by_dim)
    collator = Collator(source.tokenizer, teachers, max_length)
    train_set = split_dataset(texts, targets, train_index)
    val_set = split_dataset(texts, targets, val_index) if len(val_index) else None
    selection = CheckpointSelection(run_config["keep_best"], paths.checkpoint_dir / BEST_NAME if env.is_main else None)
    hook = None
    if val_set and env.is_main:
        validation = student_validation(val_set, collator, loss_fn, args.batch_size, device,
                                        normalize=args.export_normalize)
        hook = ValidationHook(validation, selection, args.val_every)
    probe_source = val_set or train_set
    probe = to_device(collator(probe_source.items(range(min(PROBE_TEXTS, len(probe_source))))), device)
    monitor = TrainingMonitor(probe, config.log_every, hook)
    log.info("student: %d layers of %s (%s pooling), %.1fM parameters with heads; %d training texts, "
             "%d validation texts, teachers %s, loss %s, targets %s", encoder.config.num_hidden_layers,
             args.student, args.pooling, sum(p.numel() for p in model.parameters()) / 1e6, len(train_index),
             len(val_index), ", ".join(f"{t.name} ({t.dim}-d)" for t in targets), args.loss,
             targets_kind(args.standardize))

    def warm_up(module: MultiTeacherStudent) -> None:
        summary = fit_heads(module, train_set, collator, loss_fn, steps=args.head_warmup_steps,
                            batch_size=args.batch_size,
                            texts_per_step=args.batch_size * args.grad_accum * env.world_size, lr=args.head_lr,
                            weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                            seed=args.seed, device=device, env=env)
        if env.is_main:
            save_json(summary, paths.run_dir / "head_warmup.json")

    trainer = Trainer(model, loss_fn, train_set, collator, config, paths.run_dir, run_config=run_config,
                      device=device, resume=args.resume and not args.overwrite,
                      param_groups=model.param_groups(config.lr, args.head_lr),
                      on_fresh_start=warm_up if args.head_warmup_steps else None, on_step_end=monitor,
                      caller_state=selection)
    result = trainer.train()
    if env.is_main:
        validation = final_validation(selection, result.global_step, len(val_index))
        save_json(validation, paths.run_dir / "validation.json")
        kept = selection.restore_kept(trainer.module, result.global_step)
        summary = selection.summary(kept, result.global_step, {
            "texts": len(val_index), "fraction": args.val_fraction, "seed": args.seed, "every": args.val_every})
        export(trainer.module.encoder, source.tokenizer, paths.export_dir, run_config)
        write_selection(summary, paths.run_dir)
        write_manifest(paths.export_dir, stage="train_multiteacher", config=resolved,
                       extra={"global_step": result.global_step, "train_metrics": result.metrics,
                              "validation": validation,
                              "selection": {k: summary[k] for k in ("criterion", "kept_step", "kept_score")}})
    print0(f"train: {paths.task} {run} ({args.loss}, {targets_kind(args.standardize)} targets): "
           f"{result.global_step} steps, train loss "
           f"{result.metrics.get('loss', float('nan')):.4f} -> {paths.export_dir}")
    cleanup()


def split_dataset(texts: list[str], targets: list[TeacherTargets], indices: np.ndarray) -> DistillationDataset:
    return DistillationDataset([texts[i] for i in indices], [t.subset(indices) for t in targets])


def student_validation(val_set: DistillationDataset, collator: Collator, loss_fn: MultiTeacherObjective,
                       batch_size: int, device: torch.device, normalize: bool) -> Validation:
    """The student's scores on the validation split: its loss there, and the agreement of its
    embeddings (as the export pools and normalises them) with each teacher's stored vectors on
    the first STRUCTURE_TEXTS texts."""
    structure = range(min(len(val_set), STRUCTURE_TEXTS))

    def embed(model: MultiTeacherStudent) -> torch.Tensor:
        embedding = torch.cat([model.embed(batch["input_ids"], batch["attention_mask"]).float()
                               for batch in batches(val_set, collator, batch_size, device, structure)])
        return torch.nn.functional.normalize(embedding, dim=-1) if normalize else embedding

    return Validation(embed, val_set.target_rows(structure),
                      lambda model: evaluate_loss(model, loss_fn, batches(val_set, collator, batch_size, device)))


def final_validation(selection: CheckpointSelection, step: int, n_texts: int) -> dict:
    """validation.json: the scores on the validation split after the last step (always
    validated; restored with the selection when the run resumed at its end)."""
    validation = {"global_step": step, "texts": n_texts}
    if not selection.history:
        return validation
    measured = {k: v for k, v in selection.history[-1].items() if k != "step"}
    log.info("validation loss %.4f on %d held-out texts", measured["loss"], n_texts)
    return validation | measured


def export_initial(model: MultiTeacherStudent, tokenizer, paths: Paths, run_config: dict,
                   args: argparse.Namespace, env: DistEnv) -> None:
    """initial/: the student before distillation, exported as the trained one will be (rank 0,
    once per student and export settings)."""
    initial_dir = paths.initial_dir
    config = {k: run_config[k] for k in ("student", "student_layers", "pooling", "max_length", "export_normalize")}
    if env.is_main and (args.overwrite or not is_done(initial_dir, config=config)):
        export(model.encoder, tokenizer, initial_dir, run_config)
        write_manifest(initial_dir, stage="train_multiteacher", config=config)


def export(encoder: torch.nn.Module, tokenizer, out_dir: Path, run_config: dict) -> None:
    """The encoder alone (the heads only serve training), as hf/ and st/, with the run's
    pooling, max length and normalisation (``run_config``: :func:`run_identity`)."""
    export_student(encoder, tokenizer, out_dir, normalize=run_config["export_normalize"],
                   max_seq_length=run_config["max_length"], pooling=run_config["pooling"])


def export_checkpoint(checkpoint: Path, out_dir: Path) -> Path:
    """The student of ``runs/<corpus>/<run>/checkpoints/step-N.pt`` exported to ``out_dir``
    (hf/ and st/) as the run's export/ is: the checkpoint's encoder weights in the run's
    initial/hf (the same architecture and tokenizer, before distillation), with the run's
    export settings, which the checkpoint records. Returns ``out_dir``."""
    from transformers import AutoModel, AutoTokenizer

    initial = Paths.initial_of_checkpoint(checkpoint) / HF_FOLDER
    if not initial.is_dir():
        raise UserError(f"{checkpoint}: no {initial} beside it (not a stage 11 run?)")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    prefix = "encoder."
    encoder = AutoModel.from_pretrained(initial, dtype=torch.float32)
    encoder.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)})
    export(encoder, AutoTokenizer.from_pretrained(initial), Path(out_dir), state["config"]["run"])
    return Path(out_dir)
