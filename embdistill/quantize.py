"""The int8 student: an exported student's SentenceTransformer folder (``export/st``) as ONNX with
int8 weights, written as another SentenceTransformer folder (``export/st-int8``).

sentence-transformers' own route (``export_dynamic_quantized_onnx_model``) runs through optimum,
which does not install beside transformers 5 (optimum-onnx needs transformers < 4.58,
optimum-intel a different torch); this is the same recipe with torch's exporter and onnxruntime:

* the encoder (the folder's first module, sentence-transformers' ``Transformer``) exported with
  ``torch.onnx.export`` (batch size and length dynamic), inputs named as its tokenizer's outputs,
  output the final token states. With eager attention and the TorchScript exporter: that graph
  is the one onnxruntime's transformer optimizer knows how to fuse (the dynamo exporter's
  graph of the same model, eager or SDPA attention, kept attention unfused);
* the graph fused by ``onnxruntime.transformers.optimizer`` (``model_type="bert"``): each
  layer's attention one ``Attention`` op, LayerNorm + residual ``SkipLayerNormalization``, bias
  + GELU ``BiasGelu``, the embeddings ``EmbedLayerNormalization``; the attention mask read
  as given (the optimizer's BERT default reduces it to lengths: right padding only). The
  unfused int8 graph spent a quarter of its time in the masking and transposes around
  attention; fused and quantised (``QAttention``), the 2-layer MiniLM student's encoder ran
  2.45x (1 thread) and 2.61x (2 threads) the torch fp32 encoder's texts/s on bbc-news, against
  2.1-2.3x unfused (BENCHMARKS.md, "Fused graph"). :func:`check_fused` compares the fused
  graph with the torch encoder at every export;
* its weights quantised by ``onnxruntime.quantization.quantize_dynamic``: int8 weights with one
  scale per output channel, activations quantised at run time with one scale per run, and
  :class:`~embdistill.st_modules.OnnxEncoder` runs each text alone: its embedding does not
  depend on the batch it is in (one run over a whole batch moved a text's embedding by up to
  0.04 with its batch-mates). Per channel because one scale per tensor costs accuracy: on the
  2-layer MiniLM student it moved pooled embeddings to cosine 0.971 with the fp32 ones (the
  lowest of 64 bbc-news texts), per channel 0.998. Static quantisation (``quantize_static``,
  activation scales calibrated on training texts) was measured instead and kept 0.8-1.35x the
  torch encoder's speed only: its QDQ graph left the fused ops and activations in float;
* our :class:`~embdistill.st_modules.OnnxEncoder` as the first module, followed by the fp32
  folder's own modules (Pooling, Normalize) and prompts, so the folder embeds as ``export/st``
  does: ``SentenceTransformer(export/st-int8, trust_remote_code=True).encode(texts)``;
* the folder as written checked against ``export/st`` (:func:`check_folder`): pooled cosine on
  the task's training texts, each alone and all in one batch, at least ``min_cosine``
  (:data:`MIN_COSINE`), or nothing is written.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .artifacts import replacing_folder
from .cli import logger_level
from .errors import MODEL_LOAD_ERRORS, UserError, first_line

log = logging.getLogger("embdistill.quantize")

# --weight-type: onnxruntime's weight type, or None: the fp32 export unquantised (which checks
# the export itself: it must embed as the torch model does)
WEIGHT_TYPES = ("qint8", "quint8", "none")

# The lowest pooled cosine to export/st that an exported folder may give a training text. The
# recipe gives the 2-layer MiniLM student 0.998-0.999; one weight scale per tensor, the recipe
# turned down for its accuracy, 0.971-0.976, and larger tiny students (DistilBERT, RoBERTa,
# ELECTRA, MPNet) fell to 0.980: 0.99 lets the first through and refuses the others.
MIN_COSINE = 0.99
# Training texts the check embeds (each alone, then all in one batch): a few seconds
CHECK_TEXTS = 64


class _TokenStates(nn.Module):
    """The encoder as a function of its tokenizer's tensors, in ``names`` order, to its final
    token states (what the exporter traces)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).last_hidden_state


