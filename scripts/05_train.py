"""Stage 5: train the SKD student (the teacher's first layers) and export it; runs/<task>/<run>/.

    python scripts/05_train.py --task bbc-news                 # the default objective (pooled-mse)
    python scripts/05_train.py --task bbc-news --loss sense    # SKD, the paper's objective
    python scripts/05_train.py --task bbc-news --epochs 1 --max-steps 300 --max-length 128 --lr 2e-5
    ./run_train.sh bbc-news --loss sense --nproc_per_node 2 --max-steps 300  # targets, then torchrun, DDP
    python scripts/05_train.py --task bbc-news tweet-sentiment  # a task set: one student, runs/bbc-news+tweet-sentiment/

--loss picks the objective (embdistill/objectives/, STUDENT_OBJECTIVES; the default, pooled-mse,
won the quality study on four task families: BENCHMARKS.md): sense (SKD, the paper's) trains on
the stored sense targets of scripts/04_targets.py: no teacher runs; the loss scores senses by
the dictionary's rule (03_cluster.py --sense-rule) and leaves out tokens of a single sense
(their share is logged and kept in the export manifest). mse (the ablation) runs the frozen
teacher on the fly, on each example once while the states fit in --teacher-cache-gb (kept in
memory for later epochs). pooled-mse matches the student's sentence embedding (pooled and
normalised as export/st embeds) to the whole teacher's, computed once per text; sense-pooled adds
--sentence-weight times that term to the sense loss. Writes runs/<task>/<run>/:
config.json, checkpoints/ (and best.pt), metrics.jsonl, loss.png, selection.json, export/hf
(transformers folder: scripts/06_evaluate.py student:... and replace:...) and export/st
(SentenceTransformer folder; a task set's student has one prompt per member task, under the
task's name as mteb passes it), with the objective's extras (sense: export/st-replace). Resumes from the latest checkpoint unless --no-resume/--overwrite.

Validation (embdistill/validation.py): --val-fraction of the texts (at most 256; none when that
is fewer than 8: pass --val-texts) are held out, seeded by --seed, never trained on; the student
is scored on them at step 0 and every --val-every steps, and the export holds the best validated
step by --keep-best (the untrained student when training never beats it).

--recipe sets the training loop's defaults (options given explicitly win): measured (the
default: 2 epochs of batch 16 per process, lr 3e-4 x world size, 10 warm-up steps, cosine decay;
the recipe study in BENCHMARKS.md) or paper (the SKD paper's reference run: 5 epochs, batch 3,
lr 5e-6 x world size, 300 warm-up steps).
"""

import argparse

import torch
from torch import nn

from embdistill.artifacts import fingerprint, skip_if_done, write_manifest
from embdistill.cli import (bounded_float, log, non_negative_int, positive_int, run_main, setup_logging,
                            stage_parser)
from embdistill.distributed import DEVICE_HELP, bind_device, cleanup, dist_env, init_distributed, print0, resolve_device
from embdistill.input_format import MaxLength
from embdistill.objectives import DEFAULT_OBJECTIVE, STUDENT_OBJECTIVES, StudentObjective, StudentRun
from embdistill.paths import Paths, base_dir, check_run_name
from embdistill.students import build_student, default_student_layers, export_student
from embdistill.tasks import resolve_task_set
from embdistill.teachers import load_tokenizer, sentence_embedding
from embdistill.texts import instruction_of, read_train_texts, task_instructions, texts_inputs
from embdistill.train_config import (DEFAULT_RECIPE, STUDENT_RECIPES, TrainConfig, add_training_args, recipe_arg,
                                     recipe_of, resolved_config)
from embdistill.training import Trainer, to_device
from embdistill.validation import (BEST_NAME, CheckpointSelection, Validation, ValidationHook, add_selection_arg,
                                   evaluate_loss, indices_digest, validation_split, write_selection)

VALIDATION_TEXTS_CAP = 256  # --val-fraction's: each validation costs a forward pass over them
FRACTION_MIN_TEXTS = 8  # fewer: a rank correlation over < 28 pairs picks checkpoints by noise
VALIDATIONS_PER_EPOCH = 4  # --val-every 0


