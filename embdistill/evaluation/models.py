"""Our model kinds and sentence-transformers models as mteb encoders (specs: :mod:`.specs`).

Our kinds (all but ``st``) embed ``format_example(task instruction, text)`` and mean-pool the
text tokens (:meth:`embdistill.teachers.Teacher.encode`); ``st`` models embed the plain text
through their own pipeline (pooling, normalisation), as published. Each encoder's ``tokens``
is what its model reads: the run's max length cut to the model's own limit, for ``st`` models
too unless the spec asks for their own length (:data:`WHOLE_TEXT` for a model without a limit).

Each encoder embeds an input once (:class:`EmbeddingCache`) for every task it serves: the
held-out texts of a task's classification and clustering, the documents of an STS task's
pairs (the Lee corpus: 50 documents in 1,225 pairs). The key is the exact model input: the
instruction-formatted example for our kinds; for ``st`` models the text with the prompt mteb
picks for it (by task and query/document). An ``st`` model whose first module tokenizes with a
fast Hugging Face tokenizer gets each text cut before tokenising, to the same tokens
(:func:`embdistill.input_format.cut_long_texts`), as our kinds do.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ScoringFunction
from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

from ..cli import logger_level
from ..errors import UserError
from ..teachers import Teacher, load_teacher, truncated_copy
from ..input_format import MaxLength, cut_long_texts, format_example
from ..st_modules import SenseReplace, load_sentence_transformer
from .replace import ReplaceModeModel
from .specs import OWN_LENGTH, ModelSpec

log = logging.getLogger("embdistill.evaluation")

WHOLE_TEXT = "whole text"  # the tokens a model without a length limit reads (model2vec's static embeddings)


def _model_meta(spec: ModelSpec, *, n_parameters: int, embed_dim: int, max_tokens: int | None,
                base: ModelMeta | None = None) -> ModelMeta:
    """mteb metadata named ``embdistill/<label>``; the revision is a hash of the spec, so a
    label reused for another model writes to another result folder."""
    update = dict(
        name=f"embdistill/{spec.label}",
        revision=hashlib.sha1(spec.text.encode()).hexdigest()[:12],
        n_parameters=n_parameters,
        embed_dim=embed_dim,
        max_tokens=max_tokens,
        modalities=["text"],
        reference=None,
    )
    if base is not None:
        return base.model_copy(update=update)
    return ModelMeta.create_empty(
        overwrites=dict(update, framework=["PyTorch"], similarity_fn_name=ScoringFunction.COSINE, loader=None)
    )


class EmbeddingCache:
    """One model's embeddings by the input they were computed from (see the module docstring);
    ``computed``: how many inputs the model has embedded."""

    def __init__(self):
        self.vectors: dict[Hashable, np.ndarray] = {}
        self.computed = 0

    def embed(self, keys: Sequence[Hashable], compute: Callable[[list], np.ndarray]) -> np.ndarray:
        """The embeddings of ``keys``, computing those of the keys not seen before (each once)
        with ``compute(new keys)``."""
        new = list(dict.fromkeys(key for key in keys if key not in self.vectors))
        if new:
            self.vectors.update(zip(new, np.asarray(compute(new))))
            self.computed += len(new)
        return np.stack([self.vectors[key] for key in keys])


class TeacherEncoder(AbsEncoder):
    """One of our models (plain or replace mode) as an mteb encoder.

    ``instructions`` maps an mteb task name to the instruction its texts are formatted with.
    ``max_length`` is what the model reads: the run's cut to the model's own limit (an exported
    student's: the length it was trained at), by :func:`load_encoder`."""

    def __init__(self, spec: ModelSpec, model: Teacher, instructions: Mapping[str, str], *,
                 batch_size: int, max_length: int, dictionary_values: int = 0):
        self.spec = spec
        self.model = model
        self.instructions = dict(instructions)
        self.batch_size = batch_size
        self.max_length = max_length
        self.n_parameters = sum(p.numel() for p in model.model.parameters())
        self.dictionary_values = dictionary_values
        self.mteb_model_meta = _model_meta(spec, n_parameters=self.n_parameters,
                                           embed_dim=model.hidden_size, max_tokens=self.max_length)
        self.cache = EmbeddingCache()

    @property
    def tokens(self) -> int:
        """The tokens each text is cut to (the table's column; ``PlainTextEncoder`` has its own)."""
        return self.max_length

    def _examples(self, texts: Sequence[str], task_name: str) -> list[str]:
        instruction = self.instructions[task_name]
        return [format_example(instruction, text) for text in texts]

    def _encode_examples(self, examples: Sequence[str]) -> np.ndarray:
        return self.model.encode(examples, self.batch_size, self.max_length, progress=True)

    def embed(self, texts: Sequence[str], task_name: str) -> np.ndarray:
        """Embed ``texts`` now (no cache: what throughput times)."""
        return self._encode_examples(self._examples(texts, task_name))

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs: Any) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        return self.cache.embed(self._examples(texts, task_metadata.name), self._encode_examples)


