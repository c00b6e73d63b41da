"""SKD's sense targets, computed once: for every text token of the training texts, the
teacher's sense under the dictionary's sense rule (``argmax_j score(S_v[j], h_teacher)``,
:mod:`.packed`; ``dot`` by default, the original's), or -1 where the token has no entry.

A target depends only on the teacher, the text, the max length and the dictionary, so the
frozen teacher runs once over the training texts here, after clustering, instead of at every
training step of every epoch (for the paper's teacher, 32 Llama layers against a 4-layer
student, that is most of each step). Ranks share the texts by parts of ``flush_every``
texts (part p goes to rank p mod world size, so the parts do not depend on the number of
processes); each finished part is written at once (:class:`~embdistill.artifacts.PartFiles`), the heap's
free pages handed back after it (:func:`embdistill.heap.release_free_heap`), and a killed run
resumes from its finished parts. Rank 0 then merges the parts into one file:

``targets.npz``: ``offsets`` (N + 1, int64), ``token_ids`` and ``targets`` (int32): text i's
text tokens (its embed mask, in order) are rows ``offsets[i]:offsets[i+1]``; its manifest
names the teacher, tokenizer, input format, max length, dictionary and its sense rule (which
the dictionary's fingerprint does not cover: it lives in the dictionary's manifest), and
fingerprints the dictionary and train.json; its summary gives the share of scored tokens whose
entry has a single sense (the sense loss leaves them out: :mod:`embdistill.losses.sense`). :func:`load_targets` refuses a file made for anything else, and
:class:`TargetCollator` refuses a batch whose tokens differ from the stored ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..artifacts import NPZ_ERRORS, PartFiles, atomic_open, fingerprint, read_manifest, write_manifest
from ..digests import output_damage
from ..distributed import DistEnv, barrier
from ..errors import UserError
from ..heap import release_free_heap
from .dictionary import SenseDictionary
from .packed import PackedSenses

log = logging.getLogger("embdistill.targets")


def tokenizer_identity(tokenizer) -> str:
    """A tokenizer by its content: its class, the sha256 of its whole definition (a fast
    tokenizer's ``tokenizer.json``: normaliser, pre-tokeniser, vocabulary, less the truncation and
    padding that each call sets; else the sorted vocabulary) and its size. Not its folder: the same
    tokenizer read from another virtual environment or a copied model folder is the same one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None), definition.pop("padding", None)
    else:
        definition = sorted(tokenizer.get_vocab().items())
    definition = json.dumps(definition, sort_keys=True)
    digest = hashlib.sha256(definition.encode("utf-8")).hexdigest()[:16]
    return f"{type(tokenizer).__name__} sha256:{digest} ({len(tokenizer)} tokens)"


@dataclass(frozen=True)
class TargetsConfig:
    """What the targets depend on besides the dictionary's and the texts' content."""

    teacher: str  # the teacher's name (alias, hub id or folder)
    tokenizer: str  # the tokenizer's content (tokenizer_identity), not where it was read from
    input_format: str
    max_length: int  # the length used: --max-length cut to the teacher's (effective_max_length)
    dictionary: str  # its path (its content is fingerprinted as an input)
    sense_rule: str  # the dictionary's, from its manifest

    @classmethod
    def of(cls, teacher, max_length: int, dictionary: SenseDictionary) -> "TargetsConfig":
        return cls(teacher.name, tokenizer_identity(teacher.tokenizer), teacher.input_format.name, max_length, str(dictionary.path),
                   dictionary.sense_rule)


def single_sense_count(token_ids: np.ndarray, targets: np.ndarray,
                       senses: PackedSenses) -> tuple[int, int, float]:
    """(scored tokens whose entry has one sense, scored tokens, the first's share of the second,
    rounded to 4 places) of stored targets: the sense loss leaves the first out (their target is
    certain)."""
    scored = targets >= 0
    entries = senses.entry_of_token.cpu().numpy()[token_ids[scored]]
    single, count = int((senses.sizes.cpu().numpy()[entries] == 1).sum()), int(scored.sum())
    return single, count, round(single / max(count, 1), 4)


