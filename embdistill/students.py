"""The SKD student: the teacher's first layers, its training objective, and its export.

As in the paper (arXiv 2504.06036) the student is the teacher's first L layers (embeddings,
layers 0..L-1 and the final norm), initialised from the teacher and fully trained; an LLM2Vec
student stays bidirectional. It is trained on the teacher's token states, computed on the fly
by the frozen teacher (:class:`TokenDistillation`), and exported twice:

* ``export/hf/``: a transformers model folder with the tokenizer, which
  ``embdistill.teachers.load_teacher(export/"hf")`` loads (token states, replace-mode
  evaluation, a later distillation);
* ``export/st/``: a SentenceTransformer folder (that model, mean pooling, Normalize when the
  teacher normalises), which ``SentenceTransformer(export/"st")`` loads; for an LLM2Vec student
  sentence-transformers builds a causal Llama from it (a warning says so), so use ``hf/``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from .artifacts import output_lock
from .distributed import DistEnv
from .errors import UserError
from .losses import SenseLoss, masked_mse
from .teachers import BidirectionalLlamaModel, Teacher, truncated_copy
from .training import LossOutput, non_finite_parameters

log = logging.getLogger("embdistill.students")


def default_student_layers(teacher: Teacher) -> int:
    """4 layers for a Llama-shaped (LLM2Vec) teacher, as in the paper; 2 for an encoder."""
    return 4 if teacher.model.config.model_type == "llama" else 2


def build_student(teacher: Teacher, n_layers: int | None = None) -> nn.Module:
    """The teacher's first ``n_layers`` layers (default :func:`default_student_layers`), in
    float32 (the optimiser needs float32 weights: an update of lr 5e-6 vanishes in bf16),
    on the teacher's device, in training mode."""
    student = truncated_copy(teacher, n_layers or default_student_layers(teacher)).float().train()
    # BERT's pooler is not on the token-state path: it would get no gradient, which DDP
    # refuses; frozen, it is exported as the teacher's.
    pooler = getattr(student, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)
    return student


def default_teacher_device(student_device: torch.device, env: DistEnv, local_world_size: int) -> torch.device:
    """The teacher's own GPU when the node has a spare one per rank (GPU local_rank +
    local_world_size), else the student's device."""
    if student_device.type == "cuda":
        spare = env.local_rank + local_world_size
        if spare < torch.cuda.device_count():
            return torch.device("cuda", spare)
    return student_device


class TokenDistillation:
    """The SKD objective, a ``loss_fn`` for :class:`embdistill.training.Trainer`: the
    student's final token states against the frozen teacher's, at the text tokens, by the
    sense loss (``sense_loss`` given) or by mean squared error (``sense_loss=None``)."""

    def __init__(self, teacher: Teacher, sense_loss: SenseLoss | None = None):
        self.teacher = teacher
        self.sense_loss = sense_loss

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        student_states = student.last_hidden_state
        teacher_states = self.teacher.token_states(batch).to(student_states.device)
        if self.sense_loss is None:
            loss, count = masked_mse(student_states, teacher_states, batch["embed_mask"])
            return LossOutput(loss, count, {})
        loss, accuracy, count = self.sense_loss(
            student_states, teacher_states, batch["input_ids"], batch["embed_mask"]
        )
        return LossOutput(loss, count, {"sense_accuracy": accuracy})


def sentence_transformer_modules():
    """sentence-transformers' module classes (Transformer, Pooling, Normalize, Dense, BoW...),
    wherever this version keeps them."""
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    return modules


def export_student(student: nn.Module, tokenizer, out_dir: str | Path, *, normalize: bool,
                   max_seq_length: int | None = None, pooling: str = "mean") -> Path:
    """Write ``out_dir/hf`` and ``out_dir/st`` (see the module docstring) and return ``out_dir``.

    Built in a temporary folder beside ``out_dir`` and moved into place, so that ``out_dir``
    is either the previous export or the complete new one. The SentenceTransformer is built
    from the saved hf folder (not by assigning ``auto_model``, which sentence-transformers 6
    ignores when saving), so both folders hold the same weights."""
    out_dir = Path(out_dir)
    diverged = non_finite_parameters(student)
    if diverged:
        raise UserError(f"not exporting to {out_dir}: the student's parameters are not finite "
                        f"({', '.join(diverged[:3])}); try a lower --lr or --max-grad-norm")
    with output_lock(out_dir):
        _build_export(student, tokenizer, out_dir, normalize=normalize, max_seq_length=max_seq_length,
                      pooling=pooling)
    log.info("exported the student to %s (hf/, st/)", out_dir)
    return out_dir


def _build_export(student: nn.Module, tokenizer, out_dir: Path, *, normalize: bool,
                  max_seq_length: int | None, pooling: str) -> None:
    from sentence_transformers import SentenceTransformer

    building = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(building, ignore_errors=True)
    hf_dir = building / "hf"
    student.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    modules = sentence_transformer_modules()
    transformer = modules.Transformer(str(hf_dir), max_seq_length=max_seq_length)
    # "mean" (SKD, and the multi-teacher default) or "cls" (the arctic-embed students)
    pipeline = [transformer, modules.Pooling(student.config.hidden_size, pooling)]
    if normalize:
        pipeline.append(modules.Normalize())
    SentenceTransformer(modules=pipeline, device="cpu").save(str(building / "st"))
    if isinstance(student, BidirectionalLlamaModel):
        log.warning("sentence-transformers loads %s/st as a causal Llama (it has no bidirectional "
                    "Llama class); embdistill.teachers.load_teacher(%s/hf) loads the bidirectional student",
                    out_dir, out_dir)

    previous = out_dir.with_name(f".{out_dir.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(previous)
    building.rename(out_dir)
    shutil.rmtree(previous, ignore_errors=True)

