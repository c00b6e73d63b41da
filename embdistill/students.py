"""The SKD student: the teacher's first layers, and its export.

As in the paper (arXiv 2504.06036) the student is the teacher's first L layers (embeddings,
layers 0..L-1 and the final norm), initialised from the teacher and fully trained; an LLM2Vec
student stays bidirectional. It is trained by an objective of :mod:`embdistill.objectives`
(SKD's sense loss on stored targets, or the MSE ablation on the teacher's token states), and
exported:

* ``export/hf/``: a transformers model folder with the tokenizer, which
  ``embdistill.teachers.load_teacher(export/hf)`` loads (token states, replace-mode
  evaluation, a later distillation);
* ``export/st/``: a SentenceTransformer folder that embeds as the evaluation scored the
  student: the task's instruction as its default prompt (a task set's student: one prompt per
  member task, keyed by the task's name as mteb passes it), the text tokens mean-pooled,
  normalised when the teacher normalises. A MiniLM-like student is a standard folder
  (``SentenceTransformer(export/"st")``); an LLM2Vec student's names our module, which loads
  it bidirectional and reads llm2vec's input (``trust_remote_code=True`` on
  sentence-transformers 6, embdistill installed);
* ``export/st-replace/`` (SKD): the same with replace mode, the dictionary in safetensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .artifacts import replacing_folder
from .distributed import DistEnv
from .errors import UserError
from .paths import HF_FOLDER, ST_FOLDER, ST_REPLACE_FOLDER
from .senses.packed import PackedSenses
from .teachers import Teacher, position_limit, save_reading, truncated_copy
from .input_format import PLAIN, SEPARATOR, InputFormat, format_example
from .training import non_finite_parameters

log = logging.getLogger("embdistill.students")


def default_student_layers(model_type: str) -> int:
    """4 layers for a Llama-shaped (LLM2Vec) teacher, as in the paper; 2 for an encoder."""
    return 4 if model_type == "llama" else 2


def build_student(teacher: Teacher, n_layers: int | None = None) -> nn.Module:
    """The teacher's first ``n_layers`` layers (default :func:`default_student_layers`), in
    float32 (the optimiser needs float32 weights: an update of lr 5e-6 vanishes in bf16),
    on the teacher's device, in training mode."""
    student = truncated_copy(teacher, n_layers or default_student_layers(teacher.model.config.model_type)).float().train()
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


def sentence_transformer_modules():
    """sentence-transformers' module classes (Transformer, Pooling, Normalize, Dense, BoW...),
    wherever this version keeps them."""
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    return modules


def save_hf(student: nn.Module, tokenizer, folder: str | Path, *, input_format: InputFormat,
            normalize: bool, max_seq_length: int) -> Path:
    """A transformers model folder that :func:`embdistill.teachers.load_teacher` reads as the
    student was trained: weights, tokenizer, input format, normalisation and the tokens per
    example it was trained at (``max_seq_length``: its evaluation reads no more)."""
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_reading(folder, input_format, normalize, max_seq_length)
    return Path(folder)


def export_student(student: nn.Module, tokenizer, out_dir: str | Path, *, normalize: bool,
                   max_seq_length: int | None = None, pooling: str = "mean",
                   input_format: InputFormat = PLAIN, instruction: str | Mapping[str, str] = "",
                   senses: PackedSenses | None = None) -> Path:
    """Write ``out_dir/hf``, ``out_dir/st`` and, given ``senses``, ``out_dir/st-replace`` (see
    the module docstring) and return ``out_dir``.

    ``max_seq_length``: the tokens per example the student was trained at (default: its
    position limit), recorded in every folder, so that each reads as many.
    The SentenceTransformer folders embed as the evaluation does: ``instruction`` is their
    default prompt (a mapping, task name -> instruction: a task set's student, one prompt per
    task under the task's name, which mteb selects by the task it evaluates; no default), only the text tokens are pooled (a standard pipeline for the plain input
    format; our :class:`~embdistill.st_modules.Encoder` for llm2vec's, which also keeps an LLM2Vec
    student bidirectional), normalised when the teacher normalises; ``st-replace`` adds
    :class:`~embdistill.st_modules.SenseReplace` (replace mode) before the pooling.
    A student whose parameters are not finite is refused. Built in a temporary folder beside
    ``out_dir`` (one writer at a time) and moved into place, so that ``out_dir`` is either the
    previous export or the complete new one. The SentenceTransformer is built from the saved hf
    folder (not by assigning ``auto_model``, which sentence-transformers 6 ignores when saving),
    so every folder holds the same weights."""
    out_dir = Path(out_dir)
    diverged = non_finite_parameters(student)
    if diverged:
        raise UserError(f"not exporting to {out_dir}: the student's parameters are not finite "
                        f"({', '.join(diverged[:3])}); try a lower --lr or --max-grad-norm")
    max_seq_length = max_seq_length or position_limit(student.config)
    with replacing_folder(out_dir) as building:
        _build_export(student, tokenizer, building, normalize=normalize, max_seq_length=max_seq_length,
                      pooling=pooling, input_format=input_format, instruction=instruction, senses=senses)
    log.info("exported the student to %s (%s)", out_dir, ", ".join(sorted(p.name + "/" for p in out_dir.iterdir())))
    return out_dir


def _build_export(student: nn.Module, tokenizer, building: Path, *, normalize: bool,
                  max_seq_length: int, pooling: str, input_format: InputFormat,
                  instruction: str | Mapping[str, str], senses: PackedSenses | None) -> None:
    from sentence_transformers import SentenceTransformer

    from .st_modules import Encoder, SenseReplace

    hf_dir = save_hf(student, tokenizer, building / HF_FOLDER, input_format=input_format, normalize=normalize,
                     max_seq_length=max_seq_length)
    modules = sentence_transformer_modules()
    if input_format.llm2vec:  # our encoder reads whole examples: the prompt keeps the separator
        first = Encoder(hf_dir, max_seq_length)
        pool = modules.Pooling(student.config.hidden_size, "mean")
    else:  # sentence-transformers' own prompt rule, which the plain format follows
        first = modules.Transformer(str(hf_dir), max_seq_length=max_seq_length)
        # "mean" (SKD, and the multi-teacher default) or "cls" (the arctic-embed students)
        pool = modules.Pooling(student.config.hidden_size, pooling, include_prompt=False)
    tail = [pool, modules.Normalize()] if normalize else [pool]
    if isinstance(instruction, str):
        prompt = _prompt(instruction, input_format)
        prompts = {"prompts": {"task": prompt}, "default_prompt_name": "task"} if prompt else {}
    else:
        prompts = {"prompts": {task: _prompt(text, input_format) for task, text in instruction.items()}}
    SentenceTransformer(modules=[first, *tail], device="cpu", **prompts).save(str(building / ST_FOLDER))
    if senses is not None:
        replace = SenseReplace(senses.cpu())
        SentenceTransformer(modules=[first, replace, *tail], device="cpu",
                            **prompts).save(str(building / ST_REPLACE_FOLDER))


def _prompt(instruction: str, input_format: InputFormat) -> str:
    """The SentenceTransformer prompt of an instruction: the example's prefix (our llm2vec
    encoder reads whole examples, separator included), else sentence-transformers' own rule,
    which the plain format follows (the instruction and a space); "" for none."""
    example_prompt = format_example(instruction, "") if instruction.strip() else ""
    return example_prompt if input_format.llm2vec else example_prompt.partition(SEPARATOR)[0]