@torch.inference_mode()
def text_targets(teacher, senses: PackedSenses, examples: Sequence[str], max_length: int,
                 batch_size: int, progress: tqdm | None = None) -> dict[str, np.ndarray]:
    """Targets of ``examples``, in their order: ``lengths`` (text tokens per example),
    ``token_ids`` and ``targets`` (flat, int32)."""
    batch = teacher.tokenize(list(examples), max_length)
    text_mask = batch["embed_mask"].bool() & batch["attention_mask"].bool()
    targets = torch.full_like(batch["input_ids"], -1)
    order = torch.argsort(batch["attention_mask"].sum(1), stable=True)  # shortest first: little padding
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        cols = batch["attention_mask"][rows].bool().any(0)  # drop columns that are padding in every row
        sub = {key: value[rows][:, cols] for key, value in batch.items()}
        states = teacher.token_states(sub)
        # the packed dictionary lives on the teacher's device; only int targets come back
        targets[rows[:, None], cols.nonzero().squeeze(1)[None]] = senses.targets(
            states, sub["input_ids"], text_mask[rows][:, cols]).cpu()
        if progress is not None:
            progress.update(len(rows))
    return {"lengths": text_mask.sum(1).numpy().astype(np.int64),
            "token_ids": batch["input_ids"][text_mask].numpy().astype(np.int32),
            "targets": targets[text_mask].numpy().astype(np.int32)}


def compute_targets(teacher, senses: PackedSenses, examples: Sequence[str], out_path: Path,
                    cfg: TargetsConfig, env: DistEnv, *, inputs: Mapping[str, Path], batch_size: int = 16,
                    flush_every: int = 256, overwrite: bool = False) -> dict | None:
    """This rank's parts of ``examples``, then (rank 0, after every rank finished) the merged
    ``out_path`` and its manifest. Returns the summary on rank 0, None elsewhere."""
    if batch_size < 1 or flush_every < 1:
        raise UserError("--batch-size and --flush-every must be >= 1")
    if senses.rule != cfg.sense_rule:
        raise ValueError(f"the packed dictionary scores by {senses.rule}, its manifest says {cfg.sense_rule}")
    started = time.perf_counter()
    identity = {**asdict(cfg), "flush_every": flush_every,
                "inputs": {key: fingerprint(path) for key, path in inputs.items()}}
    parts = PartFiles.beside(out_path, identity)
    if overwrite and env.is_main:
        parts.clear()
    barrier()
    chunks = [range(i, min(i + flush_every, len(examples))) for i in range(0, len(examples), flush_every)]
    mine = [p for p in range(env.rank, len(chunks), env.world_size)]
    todo = [p for p in mine if not parts.done(p)]
    if len(todo) < len(mine):
        log.info("rank %d: resuming, %d of %d parts already computed", env.rank, len(mine) - len(todo), len(mine))
    with tqdm(total=sum(len(chunks[p]) for p in mine), initial=sum(len(chunks[p]) for p in mine if p not in todo),
              desc=f"targets rank {env.rank}", unit="text", disable=not env.is_main) as progress:
        for p in todo:
            part = text_targets(teacher, senses, [examples[i] for i in chunks[p]], cfg.max_length,
                                batch_size, progress)
            parts.write(p, part)
            release_free_heap()  # the part's batches fragment the heap (embdistill.heap)
    barrier()
    if not env.is_main:
        return None
    loaded = [parts.load(p) for p in range(len(chunks))]
    lengths = np.concatenate([part["lengths"] for part in loaded])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    token_ids = np.concatenate([part["token_ids"] for part in loaded])
    targets = np.concatenate([part["targets"] for part in loaded])
    single, scored, share = single_sense_count(token_ids, targets, senses)
    summary = {"texts": len(examples), "text_tokens": int(len(targets)), "scored_tokens": scored,
               "single_sense_tokens": single, "single_sense_share": share,
               "sense_rule": senses.rule, "world_size": env.world_size,
               "seconds": round(time.perf_counter() - started, 2)}
    with atomic_open(out_path, "wb") as fh:
        np.savez(fh, offsets=offsets, token_ids=token_ids, targets=targets)
    write_manifest(out_path, stage="targets", config=asdict(cfg), inputs=inputs, extra=summary)
    parts.clear()
    return summary


