"""Gather throughput: our gather vs a bare forward pass vs the original's approach.

All three run in this process on the same texts at the same batch size, interleaved (the
order rotating each repeat). Reported: the median of ``--repeats`` timings as text tokens per
second, and as a ratio to the bare forward pass (tokenise + ``token_states``, texts in input
order, nothing kept); on the CPU also the ratio of process CPU times, steadier than wall time
on a shared machine.

* ours: ``embdistill.senses.gather.gather_texts`` (default SDPA kernel, keep mask per batch,
  one boolean-mask index, rows buffered on the device, float16 out, texts sorted by length);
* original: math SDPA kernel forced (``sdpa_kernel(SDPBackend.MATH)``), then each kept text
  token's vector copied to the CPU one by one in a Python loop (fp32), as the original did.

    python bench/bench_gather.py                     # MiniLM on CPU, 64 bbc-news texts
    python bench/bench_gather.py --teacher random-llama8b-shape --device cuda --max-length 512 --texts 256

``random-llama8b-shape`` is a bidirectional Llama with Llama-3-8B's shape (hidden 4096, 32
layers, 32 heads, 8 KV heads, intermediate 14336) and random bf16 weights, no download needed;
it borrows MiniLM's tokenizer (vocabulary 30522 instead of 128256: only the embedding table,
a lookup, is smaller). ``--llama-layers`` shrinks it for a smoke run on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import datetime as dt
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoTokenizer, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, run as a script or imported
from common import add_machine_args, machine, synchronize  # noqa: E402
from embdistill.senses.gather import GatherConfig, count_table, count_tokens, gather_texts
from embdistill.tasks import resolve_task
from embdistill.teachers import BidirectionalLlamaModel, Teacher, load_teacher, minilm_path
from embdistill.input_format import LLM2VEC, PLAIN, InputFormat, format_example


def random_llama_teacher(name: str, device: torch.device, tokenizer, max_length: int,
                         input_format: InputFormat = LLM2VEC, **shape) -> Teacher:
    """A bidirectional Llama of ``shape`` (LlamaConfig fields) with random bf16 weights, built
    on ``device``, with Llama-3's RoPE settings and SDPA attention, reading ``input_format``."""
    config = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                         attn_implementation="sdpa", use_cache=False)
    with torch.device(device):
        model = BidirectionalLlamaModel._from_config(config, dtype=torch.bfloat16).eval().requires_grad_(False)
    return Teacher(name, name, model, tokenizer, normalize=False, max_seq_length=max_length,
                   input_format=input_format)


def random_llama8b_shape(device: torch.device, layers: int, max_length: int) -> Teacher:
    return random_llama_teacher("random-llama8b-shape", device, AutoTokenizer.from_pretrained(minilm_path()),
                                max_length, PLAIN, hidden_size=4096, num_hidden_layers=layers, num_attention_heads=32,
                                num_key_value_heads=8, intermediate_size=14336, vocab_size=30522)


def batches(texts: list[str], batch_size: int):
    for start in range(0, len(texts), batch_size):
        yield texts[start : start + batch_size]




@torch.inference_mode()
def bare_forward(teacher, texts, cfg, batch_size) -> int:
    for batch in batches(texts, batch_size):
        teacher.token_states(teacher.tokenize(batch, cfg.max_length))
    synchronize(teacher.device)
    return 0


@torch.inference_mode()
def ours(teacher, texts, cfg, batch_size, table) -> int:
    part = gather_texts(teacher, texts, list(range(len(texts))), table, cfg, batch_size=batch_size,
                        buffer_rows=16384)
    return len(part["states"])


@torch.inference_mode()
def original(teacher, texts, cfg, batch_size, counts) -> int:
    """The original's loop: math attention, one .cpu() copy per kept token, fp32."""
    rng = random.Random(cfg.seed)
    kept: dict[int, list[np.ndarray]] = {}
    with sdpa_kernel(SDPBackend.MATH):
        for batch_texts in batches(texts, batch_size):
            batch = teacher.tokenize(batch_texts, cfg.max_length)
            states = teacher.token_states(batch)
            for b in range(states.shape[0]):
                for t in range(states.shape[1]):
                    if batch["embed_mask"][b, t]:
                        token = int(batch["input_ids"][b, t])
                        if rng.randint(0, counts[token]) < cfg.per_token:
                            kept.setdefault(token, []).append(states[b, t].float().cpu().numpy())
    return sum(len(v) for v in kept.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher", default="minilm", help="a teacher for load_teacher, or random-llama8b-shape")
    parser.add_argument("--texts", type=int, default=64, help="bbc-news training texts")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-token", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama-layers", type=int, default=32, help="layers of random-llama8b-shape")
    add_machine_args(parser, device=None, seed=False)
    args = parser.parse_args()
    device = machine(args)
    if args.teacher == "random-llama8b-shape":
        teacher = random_llama8b_shape(device, args.llama_layers, args.max_length)
    else:
        teacher = load_teacher(args.teacher, device=device)
    task = resolve_task("bbc-news")
    splits = task.load_splits(seed=0, max_train=args.texts)
    texts = [format_example(task.instruction, text) for text in splits.train_texts]
    counts = count_tokens(teacher.tokenize, texts, args.max_length, progress=False)
    table = count_table(counts)
    text_tokens = sum(counts.values())
    cfg = GatherConfig(args.teacher, args.max_length, args.per_token, 0, "float16")

    methods = {
        "bare forward (baseline)": lambda: bare_forward(teacher, texts, cfg, args.batch_size),
        "ours (gather_texts)": lambda: ours(teacher, texts, cfg, args.batch_size, table),
        "original (math SDPA, per-token .cpu())": lambda: original(teacher, texts, cfg, args.batch_size, counts),
    }
    bare_forward(teacher, texts[: args.batch_size], cfg, args.batch_size)  # warm-up: kernels, allocator
    # Wall time, and on the CPU also this process's CPU time: on a shared machine the wall
    # time includes waiting for cores that other jobs hold, the CPU time does not.
    seconds = {name: [] for name in methods}
    cpu_seconds = {name: [] for name in methods}
    rows = {}
    names = list(methods)
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:  # rotate: the load drifts during a run
            start, cpu_start = time.perf_counter(), time.process_time()
            rows[name] = methods[name]()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu_start)

    median = {name: statistics.median(s) for name, s in seconds.items()}
    cpu_median = {name: statistics.median(s) for name, s in cpu_seconds.items()}
    baseline = median["bare forward (baseline)"]
    cpu_baseline = cpu_median["bare forward (baseline)"]
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})")
    print(f"\n{dt.date.today()}  {teacher!r}\n{hardware}; {len(texts)} texts, {text_tokens} text tokens, "
          f"max_length {args.max_length}, batch {args.batch_size}, per_token {args.per_token}, "
          f"median of {args.repeats}\n")
    print("| method | text tokens/s (wall) | vs bare forward (wall) | vs bare forward (CPU time) "
          "| rows kept | wall timings (s) |")
    print("|---|---|---|---|---|---|")
    for name in methods:
        timings = ", ".join(f"{s:.2f}" for s in seconds[name])
        kept = "-" if name.startswith("bare") else rows[name]
        cpu_ratio = f"{cpu_baseline / cpu_median[name]:.2f}x" if device.type == "cpu" else "-"
        print(f"| {name} | {text_tokens / median[name]:,.0f} | {baseline / median[name]:.2f}x "
              f"| {cpu_ratio} | {kept} | {timings} |")


if __name__ == "__main__":
    main()
