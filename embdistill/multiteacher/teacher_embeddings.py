"""Stage 10: the corpus and every teacher's embeddings of it (scripts/10_teacher_embeddings.py).

Rank 0 writes the corpus and fits the LSA teacher; then every rank encodes its shards of each
teacher that is not done (:mod:`.shards`), the last rank to finish writing its index.json.
Encoder teachers embed through their own sentence-transformers pipeline
(:mod:`.sentence_teacher`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..artifacts import fingerprint, is_done
from ..distributed import barrier, cleanup, default_device, init_distributed
from ..paths import Paths, base_dir, slug
from .corpus import build_corpus, corpus_name, read_corpus, write_corpus
from .lsa import LSA_TEACHER, LsaModel, lsa_dirs, prepare_lsa
from .sentence_teacher import SentenceTeacher, load_sentence_teacher
from .shards import finish_teacher, reset_teacher, shards_config, write_teacher_shards

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
        # loaded before the skip check: the shards' identity is the pipeline it loads
        encoder = load_encoder(name, folder, args.max_length)
        config = teacher_config(name, folder, encoder)
        if is_done(folder / "index.json", config=shards_config(config, texts, args.shard_size)):
            log.info("teacher %s: %s is up to date, skipping", name, folder)
            continue
        written = write_teacher_shards(encoder, texts, folder, teacher_config=config,
                                       shard_size=args.shard_size, batch_size=args.batch_size, env=env)
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


def teacher_config(name: str, folder: Path, encoder: LsaModel | SentenceTeacher) -> dict:
    """What makes a teacher's vectors what they are: shards made otherwise are redone."""
    if name == LSA_TEACHER:
        return {"teacher": LSA_TEACHER, "model": fingerprint(lsa_dirs(folder)[0])}
    return {"teacher": slug(name), "source": name, "max_length": encoder.max_length,
            "pipeline": encoder.pipeline}


def load_encoder(name: str, folder: Path, max_length: int) -> LsaModel | SentenceTeacher:
    """The fitted LSA model, or an encoder teacher's sentence-transformers pipeline on this
    rank's device, its input cut to ``max_length`` tokens where its own limit is longer."""
    if name == LSA_TEACHER:
        return LsaModel.load(lsa_dirs(folder)[0])
    return load_sentence_teacher(name, max_length, default_device())