def export_onnx(model: nn.Module, tokenizer, path: Path) -> list[str]:
    """Export ``model`` (a transformers encoder) to ``path`` with eager attention (see the
    module docstring); returns its input names: those of the tokenizer's outputs that the
    model takes. The model is left in eval mode, with the attention implementation it had (the
    exporter puts the module it is given, the wrapper, back in that module's mode, and the
    wrapper's mode is its children's: a wrapper left training would leave the encoder
    training, dropout on)."""
    accepted = inspect.signature(model.forward).parameters
    names = [name for name in tokenizer.model_input_names if name in accepted]
    example = tokenizer(["a short text", "a longer text, so that the first one is padded"],
                        padding=True, return_tensors="pt")
    axes = {0: "batch", 1: "length"}
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        torch.onnx.export(_TokenStates(model, names).eval(), tuple(example[name] for name in names), str(path),
                          input_names=names, output_names=["token_embeddings"], dynamo=False,
                          dynamic_axes={name: axes for name in [*names, "token_embeddings"]}, opset_version=17)
    finally:
        model.set_attn_implementation(attention)
    return names


def fuse_encoder(path: Path, out: Path, config) -> dict[str, int]:
    """Write ``path``'s graph fused by onnxruntime's transformer optimizer (see the module
    docstring) to ``out``; returns the fused operators' counts (those > 0)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    # the attention mask as it is: the optimizer's BERT default turns it into each text's
    # length, which is only right for a tokenizer that pads on the right
    options.use_raw_attention_mask(True)
    fused = optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                           hidden_size=config.hidden_size, optimization_options=options)
    fused.save_model_to_file(str(out))
    return {op: n for op, n in fused.get_fused_operator_statistics().items() if n}


def check_fused(path: Path, model: nn.Module, tokenizer, names: list[str], max_length: int) -> None:
    """UserError unless the fused fp32 graph at ``path`` gives ``model``'s token states on a
    check batch (texts of several lengths, one cut at ``max_length``, padded on the
    tokenizer's side): a fusion that does not fit an architecture would otherwise export a
    model that embeds wrongly without a word."""
    import onnxruntime

    texts = ["short", "a text of middling length, with some punctuation; and more words",
             " ".join(["a long text that the tokenizer cuts"] * 64)]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    architecture = type(model).__name__
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # the exporter drops an input that the traced model ignores (DeBERTa-v2: token_type_ids)
    dropped = sorted(set(names) - {graph_input.name for graph_input in session.get_inputs()})
    if dropped:
        raise UserError(f"the ONNX graph of {architecture} does not take {', '.join(dropped)}, which its "
                        "tokenizer gives: the int8 export takes BERT-like students")
    try:
        got = session.run(None, {name: batch[name].numpy() for name in names})[0]
    except Exception as exc:  # onnxruntime raises its own types (InvalidArgument, Fail, ...)
        raise UserError(f"onnxruntime cannot run the ONNX graph of {architecture} ({first_line(exc)}): "
                        "the int8 export takes BERT-like students") from None
    with torch.inference_mode():
        expected = model(**{name: batch[name] for name in names}).last_hidden_state.numpy()
    attended = batch["attention_mask"].numpy().astype(bool)
    difference = float(abs(got - expected)[attended].max())
    if difference > 1e-3:
        raise UserError(f"the fused ONNX graph of {architecture} disagrees with the torch model "
                        f"(token states differ by up to {difference:.2g}): this architecture is not one "
                        "onnxruntime's BERT fusions fit")


def load_student(st_dir: str | Path):
    """The fp32 SentenceTransformer folder that :func:`quantize_student` exports; UserError when
    it is missing, does not load, or does not start with sentence-transformers' Transformer."""
    from sentence_transformers import SentenceTransformer

    st_dir = Path(st_dir)
    if not (st_dir / "modules.json").is_file():
        raise UserError(f"no SentenceTransformer folder at {st_dir} (no modules.json): train the student first")
    try:
        fp32 = SentenceTransformer(str(st_dir), device="cpu")
    except MODEL_LOAD_ERRORS as exc:
        raise UserError(f"could not load {st_dir}: {first_line(exc)}") from None
    if not hasattr(fp32[0], "auto_model"):
        raise UserError(f"{st_dir}: its first module is {type(fp32[0]).__name__}; the int8 export takes "
                        "a folder that starts with sentence-transformers' Transformer (a BERT-like student)")
    return fp32


def check_folder(folder: Path, fp32, texts: list[str], min_cosine: float) -> dict[str, float]:
    """The lowest pooled cosine between ``folder``'s embeddings of ``texts`` and ``fp32``'s, the
    texts embedded each alone and all in one batch (``{"batch 1": .., "batch N": ..}``);
    UserError naming the figure when one is below ``min_cosine``."""
    from sentence_transformers import SentenceTransformer

    exported = SentenceTransformer(str(folder), device="cpu", trust_remote_code=True)
    expected = fp32.encode(texts, batch_size=len(texts), normalize_embeddings=True)
    lowest = {}
    for batch_size in (1, len(texts)):
        got = exported.encode(texts, batch_size=batch_size, normalize_embeddings=True)
        lowest[f"batch {batch_size}"] = round(float((got * expected).sum(1).min()), 5)
    worst = min(lowest, key=lowest.get)
    if lowest[worst] < min_cosine:
        raise UserError(f"the exported folder embeds a training text at pooled cosine {lowest[worst]:.4f} to "
                        f"export/st ({worst}, lowest of {len(texts)}), below --min-cosine {min_cosine}: not written")
    return lowest


def quantize_student(fp32, out_dir: str | Path, check_texts: list[str], *, weight_type: str = "qint8",
                     min_cosine: float = MIN_COSINE) -> dict:
    """Write ``out_dir``, ``fp32``'s model (:func:`load_student`) with its encoder in ONNX, its
    weights quantised (``weight_type``, one of :data:`WEIGHT_TYPES`), built beside it, checked
    on ``check_texts`` (:func:`check_folder`) and moved into place; returns ``seconds`` (export,
    quantisation and check), the ONNX file's ``bytes``, the fused ops and the check's cosines."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from sentence_transformers import SentenceTransformer

    from .st_modules import ONNX_FILE, OnnxEncoder

    if weight_type not in WEIGHT_TYPES:
        raise UserError(f"unknown weight type {weight_type!r}: choose one of {', '.join(WEIGHT_TYPES)}")
    out_dir, encoder = Path(out_dir), fp32[0]
    start = time.perf_counter()
    with replacing_folder(out_dir) as building, tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        module_dir = Path(tmp) / "encoder"
        module_dir.mkdir()
        encoder.tokenizer.save_pretrained(str(module_dir))
        exported, fused = Path(tmp) / "exported.onnx", Path(tmp) / "fused.onnx"
        # the exporter warns about its deprecation and the axis names it merges, the optimizer
        # and quantize_dynamic log on the root logger (each fusion, each MatMul left in float,
        # advice about pre-processing): nothing a user can act on
        with logger_level("torch.onnx", logging.ERROR), logger_level("", logging.ERROR), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # the tracer's one warning on a BERT is about the mask's padding length (key length
            # - mask length), 0 for an encoder at any length: the constant it records holds
            # (any other is shown; check_fused checks the graph in any case)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="transformers.masking_utils")
            names = export_onnx(encoder.auto_model, encoder.tokenizer, exported)
            fused_ops = fuse_encoder(exported, fused, encoder.auto_model.config)
            check_fused(fused, encoder.auto_model, encoder.tokenizer, names, fp32.max_seq_length)
            if weight_type == "none":
                shutil.copyfile(fused, module_dir / ONNX_FILE)
            else:
                # the fused graph's com.microsoft ops have no ONNX shape inference: their
                # outputs' element type is named
                quantize_dynamic(str(fused), str(module_dir / ONNX_FILE), per_channel=True,
                                 weight_type={"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[weight_type],
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        onnx_encoder = OnnxEncoder(module_dir, max_seq_length=fp32.max_seq_length,
                                   n_parameters=sum(p.numel() for p in encoder.auto_model.parameters()))
        SentenceTransformer(modules=[onnx_encoder, *list(fp32)[1:]], device="cpu", prompts=fp32.prompts,
                            default_prompt_name=fp32.default_prompt_name).save(str(building))
        cosine = check_folder(building, fp32, check_texts, min_cosine)
    seconds = time.perf_counter() - start
    size = next(out_dir.rglob(ONNX_FILE)).stat().st_size
    log.info("int8 export: %s (%s weights, fused %s, %.1f MB ONNX, pooled cosine to export/st at least %s, "
             "%.1f s)", out_dir, weight_type, ", ".join(f"{n} {op}" for op, n in fused_ops.items()) or "nothing",
             size / 1e6, min(cosine.values()), seconds)
    return {"seconds": round(seconds, 2), "bytes": size, "fused_ops": fused_ops, "cosine_to_fp32": cosine}
