"""An encoder teacher of stage 10: its own sentence-transformers pipeline.

The authors embed the corpus with ``SentenceTransformer.encode``, so a teacher's targets are
what its published pipeline gives: its pooling (mean, CLS, last token...), its Dense layers,
its Normalize, its default prompt, its max_seq_length. The evaluation's teacher row
(``st:<teacher>``, :func:`embdistill.multiteacher.evaluation_models`) loads the same pipeline,
so the table compares the student with the model it learned from. A plain transformers folder
gets what sentence-transformers gives it (mean pooling, no normalisation).

What changes the vectors is in the shards' identity (the length limit in force and
:meth:`SentenceTeacher.pipeline`: the modules with their settings, the default prompt, the
dimension, the dtype); shards computed another way (e.g. by an older stage 10 that mean-pooled
every teacher) are redone.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from ..errors import UserError
from ..input_format import effective_max_length
from ..st_modules import load_sentence_transformer
from ..teachers import TEACHER_ALIASES, minilm_path

log = logging.getLogger("embdistill.multiteacher.sentence_teacher")


def teacher_source(name: str) -> str:
    """The folder or hub id a teacher's sentence-transformers pipeline loads from: ``minilm``
    is the packaged MiniLM folder, anything else is itself."""
    if name == "minilm":
        return str(minilm_path())
    if name in TEACHER_ALIASES:
        raise UserError(f"teacher '{name}' is not a sentence-transformers model: the multi-teacher stages "
                        "take minilm, lsa, or a sentence-transformers hub id or folder")
    return name


class SentenceTeacher:
    """A loaded sentence-transformers teacher, its input cut to ``max_length`` tokens when its
    own max_seq_length is longer (or unset)."""

    def __init__(self, name: str, model, max_length: int):
        self.name = name
        self.model = model
        own = model.max_seq_length
        self.max_length = effective_max_length(max_length, own) if own else max_length
        model.max_seq_length = self.max_length

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def pipeline(self) -> dict:
        """What makes its vectors what they are besides its name and length limit (the shards'
        identity): each module's class and settings, the default prompt, the dimension, the dtype."""
        modules = [{"type": f"{type(module).__module__}.{type(module).__qualname__}",
                    "config": getattr(module, "get_config_dict", dict)()} for module in self.model]
        prompt_name = self.model.default_prompt_name
        description = {"modules": modules, "prompt": self.model.prompts.get(prompt_name) if prompt_name else None,
                       "dim": self.dim, "dtype": str(next(self.model.parameters()).dtype)}
        return json.loads(json.dumps(description, default=str))  # as the manifest will hold it

    def encode(self, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
        """(N, dim) float32: ``SentenceTransformer.encode`` of the plain texts."""
        vectors = self.model.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                                    convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)


def load_sentence_teacher(name: str, max_length: int, device: torch.device) -> SentenceTeacher:
    """The teacher on ``device``: fp16 on a GPU, as the paper encodes; the CPU keeps fp32
    (fp16 matmuls are slow there)."""
    model = load_sentence_transformer(teacher_source(name), device).eval()
    if device.type == "cuda":
        model.half()
    teacher = SentenceTeacher(name, model, max_length)
    log.info("teacher %s: %s, %d-d, at most %d tokens", name, " -> ".join(type(m).__name__ for m in model),
             teacher.dim, teacher.max_length)
    return teacher
