"""The plan before the run: each stage's disk, peak host memory, device memory and time.

    python scripts/09_plan.py --teacher llm2vec-llama3-8b --tasks all --device h100 --gather-gpus 6 --train-gpus 9
    python scripts/09_plan.py --pipeline multiteacher --teacher llm2vec-llama3-8b --n-teachers 4 \\
        --texts 3600000 --mean-tokens 64 --device h100 --gather-gpus 8
    python scripts/09_plan.py --hidden-size 1024 --layers 24 --vocab-size 50000 --params 3.5e8 --texts 200000 --mean-tokens 40

Nothing runs: the numbers come from formulas and unit costs (embdistill/plan.py states both):
CPU rates fitted by bench/bench_scale.py (bench/plan_constants.json: its date and machine),
GPU rates from ../shared/H100_FIGURES.md (measured once, random weights) until
bench/gpu_check.sh has measured ours. The options are the real stages' (same names, same
defaults); the tasks' sizes are mteb's descriptive statistics.
"""

import argparse

from embdistill.cli import HelpFormatter, StageArgumentParser, non_negative_int, positive_float, positive_int, run_main
from embdistill.errors import UserError
from embdistill.plan import (CHARS_PER_TOKEN, CONSTANTS_FILE, STAGES, TASK_SIZES, TEACHERS, Options, Teacher, Work,
                             derive, format_plan, load_constants, plan, task_work)

CUSTOM_SHAPE = ("hidden_size", "layers", "vocab_size", "params")


def build_parser() -> argparse.ArgumentParser:
    description, _, epilog = __doc__.strip().partition("\n")
    parser = StageArgumentParser(prog="09_plan.py", description=description, epilog=epilog.strip("\n"),
                                 formatter_class=HelpFormatter)
    parser.add_argument("--pipeline", choices=("skd", "multiteacher"), default="skd",
                        help="skd: stages 0-6; multiteacher: texts and the teacher embeddings (stage 10)")
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="minilm")
    parser.add_argument("--hidden-size", type=positive_int, help="another teacher: with --layers --vocab-size --params")
    parser.add_argument("--layers", type=positive_int)
    parser.add_argument("--vocab-size", type=positive_int)
    parser.add_argument("--params", type=positive_float, help="the teacher's parameters (e.g. 7.5e9)")
    parser.add_argument("--student-layers", type=positive_int, default=None,
                        help="layers the student keeps (default: the teacher's; 2 for a custom one)")
    parser.add_argument("--n-teachers", type=positive_int, default=1, help="multiteacher: teachers of this shape")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="task indices 1-16 or MTEB names, or 'all' (their train sizes and mean characters)")
    parser.add_argument("--texts", type=positive_int, default=None, help="instead of --tasks: training texts")
    parser.add_argument("--mean-tokens", type=positive_float, default=None, help="with --texts: tokens per text")
    parser.add_argument("--eval-texts", type=non_negative_int, default=None,
                        help="with --texts: held-out texts evaluated (default: a quarter of --texts)")
    parser.add_argument("--max-length", type=positive_int, default=512)
    parser.add_argument("--per-token", type=positive_int, default=1000, help="02_gather.py's cap per token id")
    parser.add_argument("--cap", type=positive_int, default=4000, help="a0_generate_combinepkl.py's cap per token id")
    parser.add_argument("--k-rule", choices=("fixed", "mcl"), default="fixed",
                        help="03_cluster.py's; mcl: k at most 0.4 x the cap (an upper bound)")
    parser.add_argument("--senses", type=positive_int, default=5, help="k of the fixed rule")
    parser.add_argument("--max-iter", type=positive_int, default=300,
                        help="k-means iterations, at most (the time is an upper bound: --tol stops earlier)")
    parser.add_argument("--batch-size", type=positive_int, default=3, help="05_train.py's, per process")
    parser.add_argument("--epochs", type=positive_int, default=5)
    parser.add_argument("--max-steps", type=non_negative_int, default=0, help="0: epochs decide")
    parser.add_argument("--gather-batch-size", type=positive_int, default=16, help="02_gather.py's --batch-size")
    parser.add_argument("--flush-every", type=positive_int, default=256, help="02_gather.py's: texts of a part")
    parser.add_argument("--gather-gpus", type=positive_int, default=1, help="ranks of gather, targets, embeddings")
    parser.add_argument("--train-gpus", type=positive_int, default=1, help="ranks of training")
    parser.add_argument("--cluster-procs", type=positive_int, default=1, help="processes of clustering")
    parser.add_argument("--device", choices=("cpu", "h100"), default="cpu")
    parser.add_argument("--constants", default=str(CONSTANTS_FILE), help="fitted CPU unit costs (bench_scale.py)")
    return parser