@dataclass
class SenseTargets:
    """Stored targets (see the module docstring); ``of(i)`` -> (token ids, targets) of text i."""

    offsets: np.ndarray
    token_ids: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def of(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = slice(self.offsets[index], self.offsets[index + 1])
        return self.token_ids[rows], self.targets[rows]


def load_targets(path: Path, cfg: TargetsConfig, inputs: Mapping[str, Path], senses: PackedSenses,
                 n_texts: int) -> SenseTargets:
    """The targets at ``path``, checked to be for this teacher, tokenizer, input format, max
    length, dictionary, sense rule and texts (one-line UserError naming what differs), and to fit the
    dictionary (every target a sense of its token's entry)."""
    manifest = read_manifest(path)
    if not path.is_file() or manifest is None:
        raise UserError(f"missing sense targets {path}: run scripts/04_targets.py with the same "
                        "--task, --teacher, --sense-dict and --max-length first")
    recorded, current = manifest.get("config", {}), asdict(cfg)
    differences = [f"{key} {recorded.get(key)!r}, not {value!r}" for key, value in current.items()
                   if key != "dictionary" and recorded.get(key) != value]
    for key, source in inputs.items():
        if manifest.get("inputs", {}).get(key) != fingerprint(source):
            differences.append(f"another {key} than {source}")
    if differences:
        raise UserError(f"{path} was made for {'; '.join(differences)}; rerun scripts/04_targets.py "
                        "(--overwrite) or pass the matching options")
    damage = output_damage(path, manifest.get("outputs"))
    if damage:
        raise UserError(f"damaged targets file: {damage}; rerun scripts/04_targets.py (run_train.sh does)")
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = SenseTargets(data["offsets"], data["token_ids"], data["targets"])
    except NPZ_ERRORS as exc:
        raise UserError(f"{path}: corrupt targets file ({exc}); rerun scripts/04_targets.py --overwrite") from None
    if len(stored) != n_texts or stored.offsets[-1] != len(stored.targets) or len(stored.token_ids) != len(stored.targets):
        raise UserError(f"{path}: holds {len(stored)} texts' targets, train.json has {n_texts}; "
                        "rerun scripts/04_targets.py --overwrite")
    scored = stored.targets >= 0
    entries = senses.entry_of_token.cpu().numpy()[stored.token_ids[scored]]
    if (entries < 0).any() or (stored.targets[scored] >= senses.sizes.cpu().numpy()[np.maximum(entries, 0)]).any():
        raise UserError(f"{path}: targets outside their tokens' senses: made with another dictionary")
    return stored


class TargetCollator:
    """Training batches for the sense loss: the tokenised examples plus ``sense_targets``
    (B, T), the stored target of each text token, -1 elsewhere. Dataset items are text
    indices; a text whose tokens differ from the stored ones is refused (the tokenizer, input
    format or max length changed since the targets were computed)."""

    def __init__(self, tokenize, examples: Sequence[str], targets: SenseTargets, max_length: int):
        self.tokenize, self.examples, self.targets, self.max_length = tokenize, examples, targets, max_length

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.tokenize([self.examples[i] for i in indices], self.max_length)
        text_mask = batch["embed_mask"].bool() & batch["attention_mask"].bool()
        sense_targets = torch.full_like(batch["input_ids"], -1)
        for row, index in enumerate(indices):
            token_ids, targets = self.targets.of(index)
            positions = text_mask[row].nonzero().squeeze(1)
            if len(positions) != len(token_ids) or not np.array_equal(batch["input_ids"][row, positions].numpy(), token_ids):
                raise UserError(f"text {index}: its tokens differ from those the sense targets were "
                                "computed on; rerun scripts/04_targets.py --overwrite")
            sense_targets[row, positions] = torch.from_numpy(targets.astype(np.int64))
        batch["sense_targets"] = sense_targets
        return batch