def build_parser(recipe: str = DEFAULT_RECIPE) -> argparse.ArgumentParser:
    """The stage's options; the training loop's defaults are ``recipe``'s (STUDENT_RECIPES)."""
    parser = stage_parser(__doc__, task_set=True)
    parser.add_argument("--teacher", default="minilm", help="teacher: alias, hub id or folder")
    parser.add_argument("--loss", choices=tuple(STUDENT_OBJECTIVES), default=DEFAULT_OBJECTIVE,
                        help=f"the objective (default {DEFAULT_OBJECTIVE}, by the quality study in BENCHMARKS.md): "
                        "sense: SKD's loss over the sense dictionary (the paper's); mse: token states (ablation); "
                        "pooled-mse: the pooled sentence embedding; sense-pooled: sense + --sentence-weight x "
                        "pooled-mse")
    parser.add_argument("--run", default=None, help="run name under runs/<task>/ (default: the objective's, "
                        "skd, mse, pooled-mse, skd-pooled)")
    parser.add_argument("--student-layers", type=positive_int, default=None,
                        help="teacher layers the student keeps (default: 4 for Llama, 2 for encoders)")
    parser.add_argument("--max-length", type=positive_int, default=512,
                        help="max tokens per example, cut to the teacher's own limit (MiniLM: 256)")
    parser.add_argument("--device", default=None, help="the student's: " + DEVICE_HELP)
    for objective in STUDENT_OBJECTIVES.values():
        objective.add_args(parser)
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
    recipe_arg(parser, recipe)
    add_training_args(parser, STUDENT_RECIPES[recipe], lr_help="learning rate per process (x world size)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(recipe_of(argv)).parse_args(argv)
    setup_logging(args.log_level)
    try:
        return train(args)
    finally:
        cleanup()


class _ReplayedStudent(nn.Module):
    """The student in the validation loss: the output the embedding pass computed for the same
    held-out batch (the same input tensors), so that both scores come from one forward pass."""

    def __init__(self, outputs: dict[int, tuple]):
        super().__init__()
        self.outputs = outputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        kept = self.outputs.get(id(input_ids))
        if kept is None or kept[0] is not input_ids or kept[1] is not attention_mask:
            raise RuntimeError("the validation loss ran on a batch that the embedding pass did not")
        return kept[2]


def stage_validation(run: StudentRun, objective: StudentObjective, val_examples: list[str],
                     val_batches: list[dict]) -> Validation:
    """The student's scores on the held-out examples (``val_batches``, collated by the
    objective): its pooled embeddings as export/st computes them (the text tokens mean-pooled,
    normalised as the teacher), against the whole teacher's, computed once here, and the
    objective's loss on the same forward pass (:class:`_ReplayedStudent`; a second pass took
    half of each validation)."""
    args = run.args
    whole = objective.reference_teacher(run)
    teacher_embeddings = whole.encode(val_examples, batch_size=args.batch_size, max_length=run.max_length)
    normalize = objective.teacher.normalize
    outputs: dict[int, tuple] = {}  # id(input_ids) -> (input_ids, attention_mask, the student's output)

    def embed(model: nn.Module) -> torch.Tensor:
        outputs.clear()
        pooled = []
        for batch in val_batches:
            output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            outputs[id(batch["input_ids"])] = (batch["input_ids"], batch["attention_mask"], output)
            pooled.append(sentence_embedding(output.last_hidden_state, batch["embed_mask"], normalize))
        return torch.cat(pooled)

    def loss(model: nn.Module) -> dict[str, float]:
        try:
            return evaluate_loss(_ReplayedStudent(outputs), objective, val_batches)
        finally:
            outputs.clear()

    return Validation(embed, {objective.teacher.slug: teacher_embeddings}, loss)


def train(args: argparse.Namespace) -> int:
    objective_class = STUDENT_OBJECTIVES[args.loss]
    run_name = check_run_name(args.run or objective_class.run_name, "runs/<task>/")
    task = resolve_task_set(args.task, args.text_column, args.label_column)
    device = bind_device(resolve_device(args.device, dist_env()))  # before NCCL joins on it
    env = init_distributed(timeout_s=args.dist_timeout)
    config = TrainConfig.from_args(args, lr_scale=env.world_size)
    tokenizer = load_tokenizer(args.teacher)
    paths = Paths(base_dir(args.base_dir), task.slug, tokenizer.slug, run_name, task.member_slugs)
    examples = read_train_texts(paths)
    length = MaxLength.of(args.max_length, tokenizer.max_seq_length)
    max_length = length.used
    if max_length < args.max_length:
        log.info("--max-length %d is cut to the teacher's %d", args.max_length, max_length)
    run = StudentRun(args, paths, tokenizer, examples, length,
                     args.student_layers or default_student_layers(tokenizer.model_type), device, env)

    inputs = objective_class.inputs(run)
    train_index, val_index = validation_split(len(examples), args.val_fraction, args.seed, count=args.val_texts,
                                              cap=VALIDATION_TEXTS_CAP, min_texts=FRACTION_MIN_TEXTS)
    criterion = args.keep_best if len(val_index) else "last"
    run_config = {
        "task": task.name, "teacher": tokenizer.name, "input_format": tokenizer.input_format.name,
        "student_layers": run.layers, "loss": args.loss, "max_length": max_length,
        "texts": {name: fingerprint(path) for name, path in texts_inputs(paths).items()} if paths.members
        else fingerprint(paths.train_json),  # (one task's as recorded before task sets)
        **objective_class.identity(run, inputs),
        "validation": {"texts": len(val_index), "seed": args.seed, "indices_sha256": indices_digest(val_index),
                       "every": args.val_every, "keep_best": criterion},
    }
    resolved = resolved_config(run_config, config, env.world_size) | objective_class.export_identity(run)
    if skip_if_done(paths.export_dir, config=resolved, overwrite=args.overwrite, what="train"):
        return 0

    objective = objective_class.build(run, inputs)
    student = build_student(objective.teacher, run.layers).to(device)
    normalize = objective.teacher.normalize
    selection = CheckpointSelection(criterion, paths.checkpoint_dir / BEST_NAME if env.is_main else None)
    hook = None
    if len(val_index) and env.is_main:
        val_batches = [to_device(objective.collate(ids), device) for ids in
                       (val_index[i : i + args.batch_size].tolist() for i in range(0, len(val_index), args.batch_size))]
        validation = stage_validation(run, objective, [examples[i] for i in val_index], val_batches)
        hook = ValidationHook(validation, selection, args.val_every)
    objective.release_teacher()  # the student has its own copy of the layers
    log.info("student: the first %d layers of %s, %.1fM parameters; %d examples (%d held out for validation), "
             "lr %.3g (%d processes)", run.layers, tokenizer.name, sum(p.numel() for p in student.parameters()) / 1e6,
             len(train_index), len(val_index), config.lr, env.world_size)

    trainer = Trainer(student, objective, train_index.tolist(), objective.collate, config, paths.run_dir,
                      run_config=run_config, device=device, resume=args.resume and not args.overwrite,
                      on_step_end=hook, caller_state=selection)
    if hook is not None:
        hook.val_every = args.val_every or max(1, trainer.steps_per_epoch // VALIDATIONS_PER_EPOCH)
    result = trainer.train()
    kept = result.global_step
    metrics = {**result.metrics, **objective.data_metrics}
    if env.is_main:
        kept = selection.restore_kept(trainer.module, result.global_step)
        export_student(trainer.module, tokenizer.tokenizer, paths.export_dir, normalize=normalize,
                       max_seq_length=max_length, input_format=tokenizer.input_format,
                       instruction=task_instructions(paths) if paths.members else instruction_of(examples),
                       **objective.export_extras())
        summary = selection.summary(kept, result.global_step, run_config["validation"] | {
            "every": hook.val_every if hook else None, "indices": val_index.tolist()})
        write_selection(summary, paths.run_dir)
        write_manifest(paths.export_dir, stage="train", config=resolved,
                       extra={"global_step": result.global_step, "metrics": metrics, "teacher": tokenizer.slug,
                              "selection": {k: summary[k] for k in ("criterion", "kept_step", "kept_score")}})
    objective.report()
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", *objective_class.summary_metrics) if k in metrics)
    print0(f"train: {task.name} {run_name}: {result.global_step} steps ({shown}), exported step {kept} "
           f"({criterion}) -> {paths.export_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
