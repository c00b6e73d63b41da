"""Multi-teacher distillation with the Gaussian-kernel loss (arXiv 2510.18680).

    corpus -> embeddings/<corpus>/<teacher>/shard-*.npy     scripts/10_teacher_embeddings.py
           -> runs/<corpus>/<run>/{initial,export}/          scripts/11_train_multiteacher.py
           -> results/<run>/                                  scripts/06_evaluate.py (st: specs)

* :mod:`.corpus`: which texts (tasks' training texts or a hub dataset), the validation split;
* :mod:`.sentence_teacher`: an encoder teacher, embedding through its own sentence-transformers
  pipeline (as the authors', and as the evaluation's teacher row);
* :mod:`.shards`: teacher embeddings in fp16 shards, aligned to texts by a stable text id,
  and their per-dimension statistics (the targets' standardisation);
* :mod:`.lsa`: the offline TF-IDF + SVD teacher, saved as plain data, exported for evaluation;
* :mod:`.model`: the student with one MLP head per teacher and the targets' scale, its data
  and loss (the loss itself: :mod:`embdistill.losses.gaussian_nll`);
* :mod:`.warmup`: the heads fitted on cached student embeddings before training;
* :mod:`.monitor`: probe metrics (heads' R2, pairwise cosine) and the periodic validation loss;
* :mod:`.teacher_embeddings`, :mod:`.train`: the logic of stages 10 and 11.

:func:`evaluation_models` gives the evaluation stage's model specs of a pipeline (the
multi-teacher driver in :mod:`embdistill.drivers` passes them to stage 6).
"""

from __future__ import annotations

from ..paths import ST_FOLDER, Paths, slug


def evaluation_models(paths: Paths, teachers: list[str], runs: dict[str, str]) -> list[str]:
    """``LABEL=st:FOLDER`` specs for scripts/06_evaluate.py: each trained run (label -> run name),
    the student before distillation (that of the first run) and each teacher, all embedding
    plain text through their SentenceTransformer pipelines, the teachers' the very pipelines
    that made the shards (:mod:`.sentence_teacher`)."""
    from ..evaluation.specs import OWN_LENGTH
    from .lsa import LSA_TEACHER, lsa_dirs
    from .sentence_teacher import teacher_source

    specs = [f"{label}=st:{Paths(paths.base, paths.task, run=run).export_st}"
             for label, run in runs.items()]
    first_run = Paths(paths.base, paths.task, run=next(iter(runs.values())))
    specs.append(f"student-before=st:{first_run.initial_dir / ST_FOLDER}")
    for name in teachers:
        if name == LSA_TEACHER:  # a bag of words: its shards read whole texts, and so does its row
            specs.append(f"{slug(name)}=st:{lsa_dirs(paths.embeddings_dir(LSA_TEACHER))[1]}{OWN_LENGTH}")
        else:
            specs.append(f"{slug(name)}=st:{teacher_source(name)}")
    return specs
