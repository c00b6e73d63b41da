"""Evaluation: our models and any sentence-transformers model on mteb tasks of any type
(classification, clustering, STS, ...), replace mode, and the results table.

* :mod:`.specs`: model specs, ``[LABEL=]KIND:TARGET`` (the syntax is documented there);
* :mod:`.models`: our model kinds and sentence-transformers models as mteb encoders;
* :mod:`.local_tasks`: hub tasks as mteb runs them, local classification and clustering tasks
  built from eval.json, the task-type selection;
* :mod:`.replace`: replace mode, batched (and the original's per-token loop, for reference);
* :mod:`.table`: table.json / table.md / scores.png, read back from mteb's result files;
* :mod:`.run`: one evaluation run (``scripts/06_evaluate.py``).

Submodules are imported where used: mteb takes seconds to import, replace mode needs none of it.
"""
