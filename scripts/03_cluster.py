"""Stage 3: cluster gathered token states into the sense dictionary sense_dict/<task>/<teacher>.kmeanspkl.

    python scripts/03_cluster.py --task bbc-news
    python scripts/03_cluster.py --task bbc-news tweet-sentiment   # a task set's: sense_dict/bbc-news+tweet-sentiment/
    python scripts/03_cluster.py --task bbc-news --k-rule mcl --backend sklearn
    python scripts/03_cluster.py --task bbc-news --sense-rule l2 --output sense_dict/bbc-news/minilm.l2.kmeanspkl
    torchrun --nproc_per_node 4 scripts/03_cluster.py --task bbc-news --threads 2
"""

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from embdistill.artifacts import skip_if_done
from embdistill.cli import log, non_negative_float, positive_float, positive_int, run_main, setup_logging, stage_parser
from embdistill.distributed import DEVICE_HELP, bind_device, cleanup, init_distributed, print0, resolve_device
from embdistill.errors import UserError
from embdistill.paths import Paths, base_dir, slug
from embdistill.senses.cluster import Batching, ClusterConfig, load_states, run
from embdistill.senses.combine import combined_artifact
from embdistill.senses.dictionary import SENSE_DTYPES
from embdistill.senses.kmeans import BACKENDS
from embdistill.senses.packed import COS_TEMPERATURE, DEFAULT_SENSE_RULE, SENSE_RULES
from embdistill.senses.krule import K_RULES
from embdistill.tasks import resolve_task_set


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__, task_set=True)
    parser.add_argument("--teacher", default="minilm", help="teacher whose states are clustered")
    parser.add_argument("--input", default=None,
                        help="gathered states (default work/<task>/<teacher>/combined.pkl, or its "
                        "combined.rows.npy where the combine wrote no pickle)")
    parser.add_argument("--output", default=None,
                        help="sense dictionary (default sense_dict/<task>/<teacher>.kmeanspkl)")
    parser.add_argument("--hidden-size", type=positive_int, default=None,
                        help="refuse states that are not this wide (e.g. 4096 for Llama-3-8B)")
    parser.add_argument("--k-rule", choices=K_RULES, default="fixed",
                        help="senses per token: mcl = the original's rule (k from an MCL cluster "
                        "count; slow), fixed = --senses for every token (what mcl gives on MiniLM; "
                        "checked against MCL on a few tokens, see BENCHMARKS.md)")
    parser.add_argument("--senses", type=positive_int, default=5, help="k of the fixed rule")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="k-means: torch (batched, any device), sklearn (the original's), faiss")
    parser.add_argument("--sense-rule", choices=SENSE_RULES, default=DEFAULT_SENSE_RULE,
                        help="which of its senses a token takes (targets, sense loss, replace mode), "
                        "recorded with the dictionary: dot = largest dot product (the original's; "
                        "not the nearest in distance), l2 = nearest in Euclidean distance, cos = "
                        f"largest cosine (loss logits cos / {COS_TEMPERATURE})")
    parser.add_argument("--dtype", choices=SENSE_DTYPES, default="float16",
                        help="stored sense vectors (bfloat16: torch tensors, as the original)")
    parser.add_argument("--max-iter", type=positive_int, default=300, help="Lloyd iterations, at most")
    parser.add_argument("--tol", type=non_negative_float, default=1e-4,
                        help="stop when the squared centre shift is below tol x mean variance")
    parser.add_argument("--n-init", type=positive_int, default=1, help="k-means++ seedings per token, best kept")
    parser.add_argument("--batch-tokens", type=positive_int, default=256, help="tokens clustered together, at most")
    parser.add_argument("--batch-elements", type=positive_int, default=1 << 26,
                        help="floats per working tensor of a batch, about (bounds memory)")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads per process")
    parser.add_argument("--timeout", type=positive_float, default=3600.0,
                        help="seconds a process waits for the others at the barrier")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = bind_device(resolve_device(args.device))  # this process's own GPU
    task = resolve_task_set(args.task, args.text_column, args.label_column)
    teacher = slug(args.teacher)
    paths = Paths(base_dir(args.base_dir), task.slug, teacher)  # a task set's: its members' states combined
    input_path = combined_artifact(paths.combined if args.input is None else Path(args.input).resolve())
    if not input_path.is_file():
        raise UserError(f"missing gathered states {input_path}: run run_gather_sense.sh {' '.join(args.task)} "
                        "and a0_generate_combinepkl.py first, or pass --input")
    cfg = ClusterConfig(teacher=teacher, k_rule=args.k_rule, senses=args.senses, backend=args.backend, seed=args.seed,
                        max_iter=args.max_iter, tol=args.tol, n_init=args.n_init, dtype=args.dtype,
                        sense_rule=args.sense_rule)
    batching = Batching(tokens=args.batch_tokens, elements=args.batch_elements)
    out = paths.sense_dict if args.output is None else Path(args.output).resolve()
    if skip_if_done(out, config=asdict(cfg), inputs={"states": input_path}, overwrite=args.overwrite,
                    what="cluster"):
        return 0
    states, hidden_size, input_print = load_states(input_path, teacher, args.hidden_size)
    env = init_distributed(timeout_s=args.timeout)
    try:
        summary = run(states, hidden_size, out, cfg, batching, env, device, input_path=input_path,
                      input_print=input_print, overwrite=args.overwrite)
    finally:
        cleanup()
    if summary is not None:
        log.info("cluster: wrote %s", out)
        print0(f"cluster: {task.slug}/{teacher}: {summary['tokens']} tokens -> {summary['senses']} "
               f"senses ({summary['tokens_clustered']} clustered, {summary['tokens_raw']} raw), "
               f"k rule {cfg.k_rule}, {cfg.backend}, sense rule {cfg.sense_rule}, {summary['seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