def teacher_of(args) -> Teacher:
    given = [name for name in CUSTOM_SHAPE if getattr(args, name) is not None]
    if given and len(given) < len(CUSTOM_SHAPE):
        missing = ", ".join("--" + name.replace("_", "-") for name in CUSTOM_SHAPE if name not in given)
        raise UserError(f"a custom teacher needs all of --hidden-size --layers --vocab-size --params (missing {missing})")
    teacher = TEACHERS[args.teacher]
    if given:
        teacher = Teacher("custom", args.hidden_size, args.layers, args.vocab_size, args.params, 2)
        if args.vocab_size * args.hidden_size >= args.params:
            raise UserError(f"--params {args.params:g} is not above the embeddings' vocab x hidden "
                            f"({args.vocab_size * args.hidden_size:g})")
    student_layers = args.student_layers or teacher.student_layers
    if student_layers > teacher.layers:
        raise UserError(f"--student-layers {student_layers} is more than the teacher's {teacher.layers} layers")
    return Teacher(teacher.name, teacher.hidden, teacher.layers, teacher.vocab, teacher.params, student_layers)


def task_indices(names: list[str]) -> list[int]:
    if names == ["all"]:
        return list(TASK_SIZES)
    by_name = {row[0].lower(): index for index, row in TASK_SIZES.items()}
    indices = []
    for name in names:
        index = int(name) if name.isascii() and name.isdigit() else by_name.get(name.lower())
        if index not in TASK_SIZES:
            raise UserError(f"unknown task {name!r}: give indices 1-16, MTEB names of the original's tasks, or 'all'")
        indices.append(index)
    return indices


def work_of(args) -> Work:
    if (args.tasks is None) == (args.texts is None):
        raise UserError("give either --tasks or --texts (with --mean-tokens)")
    if args.tasks is not None:
        if args.mean_tokens is not None or args.eval_texts is not None:
            raise UserError("--mean-tokens and --eval-texts go with --texts, not --tasks (the tasks' sizes are known)")
        return task_work(task_indices(args.tasks), args.max_length)
    if args.mean_tokens is None:
        raise UserError("--texts needs --mean-tokens (text tokens per text)")
    tokens = min(args.mean_tokens, args.max_length)
    eval_texts = args.texts // 4 if args.eval_texts is None else args.eval_texts
    return Work(texts=args.texts, tokens=args.texts * tokens, chars=args.texts * tokens * CHARS_PER_TOKEN, eval_texts=eval_texts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    teacher = teacher_of(args)
    work = work_of(args)
    options = Options(max_length=args.max_length, per_token=args.per_token, cap=args.cap, k_rule=args.k_rule,
                      senses=args.senses, max_iter=args.max_iter, gather_batch=args.gather_batch_size,
                      flush_every=args.flush_every,
                      train_batch=args.batch_size, train_steps=args.max_steps, epochs=args.epochs,
                      gather_gpus=args.gather_gpus, train_gpus=args.train_gpus, cluster_procs=args.cluster_procs,
                      device=args.device, teachers=args.n_teachers)
    try:
        constants = load_constants(args.constants)
    except (OSError, ValueError) as exc:
        raise UserError(f"--constants {args.constants}: cannot read it ({exc})") from None
    rows = plan(work, teacher, options, constants)
    law = tuple(constants["zipf_law"])
    derived = derive(work, teacher, options, law)
    stages = ("texts", "teacher_embeddings") if args.pipeline == "multiteacher" else STAGES[:-1]
    print(f"teacher {teacher.name}: hidden {teacher.hidden}, {teacher.layers} layers, vocabulary {teacher.vocab:,}, "
          f"{teacher.params:.3g} parameters (student: {teacher.student_layers} layers, {teacher.student_params:.3g})")
    print(f"work: {work.texts:,} texts, {work.tokens:,.0f} tokens ({work.mean_tokens:.0f} per text, max length "
          f"{options.max_length}), {work.eval_texts:,} held-out texts")
    if args.pipeline == "skd":
        print(f"kept states {derived.kept_states:,.0f} (cap {min(options.per_token, options.cap)} per token id, Zipf-Mandelbrot "
              f"s={law[0]}, q={law[1]} over {law[2]:.0%} of the vocabulary), dictionary rows {derived.dictionary_states:,.0f} (k {options.k}), "
              f"{options.steps(work):,} training steps of {options.train_batch} texts x {options.train_gpus} rank(s)")
    else:
        print(f"{options.teachers} teacher(s) of this shape, {options.gather_gpus} rank(s)")
    print(f"device {options.device}; ranks: gather/targets/embeddings {options.gather_gpus}, training "
          f"{options.train_gpus}, clustering {options.cluster_procs}; CPU unit costs: {constants['date']}, "
          f"{constants['machine']}, {constants['settings']['threads']} thread(s)")
    print(format_plan(rows, stages))
    chosen = [rows[s] for s in stages]
    print(f"total: disk {sum(r['disk_mb'] for r in chosen) / 1024:,.1f} GB (outputs kept), largest host memory "
          f"{max(r['host_mb'] for r in chosen) / 1024:,.1f} GB, time {sum(r['seconds'] for r in chosen) / 3600:,.1f} h")
    return 0


if __name__ == "__main__":
    run_main(main)