class PlainTextEncoder(SentenceTransformerEncoderWrapper):
    """A sentence-transformers model as mteb wraps it, renamed to its row label, reading at
    most ``max_length`` tokens (None: its own max_seq_length; :func:`cut_to_length`).

    ``prompt_tasks``: each evaluated mteb task's name -> the folder name of the task whose
    students serve it (``--student-of``). A task set's student has one prompt per member task,
    under the member's folder name (mteb's own task name for tasks 1-16 and the offline tasks);
    mteb keeps only prompts named after tasks it has registered, and a local task is evaluated
    as several mteb tasks (``bbc-news-clustering``), so each evaluated task gets its task's
    prompt here, by the name mteb then passes."""

    def __init__(self, spec: ModelSpec, model, *, batch_size: int, max_length: int | None,
                 prompt_tasks: Mapping[str, str] = {}):
        # An exported student's default prompt is named "task", which is no mteb task or prompt
        # type: mteb warns (twice, with its list of every task type) that it ignores the name,
        # while the SentenceTransformer still applies its default prompt (tests/test_export.py:
        # the folder's embeddings == the evaluation's); and mteb 2.26 calls sentence-transformers
        # 6's renamed get_sentence_embedding_dimension. Nothing for a user to act on.
        with logger_level("mteb.models", logging.ERROR), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some prompts are not in the expected format")
            warnings.filterwarnings("ignore", message="Task name .* is not valid")
            warnings.filterwarnings("ignore", message="The `get_sentence_embedding_dimension` method")
            super().__init__(model)
        own = model.prompts or {}
        by_task = {name: own[folder] for name, folder in prompt_tasks.items() if folder in own}
        if by_task:
            self.model_prompts = {**(self.model_prompts or {}), **by_task}
        self.spec = spec
        self.batch_size = batch_size
        self.tokens = cut_to_length(model, max_length, spec.label)
        # a module whose weights are not torch parameters (the ONNX encoder) counts its own
        self.n_parameters = (sum(p.numel() for p in model.parameters())
                             + sum(getattr(module, "n_parameters", 0) for module in model))
        # a replace-mode folder's sense dictionary is counted apart, as a replace: row counts it
        self.dictionary_values = sum(module.senses.n_values for module in model if isinstance(module, SenseReplace))
        self.mteb_model_meta = _model_meta(
            spec, n_parameters=self.n_parameters, embed_dim=model.get_embedding_dimension(),
            max_tokens=None if self.tokens == WHOLE_TEXT else self.tokens, base=self.mteb_model_meta)
        self.cache = EmbeddingCache()
        tokenizer = getattr(model[0], "tokenizer", None)
        # a tokenizer that reads a fixed number of tokens and gives character offsets can be
        # handed a cut text (model2vec's tokenizers.Tokenizer gives none in this form)
        self.cut_tokenizer = tokenizer if self.tokens != WHOLE_TEXT and getattr(tokenizer, "is_fast", False) else None

    def cut(self, texts: Sequence[str]) -> list[str]:
        """``texts`` cut to prefixes that give the model the same tokens (see the module docstring)."""
        if self.cut_tokenizer is None:
            return list(texts)
        return cut_long_texts(self.cut_tokenizer, texts, self.tokens)

    def embed(self, texts: Sequence[str], task_name: str) -> np.ndarray:
        """Embed ``texts`` now (no cache: what throughput times)."""
        return self.model.encode(self.cut(texts), batch_size=self.batch_size, convert_to_numpy=True)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs: Any) -> np.ndarray:
        """mteb's encoding of the texts not embedded before under the same prompt."""
        from datasets import Dataset
        from torch.utils.data import DataLoader

        texts = [text for batch in inputs for text in batch["text"]]
        prompt = (prompt_type, self.get_prompt_name(task_metadata, prompt_type))

        def encode_new(keys: list) -> np.ndarray:
            new = DataLoader(Dataset.from_dict({"text": self.cut([text for _, text in keys])}),
                             batch_size=self.batch_size)
            return super(PlainTextEncoder, self).encode(new, task_metadata=task_metadata, hf_split=hf_split,
                                                        hf_subset=hf_subset, prompt_type=prompt_type, **kwargs)

        return self.cache.embed([(prompt, text) for text in texts], encode_new)


