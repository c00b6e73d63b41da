"""Baselines a user could pick instead of distilling a student: model2vec's static embeddings.

model2vec (Tulkens and van Dongen, MinishLab, 2024; the ``model2vec`` package) distils a
sentence encoder into one vector per vocabulary token: the teacher embeds every token alone
(mean of its output states), PCA reduces the vectors (``pca_dims``), and each is weighted by
SIF, ``a / (a + p(token))`` with ``p`` estimated from the token's rank by Zipf's law
(``sif_coefficient`` = a). A text's embedding is then the mean of its tokens' vectors,
normalised: no network at inference. The result is a SentenceTransformer folder
(``StaticEmbedding`` + ``Normalize``) that the evaluation reads as ``st:``; it embeds the plain
text, as a user of model2vec would.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .artifacts import replacing_folder
from .errors import UserError, first_line
from .teachers import load_teacher

log = logging.getLogger("embdistill.baselines")


def distill_model2vec(teacher_name: str, out_dir: str | Path, *, pca_dims: int, sif_coefficient: float,
                      device) -> float:
    """Write model2vec's static model of the teacher (a :func:`load_teacher` name) to
    ``out_dir`` (built beside it, moved into place); returns the distillation's wall seconds
    (not counting the teacher's loading)."""
    if not 0 < sif_coefficient < 1:
        raise UserError(f"--sif-coefficient must be between 0 and 1 (exclusive), got {sif_coefficient}")
    try:
        from model2vec.distill import distill_from_model
    except ImportError as exc:
        # model2vec's distill extra would also pin transformers < 5.4; skeletoken alone suffices
        raise UserError(f"model2vec's distillation cannot load ({first_line(exc)}); install "
                        "'model2vec>=0.10' and 'skeletoken>=0.6,<0.7' (requirements.txt)") from None
    teacher = load_teacher(teacher_name, device=device)
    if pca_dims > teacher.hidden_size:
        raise UserError(f"--pca-dims {pca_dims} is more than the teacher's {teacher.hidden_size} dimensions")
    start = time.perf_counter()
    static = distill_from_model(teacher.model, teacher.tokenizer, device=str(device), pca_dims=pca_dims,
                                sif_coefficient=sif_coefficient)
    seconds = time.perf_counter() - start
    with replacing_folder(out_dir) as building:
        static.save_pretrained(building)
    log.info("model2vec: %s -> %s (%d tokens x %d dimensions, %.1f s)", teacher.name, out_dir,
             *static.embedding.shape, seconds)
    return seconds
