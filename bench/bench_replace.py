"""Benchmark: batched replace mode against the original's per-token CPU loop, same inputs.

    python bench/bench_replace.py                      # MiniLM-sized: d=384, 32 x 256 tokens
    python bench/bench_replace.py --dim 4096 --batch 4 --length 512 --device cuda

Inputs (seeded): a sense dictionary of ``--entries`` tokens with k drawn uniformly from
[--k-min, --k-max] (float16, as stored), token states (B, T, d) float32, token ids of which
``--coverage`` have an entry, and a text mask with padding (ragged lengths). Both versions get
the same tensors; the outputs are checked equal before any time is reported. Times: best of
``--repeats`` for the batched version (after a warm-up), one pass of the loop (it is the
baseline, measured in the same process).
"""

from __future__ import annotations

import argparse
import sys
import platform
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, run as a script or imported
from common import add_machine_args, machine, synchronize  # noqa: E402
from embdistill.senses.packed import COS_TEMPERATURE, DEFAULT_SENSE_RULE, PackedSenses


def reference_scores(senses: torch.Tensor, state: torch.Tensor, rule: str = DEFAULT_SENSE_RULE) -> torch.Tensor:
    """The scores (k,) of one state (d,) against its token's senses (k, d) under a sense rule,
    as the formulas read (the tests' oracle of PackedSenses.logits)."""
    if rule == "dot":
        return senses @ state
    if rule == "l2":
        return -((state - senses) ** 2).sum(1)
    if rule == "cos":
        return senses @ state / (senses.norm(dim=1) * state.norm()) / COS_TEMPERATURE
    raise ValueError(rule)


@torch.no_grad()
def replace_reference_loop(states, input_ids, text_mask, sense_dict, rule: str = DEFAULT_SENSE_RULE) -> torch.Tensor:
    """The original's replace mode: a Python loop over tokens on the CPU, each scored against
    its entry read from the dictionary (the baseline here, and the tests' oracle); the
    original scores by ``dot``."""
    output = states.detach().cpu().clone()
    input_ids, text_mask = input_ids.cpu(), text_mask.cpu()
    for b in range(output.shape[0]):
        for t in range(output.shape[1]):
            entry = sense_dict.get(int(input_ids[b, t])) if text_mask[b, t] else None
            if entry is None:
                continue
            senses = torch.as_tensor(np.asarray(entry, dtype=np.float32))
            nearest = int(torch.argmax(reference_scores(senses, output[b, t].float(), rule)))
            output[b, t] = senses[nearest].to(output.dtype)
    return output


def make_inputs(args):
    rng = np.random.default_rng(args.seed)
    tokens = rng.choice(args.vocab, size=args.entries, replace=False)
    dictionary = {int(t): rng.normal(size=(int(rng.integers(args.k_min, args.k_max + 1)), args.dim))
                  .astype(np.float16) for t in tokens}
    without = np.setdiff1d(np.arange(args.vocab), tokens)
    covered = rng.random((args.batch, args.length)) < args.coverage
    input_ids = np.where(covered, rng.choice(tokens, (args.batch, args.length)),
                         rng.choice(without, (args.batch, args.length)))
    lengths = rng.integers(args.length // 2, args.length + 1, args.batch)
    lengths[0] = args.length
    text_mask = np.arange(args.length)[None] < lengths[:, None]
    text_mask[:, 0] = False  # the [CLS]-like first token is not text
    states = torch.from_numpy(rng.normal(size=(args.batch, args.length, args.dim)).astype(np.float32))
    return dictionary, states, torch.from_numpy(input_ids), torch.from_numpy(text_mask.astype(np.int64))




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--entries", type=int, default=8000, help="tokens with a dictionary entry")
    parser.add_argument("--k-min", type=int, default=5)
    parser.add_argument("--k-max", type=int, default=60)
    parser.add_argument("--coverage", type=float, default=0.7, help="share of text tokens with an entry")
    parser.add_argument("--repeats", type=int, default=5)
    add_machine_args(parser)
    args = parser.parse_args()
    device = machine(args)

    dictionary, states, input_ids, text_mask = make_inputs(args)
    n_replaced = int((text_mask.bool() & torch.isin(input_ids, torch.tensor(list(dictionary)))).sum())

    start = time.perf_counter()
    looped = replace_reference_loop(states, input_ids, text_mask, dictionary)
    loop_s = time.perf_counter() - start

    start = time.perf_counter()
    senses = PackedSenses(dictionary, args.vocab).to(device)
    synchronize(device)
    pack_s = time.perf_counter() - start
    on_device = [t.to(device) for t in (states, input_ids, text_mask)]
    batched = senses.replace(*on_device)  # warm-up
    if not torch.equal(batched.cpu(), looped):
        raise SystemExit("batched replace mode differs from the loop: not benchmarking")
    times = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        senses.replace(*on_device)
        synchronize(device)
        times.append(time.perf_counter() - start)
    batched_s = min(times)

    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"device {device}")
    print(f"inputs: {args.batch} x {args.length} tokens, d={args.dim}, {args.entries} entries "
          f"(k {args.k_min}-{args.k_max}), {n_replaced} tokens replaced; outputs equal")
    print(f"per-token loop (CPU): {loop_s:.3f} s  ({n_replaced / loop_s:,.0f} tokens/s)")
    print(f"batched ({device}):   {batched_s:.4f} s  ({n_replaced / batched_s:,.0f} tokens/s), "
          f"best of {args.repeats}; packing the dictionary once: {pack_s:.3f} s")
    print(f"speed-up: {loop_s / batched_s:.1f}x")


if __name__ == "__main__":
    main()
