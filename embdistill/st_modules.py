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

Both are plain modules (``save(path)``, ``load(path)``, ``tokenize(texts)``), which
sentence-transformers 5 and 6 load; sentence-transformers 6 asks ``trust_remote_code=True``
for any module outside its own package (embdistill must be installed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

SENSES_FILE = "senses.safetensors"
CONFIG_FILE = "embdistill_module.json"
SENSE_RULE_KEY = "sense_rule"  # in the safetensors metadata of SENSES_FILE


def _config(path: str | Path) -> dict:
    file = Path(path) / CONFIG_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{file}: missing or not valid JSON ({exc})") from None


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
        save_reading(path, self.teacher.input_format, self.teacher.normalize)
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
