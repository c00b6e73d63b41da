"""Stage 6: evaluate models on tasks of any mteb task type through mteb; write results/<run>/.

    python scripts/06_evaluate.py --task bbc-news --run demo --models teacher:minilm
        untrained:minilm@3 student:runs/bbc-news/skd/export/hf
        replace:runs/bbc-news/skd/export/hf@sense_dict/bbc-news/minilm.kmeanspkl
        replace:minilm@sense_dict/bbc-news/minilm.kmeanspkl
    python scripts/06_evaluate.py --tasks bbc-news tweet-sentiment --models st:path/to/st_folder
    python scripts/06_evaluate.py --task bbc-news --task-types Classification Clustering --models teacher:minilm
    python scripts/06_evaluate.py --tasks 2 STSBenchmark --task-types STS --models teacher:minilm
    python scripts/06_evaluate.py --tasks bbc-news lee-sts --task-types Retrieval STS --models teacher:minilm
    python scripts/06_evaluate.py --tasks bbc-news lee-sts --student-of lee-sts=bbc-news
        --models 'skd=st:runs/{task}/skd/export/st'

Task types (mteb's names: Classification, Clustering, STS, PairClassification, ...): a hub task
(1-16 or any MTEB task name) is of its own type; a local task (bbc-news, tweet-sentiment, a
labelled file) offers Classification (its name) and Clustering (<name>-clustering: k-means on
its held-out split, V-measure), bbc-news also Retrieval (bbc-news-retrieval: headline -> body
over its held-out articles, nDCG@10); lee-sts (the Lee corpus, from the gensim package, no
stage 0) is STS. Without --task-types: hub tasks and lee-sts as their type, local tasks as
Classification. With it: only the hub tasks of the listed types, and each local task as every
listed type it offers. The table gives each task's mteb main score, a mean per type and the
overall mean.

Model specs, [LABEL=]KIND:TARGET (LABEL names the row; see embdistill/evaluation/specs.py):
  teacher:MODEL          a teacher (load_teacher name, hub id or folder), plain mode
  student:DIR            an exported student (runs/<task>/<run>/export/hf), plain mode
  untrained:MODEL@N      the first N layers of MODEL, untrained
  replace:MODEL@DICT     MODEL in replace mode with sense dictionary DICT (for an exported student:
                         the dictionary it learned, as its export manifest records it)
  st:MODEL               a sentence-transformers folder or hub id, plain text, as published, cut
                         to --max-length; st:MODEL@own-length: at its own length (model2vec: its
                         tokenizer's cut, 512 as model2vec saves it), labelled apart (default
                         label NAME-st-own-length)
MODEL and DICT may hold {task}: one row, each task's own model (runs/{task}/...); a task with no
runs of its own (lee-sts) takes another's with --student-of lee-sts=bbc-news.
The table's "tokens" column gives what each row read of a text.
"""

import argparse

from embdistill.artifacts import output_lock
from embdistill.cli import positive_int, run_main, setup_logging, stage_parser
from embdistill.distributed import resolve_device
from embdistill.evaluation.specs import (check_replace_dictionaries, model_task_slugs, open_dictionaries,
                                         parse_model_specs, parse_student_of)
from embdistill.paths import base_dir, check_run_name, results_dir


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__)
    parser.set_defaults(task=None)
    parser.add_argument("--tasks", nargs="+", default=[],
                        help="tasks to evaluate on (with --task: both; default bbc-news)")
    parser.add_argument("--task-types", nargs="+", default=None, metavar="TYPE",
                        help="mteb task types to evaluate (see above; default: hub tasks as their "
                        "type, local tasks as Classification)")
    parser.add_argument("--models", nargs="+", required=True, metavar="SPEC", help="models (see below)")
    parser.add_argument("--run", default="eval", help="results go to results/<run>/")
    parser.add_argument("--student-of", nargs="+", default=[], metavar="TASK=SOURCE",
                        help="model specs with {task} score TASK (one without runs of its own, e.g. "
                        "lee-sts) with SOURCE's model and dictionary (e.g. lee-sts=bbc-news); the table "
                        "says so")
    parser.add_argument("--samples-per-label", type=positive_int, default=None,
                        help="training texts per label in each experiment (default: 32 for local "
                             "tasks, mteb's own (8) for hub tasks, to compare with the leaderboard)")
    parser.add_argument("--n-experiments", type=positive_int, default=None,
                        help="experiments per task: classification's logistic-regression fits, "
                        "clustering's k-means runs (default: mteb's, 10; other types have none)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="texts per forward pass")
    parser.add_argument("--max-length", type=positive_int, default=512,
                        help="max tokens of every model's input, cut to each model's own limit (a "
                        "student's: the length it was trained at); st: models too, unless the spec "
                        "ends with @own-length (see below)")
    parser.add_argument("--allow-max-length-mismatch", action="store_true",
                        help="replace mode with a dictionary gathered with another --max-length")
    parser.add_argument("--throughput-texts", type=positive_int, default=256,
                        help="texts of the first task timed for the texts/s column")
    parser.add_argument("--device", default=None, help="default: the GPU when there is one, else the CPU")
    parser.add_argument("--allow-teacher-mismatch", action="store_true",
                        help="replace mode: accept a dictionary whose manifest names another teacher "
                        "than the model's (e.g. the same model under another name)")
    parser.add_argument("--allow-dictionary-mismatch", action="store_true",
                        help="replace mode: evaluate an exported student with another dictionary than "
                        "the one its export manifest records it learned (another sense rule, k rule, "
                        "teacher, max length or content)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)

    tasks = list(dict.fromkeys(([args.task] if args.task else []) + args.tasks)) or ["bbc-news"]
    from embdistill.evaluation.local_tasks import resolve_evaluation_task, select_task_types

    # Task, type and spec mistakes (syntax, missing folders) fail here, before the models load.
    resolved = [resolve_evaluation_task(t, args.text_column, args.label_column) for t in tasks]
    select_task_types(resolved, args.task_types)
    student_of = parse_student_of(args.student_of, resolved)
    model_slugs = model_task_slugs(resolved, student_of)
    specs = parse_model_specs(args.models, model_slugs)
    dictionaries = open_dictionaries(specs, model_slugs)
    check_replace_dictionaries(specs, dictionaries, model_slugs, allow_teacher_mismatch=args.allow_teacher_mismatch,
                               allow_dictionary_mismatch=args.allow_dictionary_mismatch)
    from embdistill.evaluation.run import EvaluationConfig, evaluate, print_table

    check_run_name(args.run, "results/")
    config = EvaluationConfig(
        run=args.run, tasks=tuple(tasks), models=tuple(args.models),
        task_types=tuple(dict.fromkeys(args.task_types)) if args.task_types else None,
        samples_per_label=args.samples_per_label, n_experiments=args.n_experiments,
        batch_size=args.batch_size, max_length=args.max_length,
        allow_max_length_mismatch=args.allow_max_length_mismatch,
        throughput_texts=args.throughput_texts, seed=args.seed,
        text_column=args.text_column, label_column=args.label_column,
        student_of=tuple(f"{task}={source}" for task, source in student_of.items()),
    )
    base = base_dir(args.base_dir)
    with output_lock(results_dir(base, args.run)):  # mteb writes its result files in place
        table = evaluate(config, base, device=resolve_device(args.device), overwrite=args.overwrite,
                         dictionaries=dictionaries)
    print_table(table, results_dir(base, args.run))
    return 0


if __name__ == "__main__":
    run_main(main)
