"""Stage 7: model2vec's static embeddings of the teacher, the baseline a user could pick instead (baselines/model2vec/<teacher>/).

    python scripts/07_model2vec.py --teacher minilm
    python scripts/06_evaluate.py --tasks bbc-news --models model2vec=st:baselines/model2vec/minilm

One vector per vocabulary token, from the teacher (embdistill/baselines.py says how), written as
a SentenceTransformer folder that scripts/06_evaluate.py reads as st:. Not per task: one folder
per teacher; its manifest records the distillation's wall seconds (extra.seconds). Offline for
a local teacher (the default's folder ships in a package).
"""

import argparse
from pathlib import Path

from embdistill.artifacts import package_version, skip_if_done, write_manifest
from embdistill.cli import fraction, positive_int, run_main, setup_logging, stage_parser
from embdistill.distributed import resolve_device
from embdistill.paths import base_dir, baseline_dir
from embdistill.teachers import load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__, task=False)
    parser.add_argument("--teacher", default="minilm", help="teacher alias, folder or hub id")
    parser.add_argument("--pca-dims", type=positive_int, default=256,
                        help="dimensions the token vectors keep (model2vec's default)")
    parser.add_argument("--sif-coefficient", type=fraction, default=1e-4,
                        help="SIF weighting a / (a + p(token)), 0 < a < 1 (model2vec's default)")
    parser.add_argument("--device", default=None, help="default: the GPU when there is one, else the CPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)

    tokenizer = load_tokenizer(args.teacher)  # resolves the name, loads no weights
    out = baseline_dir(base_dir(args.base_dir), "model2vec", tokenizer.slug)
    source = Path(tokenizer.tokenizer.name_or_path)
    inputs = {"teacher": source} if source.is_dir() else {}  # a hub id: its name in the config
    config = {"teacher": tokenizer.name, "pca_dims": args.pca_dims, "sif_coefficient": args.sif_coefficient,
              **{package: package_version(package) for package in ("model2vec", "skeletoken")}}
    if skip_if_done(out, config=config, inputs=inputs, overwrite=args.overwrite, what="model2vec"):
        return 0
    from embdistill.baselines import distill_model2vec

    device = resolve_device(args.device)
    seconds = distill_model2vec(args.teacher, out, pca_dims=args.pca_dims,
                                sif_coefficient=args.sif_coefficient, device=device)
    write_manifest(out, stage="model2vec", config=config, inputs=inputs,
                   extra={"seconds": round(seconds, 2), "device": str(device)})
    return 0


if __name__ == "__main__":
    run_main(main)
