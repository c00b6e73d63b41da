"""Our sentence-transformers modules, named in exported folders where the standard ones do not
embed as our evaluation does (an exported folder must give the embeddings its table scored).

* :class:`Encoder`: an LLM2Vec student (or any model folder :func:`load_teacher` reads): the
  model loaded bidirectional, the input in its format (llm2vec's chat turn, left padding, last-n
  embed mask; :mod:`embdistill.input_format`). It outputs ``token_embeddings`` and sets
  ``attention_mask`` to the embed mask, so that the standard ``Pooling`` (mean) that follows
  pools the text tokens only, as llm2vec does (``skip_instruction``).
* :class:`SenseReplace`: replace mode as a module: each attended token with a dictionary entry
  takes its sense under the dictionary's rule (:meth:`PackedSenses.replace`); the dictionary is
  stored beside it as safetensors, not as a pickle, its rule in the file's metadata (a file
  without one, written before the rule was an option, is ``dot``). Tokens that pooling leaves out (the prompt) may be replaced
  too: they do not reach the embedding.
* :class:`OnnxEncoder`: an ONNX export of an encoder (the int8 student,
  :mod:`embdistill.quantize`) run by onnxruntime: it tokenizes as sentence-transformers'
  ``Transformer`` does and outputs ``token_embeddings``, so that the fp32 folder's ``Pooling`` and
  ``Normalize`` follow it unchanged. Each text runs alone, without padding: a dynamically
  quantised graph computes one activation scale per run, so in a batch a text's embedding
  would depend on its batch-mates.

All are plain modules (``save(path)``, ``load(path)``, ``tokenize(texts)``), which
sentence-transformers 5 and 6 load; sentence-transformers 6 asks ``trust_remote_code=True``
for any module outside its own package (embdistill must be installed):
:func:`load_sentence_transformer` loads a folder or hub id, ours or anyone's.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import MODEL_LOAD_ERRORS, UserError, first_line
from .input_format import effective_max_length
from .paths import looks_like_path

SENSES_FILE = "senses.safetensors"
CONFIG_FILE = "embdistill_module.json"
ONNX_FILE = "model.onnx"
SENSE_RULE_KEY = "sense_rule"  # in the safetensors metadata of SENSES_FILE


def load_sentence_transformer(target: str, device):
    """A sentence-transformers folder or hub id. A local folder whose modules are all
    sentence-transformers' or ours (an exported student) is loaded with ``trust_remote_code``,
    which sentence-transformers 6 asks for any module outside its package: the code is this
    installed package's, nothing is fetched. A failure to load is one line (UserError)."""
    from sentence_transformers import SentenceTransformer

    source = str(Path(target).expanduser()) if looks_like_path(target) else target
    try:
        return SentenceTransformer(source, device=str(device), trust_remote_code=_only_known_modules(source))
    except MODEL_LOAD_ERRORS as exc:
        raise UserError(f"could not load sentence-transformers model {target}: {first_line(exc)}") from None


def _only_known_modules(folder: str) -> bool:
    modules = Path(folder) / "modules.json"
    if not modules.is_file():
        return False
    try:
        types = [m.get("type", "") for m in json.loads(modules.read_text())]
    except (json.JSONDecodeError, AttributeError, TypeError):
        return False
    return all(t.startswith(("sentence_transformers.", "embdistill.")) for t in types)


def _config(path: str | Path) -> dict:
    file = Path(path) / CONFIG_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{file}: missing or not valid JSON ({exc})") from None


@contextlib.contextmanager
def _load_errors(folder: Path):
    """A tokenizer that will not load (missing or broken files) -> one line naming the folder."""
    try:
        yield
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{folder}: no usable tokenizer ({first_line(exc)})") from None


