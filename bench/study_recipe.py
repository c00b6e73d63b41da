"""Recipe study: does the demo's optimiser (2 epochs of batch 16, lr 3e-4, 10 warm-up steps, cosine
decay, the checkpoint kept by validation) leave the exported student at least where it started,
on the demo's bbc-news and on a user file of short texts nobody tuned for, and what do the
learning rate, the schedule and the number of steps change? 3 seeds, the default objective
(pooled-mse), and SKD (the paper's objective) at the demo's settings beside it.

    pip install --no-deps chatterbot-corpus     # the user file's source (once)
    PYTHONPATH=. python bench/study_recipe.py --base-dir /work/studies/quality   # beside study_skd.py's runs
    PYTHONPATH=. python bench/study_recipe.py --base-dir /tmp/q --datasets bbc-news --train 200 --test 60 \\
        --seeds 0 --epochs 1                                                  # a quick look

bench/study_skd.py's study (same datasets, runs, evaluation and summary: see its docstring) with
the variants pooled-mse (lr 3e-4, cosine), pooled-mse-lr1e-4, pooled-mse-lr1e-3,
pooled-mse-constant (lr 3e-4 without decay: its curve is the score against the number of steps
at a fixed rate, i.e. where a shorter or longer run would stop) and skd; with the same
--base-dir as that study, its pooled-mse and skd runs are reused. Every variant is validated and
saved every half epoch, so each curve gives the score after 0.5, 1, 1.5 and 2 epochs; the rows
"kept by similarity" are what stage 5 exports. Writes study_recipe.md / .json / .png.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/study_skd.py
from study_skd import quality_parser, run_study  # noqa: E402

VARIANTS = ("pooled-mse", "pooled-mse-lr1e-4", "pooled-mse-lr1e-3", "pooled-mse-constant", "skd")


def main() -> None:
    run_study(quality_parser(__doc__, VARIANTS).parse_args(), "study_recipe")


if __name__ == "__main__":
    main()
