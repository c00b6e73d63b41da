"""Stage 10: the corpus and every teacher's embeddings of it (scripts/10_teacher_embeddings.py).

Rank 0 writes the corpus and fits the LSA teacher; then every rank encodes its shards of each
teacher that is not done (:mod:`.shards`), the last rank to finish writing its index.json.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..artifacts import fingerprint, is_done
from ..distributed import barrier, cleanup, default_device, init_distributed
from ..input_format import effective_max_length
from ..paths import Paths, base_dir, slug
from .corpus import build_corpus, corpus_name, read_corpus, write_corpus
from .lsa import LSA_TEACHER, LsaModel, lsa_dirs, prepare_lsa
from .shards import Encoder, finish_teacher, reset_teacher, shards_config, write_teacher_shards

log = logging.getLogger("embdistill.multiteacher.teacher_embeddings")


def build_teacher_embeddings(args: argparse.Namespace) -> None:
    """The whole stage, from the script's options; every rank calls it."""
    env = init_distributed(timeout_s=args.dist_timeout)
    base = base_dir(args.base_dir)
    paths = Paths(base, corpus_name(args))
    teachers = list(dict.fromkeys(args.teachers))
    if env.is_main:
        prepare(args, base, paths, teachers)
    barrier()
    texts = read_corpus(paths)

    for name in teachers:
        folder = paths.embeddings_dir(slug(name))
        config = teacher_config(name, folder, args.max_length)
        if is_done(folder / "index.json", config=shards_config(config, texts, args.shard_size)):
            log.info("teacher %s: %s is up to date, skipping", name, folder)
            continue
        written = write_teacher_shards(load_encoder(name, folder), texts, folder, teacher_config=config,
                                       shard_size=args.shard_size, batch_size=args.batch_size,
                                       max_length=args.max_length, env=env)
        complete = finish_teacher(folder, texts, teacher_config=config, shard_size=args.shard_size)
        # The last rank to finish writes index.json; the others need not wait for it.
        print(f"teacher {name}: rank {env.rank} wrote {len(written)} shards to {folder}; "
              + ("all shards in, index.json written" if complete else "other ranks still writing"),
              flush=True)
    cleanup()


def prepare(args: argparse.Namespace, base: Path, paths: Paths, teachers: list[str]) -> None:
    """Rank 0, before the others start: the corpus, the LSA teacher, resets for --overwrite."""
    texts, config, inputs = build_corpus(args, base)
    if args.overwrite or not is_done(paths.corpus_file, config=config, inputs=inputs):
        write_corpus(paths, texts, config, inputs)
    log.info("corpus %s: %d texts", paths.task, len(texts))
    for name in teachers:
        folder = paths.embeddings_dir(slug(name))
        if args.overwrite:
            reset_teacher(folder)
        if name == LSA_TEACHER:
            prepare_lsa(folder, texts, paths.corpus_file, dim=args.lsa_dim, min_df=args.lsa_min_df,
                        max_features=args.lsa_max_features, seed=args.seed, overwrite=args.overwrite)


def teacher_config(name: str, folder: Path, max_length: int) -> dict:
    """What makes a teacher's vectors what they are: shards made otherwise are redone. An
    encoder's max length is the one it reads: ``max_length`` cut to its own limit."""
    if name == LSA_TEACHER:
        return {"teacher": LSA_TEACHER, "model": fingerprint(lsa_dirs(folder)[0])}
    from ..teachers import load_tokenizer

    return {"teacher": slug(name), "source": name,
            "max_length": effective_max_length(max_length, load_tokenizer(name).max_seq_length)}


def load_encoder(name: str, folder: Path) -> Encoder:
    """The fitted LSA model, or an encoder teacher on this rank's device: fp16 on a GPU, as the
    paper encodes; the CPU keeps fp32 (fp16 matmuls are slow there)."""
    if name == LSA_TEACHER:
        return LsaModel.load(lsa_dirs(folder)[0])
    from ..teachers import load_teacher

    device = default_device()
    return load_teacher(name, device=device, dtype=torch.float16 if device.type == "cuda" else None)
