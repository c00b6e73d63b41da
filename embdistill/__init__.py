"""embdistill: distil large embedding models into small ones.

Two methods share this library: Sense Knowledge Distillation (SKD, arXiv 2504.06036) and
multi-teacher distillation with a Gaussian-kernel loss (arXiv 2510.18680). Stage scripts in
``scripts/`` are thin wrappers around the modules here; see README.md, "Architecture".
"""

__version__ = "0.1.0"