class Encoder(nn.Module):
    """A model folder read by :func:`embdistill.teachers.load_teacher`, as the first module."""

    def __init__(self, model_dir: str | Path, max_seq_length: int = 512):
        super().__init__()
        from .teachers import load_teacher

        self.teacher = load_teacher(str(model_dir), device="cpu")
        self.model = self.teacher.model  # registered, so that .to(device) moves it
        self.max_seq_length = max_seq_length

    def tokenize(self, texts: list[str], **kwargs) -> dict[str, torch.Tensor]:
        """``texts`` are examples (``prompt + text``, the prompt being ``"<instruction> !@#$%^&*()"``)."""
        return self.teacher.tokenize(list(texts), self.max_seq_length)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        output = self.model(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
        features["token_embeddings"] = output.last_hidden_state
        features["attention_mask"] = features["embed_mask"]  # what the pooling that follows averages
        return features

    def get_word_embedding_dimension(self) -> int:
        return self.teacher.hidden_size

    def save(self, path: str, *args, **kwargs) -> None:
        from .teachers import save_reading

        self.model.save_pretrained(path)
        self.teacher.tokenizer.save_pretrained(path)
        save_reading(path, self.teacher.input_format, self.teacher.normalize,
                     effective_max_length(self.max_seq_length, self.teacher.max_seq_length))
        (Path(path) / CONFIG_FILE).write_text(json.dumps({"max_seq_length": self.max_seq_length}))

    @staticmethod
    def load(path: str) -> "Encoder":
        return Encoder(path, **_config(path))


class SenseReplace(nn.Module):
    """Replace mode between the encoder and the pooling (see the module docstring)."""

    def __init__(self, senses):
        super().__init__()
        self.senses = senses

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features["token_embeddings"] = self.senses.replace(
            features["token_embeddings"], features["input_ids"], features["attention_mask"])
        return features

    def save(self, path: str, *args, **kwargs) -> None:
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        save_file(self.senses.to_tensors(), str(Path(path) / SENSES_FILE),
                  metadata={SENSE_RULE_KEY: self.senses.rule})
        (Path(path) / CONFIG_FILE).write_text(json.dumps({"vocab_size": len(self.senses.entry_of_token)}))

    @staticmethod
    def load(path: str) -> "SenseReplace":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        from .senses.packed import DEFAULT_SENSE_RULE, PackedSenses

        file = Path(path) / SENSES_FILE
        config = _config(path)
        if not file.is_file():
            raise UserError(f"missing sense dictionary {file} of a replace-mode model")
        try:
            tensors = load_file(str(file))
            with safe_open(str(file), "pt") as handle:
                rule = (handle.metadata() or {}).get(SENSE_RULE_KEY, DEFAULT_SENSE_RULE)
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{file}: corrupt sense dictionary ({exc})") from None
        try:
            return SenseReplace(PackedSenses.from_tensors(tensors, int(config["vocab_size"]), rule))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{Path(path) / CONFIG_FILE}: no usable vocab_size ({exc})") from None
        except UserError as exc:
            raise UserError(f"{file}: {exc}") from None


class OnnxEncoder(nn.Module):
    """An ONNX encoder (inputs named as its tokenizer's outputs, output the final token states)
    as the first module; see the module docstring. CPU only (onnxruntime's CPU provider), on as
    many threads as torch uses, so that its speed compares with a torch model's: each text is
    one run on one thread (its embedding is the same in any batch and at any thread count), a
    batch's texts run side by side. On the 2-core CPU (loaded) that was faster than the batch as
    one run on 2 threads (BENCHMARKS.md, "Fused graph")."""

    def __init__(self, model_dir: str | Path, max_seq_length: int = 512, n_parameters: int = 0):
        super().__init__()
        import onnxruntime
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.max_seq_length = max_seq_length
        # the exported model's parameter count (the evaluation's params column): an int8 graph
        # holds the same weights, plus quantisation scales that are not parameters
        self.n_parameters = n_parameters
        file = self.model_dir / ONNX_FILE
        if not file.is_file():
            raise UserError(f"missing ONNX model {file} of an onnx-encoder folder")
        self.threads = torch.get_num_threads()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
            raise UserError(f"{file}: corrupt ONNX model ({first_line(exc)})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.hidden_size = int(self.session.get_outputs()[0].shape[-1])
        with _load_errors(self.model_dir):
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))

    def tokenize(self, texts: list[str], **kwargs) -> dict[str, torch.Tensor]:
        """As sentence-transformers' ``Transformer`` tokenizes (padding to the longest text,
        cut at ``max_seq_length``), with only the inputs the ONNX model takes."""
        batch = self.tokenizer(list(texts), padding=True, truncation="longest_first",
                               max_length=self.max_seq_length, return_tensors="pt")
        return {name: batch[name] for name in self.input_names}

    def preprocess(self, inputs: list[str], prompt: str | None = None, **kwargs) -> dict:
        """sentence-transformers 6's entry: the texts after ``prompt``, and the prompt's length
        in tokens (without a closing special token) for a ``Pooling`` that leaves it out."""
        if not prompt:
            return self.tokenize(inputs)
        features = self.tokenize([prompt + text for text in inputs])
        prompt_ids = self.tokenize([prompt])["input_ids"][0]
        special = prompt_ids[-1].item() in self.tokenizer.all_special_ids
        features["prompt_length"] = len(prompt_ids) - int(special)
        return features

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {name: features[name].cpu().numpy() for name in self.input_names}
        attended = features["attention_mask"].cpu().numpy().astype(bool)
        # padding's states stay 0: the pooling that follows leaves them out
        states = np.zeros((*attended.shape, self.hidden_size), dtype=np.float32)

        def run_alone(row: int) -> None:
            feeds = {name: values[row : row + 1, attended[row]] for name, values in inputs.items()}
            states[row, attended[row]] = self.session.run(None, feeds)[0][0]

        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(run_alone, range(len(attended))))  # list(): a failed run raises here
        features["token_embeddings"] = torch.from_numpy(states).to(features["input_ids"].device)
        return features

    def get_word_embedding_dimension(self) -> int:
        return self.hidden_size

    def save(self, path: str, *args, **kwargs) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        if (self.model_dir / ONNX_FILE).resolve() != (Path(path) / ONNX_FILE).resolve():
            shutil.copyfile(self.model_dir / ONNX_FILE, Path(path) / ONNX_FILE)
        self.tokenizer.save_pretrained(path)
        (Path(path) / CONFIG_FILE).write_text(json.dumps({"max_seq_length": self.max_seq_length,
                                                          "n_parameters": self.n_parameters}))

    @staticmethod
    def load(path: str) -> "OnnxEncoder":
        return OnnxEncoder(path, **_config(path))