def cut_to_length(model, max_length: int | None, label: str) -> int | str:
    """Make a SentenceTransformer read at most ``max_length`` tokens (None: as many as it reads
    itself) and return how many it reads, :data:`WHOLE_TEXT` when it has no limit. A model with
    a limit keeps the smaller of the two (its ``max_seq_length``); one without (model2vec's
    static embeddings, whose max_seq_length is infinite) gets its tokenizer cut, which then
    holds its limit."""
    own = model.max_seq_length
    if own is not None and own != math.inf:
        if max_length is not None and max_length < own:
            model.max_seq_length = max_length
        return int(model.max_seq_length)
    tokenizer = getattr(model[0], "tokenizer", None)
    if not hasattr(tokenizer, "enable_truncation"):  # not a tokenizers.Tokenizer (StaticEmbedding's)
        if max_length is None:
            return WHOLE_TEXT
        raise UserError(f"model {label}: {type(model[0]).__name__} has no length limit that can be set to "
                        f"{max_length} tokens; read it whole with st:MODEL{OWN_LENGTH}")
    own = (tokenizer.truncation or {}).get("max_length")
    if max_length is not None and (own is None or max_length < own):
        tokenizer.enable_truncation(max_length)
        own = max_length
    return WHOLE_TEXT if own is None else own


Encoder = TeacherEncoder | PlainTextEncoder


def load_encoder(spec: ModelSpec, instructions: Mapping[str, str], *, device, batch_size: int,
                 max_length: int, loaded: dict[str, Teacher] | None = None,
                 allow_max_length_mismatch: bool = False, dictionary=None,
                 prompt_tasks: Mapping[str, str] = {}) -> Encoder:
    """Load the model of ``spec`` and wrap it for mteb. ``loaded`` caches models by target,
    so that a model in plain and in replace mode loads once. A replace-mode dictionary picks
    senses by the rule its manifest records, and must have been gathered with the length the
    model reads, ``max_length`` cut to its limit (unless ``allow_max_length_mismatch``), and the
    model's input format. ``dictionary``: the spec's, opened by the caller
    (:class:`~embdistill.senses.dictionary.SenseDictionary`), else opened here.
    ``prompt_tasks``: an ``st`` model's (:class:`PlainTextEncoder`)."""
    if spec.kind == "st":
        return PlainTextEncoder(spec, load_sentence_transformer(spec.target, device), batch_size=batch_size,
                                max_length=None if spec.own_length else max_length, prompt_tasks=prompt_tasks)
    loaded = {} if loaded is None else loaded
    if spec.target not in loaded:
        loaded[spec.target] = load_teacher(spec.target, device=device)
    model = loaded[spec.target]
    dictionary_values = 0
    if spec.n_layers:  # untrained:MODEL@N, replace:MODEL@N@DICT
        model = untrained_student(model, spec.n_layers)
    length = MaxLength.of(max_length, model.max_seq_length)
    if spec.kind == "replace":
        from ..senses.dictionary import SenseDictionary

        dictionary = dictionary or SenseDictionary.open(spec.sense_dict)
        dictionary.check_gathered_with(length, model.input_format.name, allow_max_length_mismatch)
        model = ReplaceModeModel(model, dictionary.packed(model.vocab_size, hidden_size=model.hidden_size))
        dictionary_values = model.senses.n_values
    return TeacherEncoder(spec, model, instructions, batch_size=batch_size, max_length=length.used,
                          dictionary_values=dictionary_values)


def untrained_student(teacher: Teacher, n_layers: int) -> Teacher:
    """The teacher's first ``n_layers`` layers (``truncated_copy``, as SKD's student starts),
    frozen; tokenised and pooled as the teacher is."""
    student = copy.copy(teacher)
    student.model = truncated_copy(teacher, n_layers).eval().requires_grad_(False)
    student.name, student.slug = f"{teacher.name}@{n_layers}", f"{teacher.slug}-first{n_layers}"
    return student


def measure_throughput(encoder: Encoder, texts: Sequence[str], task_name: str) -> float:
    """Texts per second embedding ``texts`` (after one warm-up batch, which loads kernels and
    fills caches); the same texts for every model of a run."""
    texts = list(texts)
    encoder.embed(texts[: encoder.batch_size], task_name)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    encoder.embed(texts, task_name)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(texts) / (time.perf_counter() - start)
