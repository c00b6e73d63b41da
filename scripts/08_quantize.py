"""Stage 8: the trained student with int8 weights, an ONNX SentenceTransformer folder (runs/<task>/<run>/export/st-int8).

    python scripts/08_quantize.py --task bbc-news --run skd
    python scripts/06_evaluate.py --task bbc-news --models skd-int8=st:runs/bbc-news/skd/export/st-int8

Reads export/st (stage 5) and writes export/st-int8 (embdistill/quantize.py says how): load it
with SentenceTransformer(folder, trust_remote_code=True), embedding as export/st does. Before
it is written, it embeds the task's training texts (text_train/<task>/train.json, stage 0)
each alone and all in one batch: a pooled cosine to export/st below --min-cosine refuses the
folder (exit 2). Its manifest records the export's wall seconds (extra.seconds) and the
lowest cosines (extra.cosine_to_fp32). --weight-type none writes the fp32 ONNX export
unquantised, to export/st-onnx.
"""

import argparse

from embdistill.artifacts import package_version, skip_if_done, write_manifest
from embdistill.cli import finite_float, run_main, setup_logging, stage_parser
from embdistill.paths import ST_INT8_FOLDER, ST_ONNX_FOLDER, Paths, base_dir, check_run_name
from embdistill.quantize import CHECK_TEXTS, MIN_COSINE, WEIGHT_TYPES
from embdistill.tasks import resolve_task
from embdistill.texts import read_train_texts, texts_only


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__)
    parser.add_argument("--run", default="skd", help="the training run whose export/st is quantised")
    parser.add_argument("--weight-type", default="qint8", choices=WEIGHT_TYPES,
                        help="onnxruntime's int8 weight type (qint8: signed), or none: fp32 ONNX")
    parser.add_argument("--min-cosine", type=finite_float, default=MIN_COSINE,
                        help="the lowest pooled cosine to export/st allowed on a training text "
                             "(embdistill/quantize.py: MIN_COSINE says why this default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)

    task = resolve_task(args.task, args.text_column, args.label_column)
    paths = Paths(base_dir(args.base_dir), task.slug, run=check_run_name(args.run, "runs/<task>/"))
    st_dir = paths.export_st
    out = paths.export_dir / (ST_ONNX_FOLDER if args.weight_type == "none" else ST_INT8_FOLDER)
    # the recipe (embdistill/quantize.py) is part of the identity: a folder from another recipe is
    # redone; so is the export check's (its texts, train.json an input, and its threshold)
    config = {"task": task.name, "run": args.run, "weight_type": args.weight_type, "per_channel": True,
              "exporter": "torchscript, eager attention", "fusion": "onnxruntime bert, raw attention mask",
              "activation_scales": "per text (each text one run)", "check_texts": CHECK_TEXTS,
              "min_cosine": args.min_cosine,
              **{package: package_version(package) for package in ("torch", "onnx", "onnxruntime")}}
    inputs = {"st": st_dir, "texts": paths.train_json}
    if skip_if_done(out, config=config, inputs=inputs, overwrite=args.overwrite, what="quantize"):
        return 0
    from embdistill.quantize import load_student, quantize_student

    fp32 = load_student(st_dir)
    examples = read_train_texts(paths)  # lazy: only the check texts are read
    check_texts = texts_only(examples[:: max(1, len(examples) // CHECK_TEXTS)][:CHECK_TEXTS])  # spread over the file
    summary = quantize_student(fp32, out, check_texts, weight_type=args.weight_type, min_cosine=args.min_cosine)
    write_manifest(out, stage="quantize", config=config, inputs=inputs, extra=summary)
    return 0


if __name__ == "__main__":
    run_main(main)
