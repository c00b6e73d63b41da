"""Stage 4: SKD's sense targets of the training texts, computed once (work/<task>/<teacher>/targets.npz).

    python scripts/04_targets.py --task bbc-news
    torchrun --nproc_per_node 6 scripts/04_targets.py --task 14 --teacher llm2vec-llama3-8b
    python scripts/04_targets.py --task bbc-news tweet-sentiment   # a task set: its members' texts

For every text token, the teacher's sense in the dictionary under the rule the dictionary
records (03_cluster.py --sense-rule; dot when none), or -1 (no entry), so that
training (scripts/05_train.py --loss sense) runs no teacher. Ranks share the texts; a killed
run resumes from its finished parts when started again with the same options.
"""

from dataclasses import asdict
from pathlib import Path

from embdistill.artifacts import skip_if_done
from embdistill.cli import log, positive_float, positive_int, run_main, setup_logging, stage_parser
from embdistill.distributed import DEVICE_HELP, bind_device, cleanup, dist_env, init_distributed, print0, resolve_device
from embdistill.errors import UserError
from embdistill.input_format import MaxLength
from embdistill.paths import Paths, base_dir
from embdistill.senses.dictionary import SenseDictionary
from embdistill.senses.targets import TargetsConfig, compute_targets
from embdistill.tasks import resolve_task_set
from embdistill.teachers import load_teacher, load_tokenizer
from embdistill.texts import read_train_texts, texts_inputs


def build_parser():
    parser = stage_parser(__doc__, task_set=True)
    parser.add_argument("--teacher", default="minilm", help="teacher alias, folder or hub id")
    parser.add_argument("--sense-dict", default=None,
                        help="sense dictionary (default: sense_dict/<task>/<teacher>.kmeanspkl)")
    parser.add_argument("--targets", "--output", dest="output", default=None,
                        help="where the targets go (default: work/<task>/<teacher>/targets.npz)")
    parser.add_argument("--allow-teacher-mismatch", action="store_true",
                        help="accept a sense dictionary whose manifest names another teacher")
    parser.add_argument("--max-length", type=positive_int, default=512,
                        help="tokens per text, longer texts are cut (at most to the teacher's own limit); "
                        "the dictionary's and training's")
    parser.add_argument("--allow-max-length-mismatch", action="store_true",
                        help="use a dictionary gathered with another --max-length")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="texts per forward pass")
    parser.add_argument("--flush-every", type=positive_int, default=256,
                        help="texts per part file (a killed run resumes from parts)")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--teacher-dtype", default=None,
                        help="default: bfloat16 for decoders on GPU, else float32")
    parser.add_argument("--dist-timeout", type=positive_float, default=3600.0,
                        help="seconds a process waits for the others at the end")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return targets(args)
    finally:
        cleanup()


def targets(args) -> int:
    if args.dist_timeout <= 0:
        raise UserError(f"--dist-timeout must be positive, got {args.dist_timeout}")
    task = resolve_task_set(args.task, args.text_column, args.label_column)
    tokenizer = load_tokenizer(args.teacher)
    paths = Paths(base_dir(args.base_dir), task.slug, tokenizer.slug, members=task.member_slugs)
    sense_dict = paths.sense_dict if args.sense_dict is None else Path(args.sense_dict)
    if not sense_dict.is_file():
        raise UserError(f"missing sense dictionary {sense_dict}: run run_sep_cluster.sh {' '.join(args.task)} "
                        "first, or pass --sense-dict")
    dictionary = SenseDictionary.open(sense_dict)
    max_length = MaxLength.of(args.max_length, tokenizer.max_seq_length)
    dictionary.check_gathered_with(max_length, tokenizer.input_format.name, args.allow_max_length_mismatch)
    out = paths.targets if args.output is None else Path(args.output)
    cfg = TargetsConfig.of(tokenizer, max_length.used, dictionary)
    inputs = {"sense_dict": sense_dict, **texts_inputs(paths)}
    examples = read_train_texts(paths)
    if skip_if_done(out, config=asdict(cfg), inputs=inputs, overwrite=args.overwrite, what="targets"):
        return 0
    device = bind_device(resolve_device(args.device, dist_env()))  # before NCCL joins on it
    env = init_distributed(timeout_s=args.dist_timeout)
    teacher = load_teacher(args.teacher, device=device, dtype=args.teacher_dtype)
    senses = dictionary.packed(teacher.vocab_size, hidden_size=teacher.hidden_size,
                               teacher=None if args.allow_teacher_mismatch else teacher.slug).to(teacher.device)
    log.info("targets: %d texts, dictionary %s (%d tokens, %d senses, sense rule %s), teacher %r",
             len(examples), sense_dict, len(senses.sizes), len(senses.centroids), senses.rule, teacher)
    summary = compute_targets(teacher, senses, examples, out, cfg, env, inputs=inputs,
                              batch_size=args.batch_size, flush_every=args.flush_every,
                              overwrite=args.overwrite)
    if summary is not None:
        print0(f"targets: {task.name}: {summary['texts']} texts, {summary['text_tokens']} text tokens, "
               f"{summary['scored_tokens']} with a sense by {summary['sense_rule']}, "
               f"{100 * summary['single_sense_share']:.1f} % of them of a single-sense token "
               f"(not in the loss) ({summary['world_size']} process(es), "
               f"{summary['seconds']} s) -> {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
