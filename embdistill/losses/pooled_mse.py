"""The squared distance between the student's and the teacher's sentence embeddings.

SKD's sense loss is per token: nothing in it asks the student's pooled sentence embedding (what
its exported SentenceTransformer folder emits) to keep the teacher's geometry. This term does.
For a text x read as the export reads it (the task's instruction as its prompt, left out of the
pooling), with h_i the final token states and T(x) the text tokens (the embed mask):

    m(x) = 1/|T(x)| sum_{i in T(x)} h_i
    e(x) = m(x) / ||m(x)||          when the teacher normalises (MiniLM), else m(x)

    loss = 1/B sum_b || e_student(x_b) - e_teacher(x_b) ||^2
         = torch.nn.functional.mse_loss(e_student, e_teacher, reduction="sum") / B

e_student is the student's (:func:`~embdistill.teachers.sentence_embedding`, the export's
``Pooling`` and ``Normalize``); e_teacher the whole teacher's, of the same tokens
(:meth:`~embdistill.teachers.Teacher.sentence_embeddings`, as :meth:`Teacher.encode` embeds).
The squares are summed over the d dimensions, not averaged: for unit vectors the loss is
2 - 2 cos(e_student, e_teacher), in [0, 4] whatever d, the scale of the sense cross-entropy
that ``--loss sense-pooled`` adds it to; averaged over MiniLM's 384 dimensions it would be 384
times smaller and a sentence weight of 1 would leave it almost no say.
"""

from __future__ import annotations

import torch


def pooled_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The loss above (float32): ``student``, ``teacher`` (B, d) sentence embeddings."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be the same (B, d)")
    return (student.float() - teacher.float()).pow(2).sum(-1).mean()
