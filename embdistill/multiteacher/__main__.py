"""Print a multi-teacher pipeline's evaluation model specs, one per line (run_multiteacher.sh).

    python -m embdistill.multiteacher --task bbc-news tweet-sentiment --teachers minilm lsa \
        --runs nll-student=mt-nll mse-student=mt-mse
"""

import argparse

from ..cli import run_main
from ..errors import UserError
from ..paths import Paths, base_dir
from . import evaluation_models
from .corpus import add_corpus_args, corpus_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_corpus_args(parser, building=False)
    parser.add_argument("--base-dir", default=None)
    parser.add_argument("--teachers", nargs="+", default=["minilm", "lsa"])
    parser.add_argument("--runs", nargs="+", required=True, metavar="LABEL=RUN")
    args = parser.parse_args()
    runs = dict(item.partition("=")[::2] for item in args.runs)
    if not all(runs) or not all(runs.values()):
        raise UserError(f"--runs takes LABEL=RUN pairs, got {' '.join(args.runs)}")
    paths = Paths(base_dir(args.base_dir), corpus_name(args))
    print("\n".join(evaluation_models(paths, args.teachers, runs)))
    return 0


if __name__ == "__main__":
    run_main(main)
