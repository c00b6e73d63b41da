"""Quality study: which sense rule (dot, the paper's; l2; cos) makes the better exported SKD
student, at the demo's settings (2 epochs, batch 16, lr 3e-4), with 3 seeds, on four families.

    PYTHONPATH=. python bench/study_sense_rule.py --base-dir /work/studies/quality  # beside study_skd.py's runs
    PYTHONPATH=. python bench/study_sense_rule.py --base-dir /tmp/q --datasets bbc-news --train 200 --test 60 \\
        --seeds 0 --epochs 1                                                      # a quick look

bench/study_skd.py's study (same datasets, runs, evaluation and summary: see its docstring) with
the variants skd (rule dot), skd-l2 and skd-cos; with the same --base-dir as that study, its skd runs
are reused. Each rule has its own dictionary (scripts/03_cluster.py --sense-rule) and targets;
k-means does not depend on the rule, and the dictionaries are checked to hold the same senses
byte for byte, so that only the rule differs. Writes study_sense_rule.md / .json / .png.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/study_skd.py
from study_skd import quality_parser, rule_paths, run_study  # noqa: E402

from embdistill.senses.packed import SENSE_RULES  # noqa: E402

RUN = "study_sense_rule"


def check_same_senses(base: Path, task_slug: str) -> None:
    """The rules' dictionaries hold the same senses byte for byte (the rule is recorded in each
    one's manifest), else the study would compare clusterings, not rules."""
    files = {rule: rule_paths(base, task_slug, rule)[0].read_bytes() for rule in SENSE_RULES}
    if len(set(files.values())) != 1:
        raise SystemExit(f"{task_slug}: the rules' dictionaries differ in their senses: k-means is not "
                         "deterministic here, the comparison would not isolate the rule")


def main() -> None:
    args = quality_parser(__doc__, ("skd", "skd-l2", "skd-cos")).parse_args()
    run_study(args, RUN, check=check_same_senses)


if __name__ == "__main__":
    main()
