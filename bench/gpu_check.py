"""One GPU check: every CUDA path of embdistill against its baseline, into one JSON and one table.

    bash bench/gpu_check.sh OUT_DIR          # one GPU (80 GB): about 3-8 minutes, no network
    bash bench/gpu_check.sh OUT_DIR --tiny   # the same code on the CPU at toy sizes (tests run it)
    bash bench/gpu_check.sh OUT_DIR --only gather skd_step

Writes OUT_DIR/gpu_check.json ({"meta": ..., "sections": {name: {"status": "ok" | "skipped" |
"failed", "reason" or "error", "seconds", "results", "rows"}}}) and OUT_DIR/gpu_check.md (the
rows as a table, for BENCHMARKS.md). Exit status 1 when a section failed. Sections:

* attention: the bidirectional teacher on an unpadded batch with no mask (SDPA may take its
  flash kernel) against an explicit all-zero 4-D mask (SDPA's masked kernels): time, max diff;
* gather: ``gather_texts`` against a bare forward pass (bench_gather.py), random-weight bf16
  Llama-3-8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab
  128256), texts of random words from a tokenizer built here (no download);
* cluster: batched torch k-means and the batched MCL rule on the device against scikit-learn's
  KMeans and the NumPy MCL reference, one token at a time, on a sample of 4096-d tokens
  (bench_cluster.py's synthetic states): time, objective, same counts;
* faiss: ``--backend faiss`` (on the GPU where faiss-gpu is installed) against torch k-means;
  skipped when faiss is missing or has no GPU support;
* skd_step: one SKD training step on stored sense targets (4-layer student, bf16 autocast)
  against a plain forward+backward+AdamW step, and the targets stage's work (teacher forward +
  nearest senses in float32) against a bare teacher forward (bench_train.py's timing);
* replace: batched replace mode against the original's per-token loop (bench_replace.py),
  outputs checked equal;
* ddp: 2 processes of embdistill's Trainer under NCCL (gloo on the CPU with --tiny): parameters
  equal on both ranks, time per step; then, under NCCL, what a peer that hangs does to the other
  (exit signal, the watchdog's words). Skipped with fewer than 2 GPUs.

Nothing here imports mteb or datasets.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the other benchmarks' functions

import bench_cluster  # noqa: E402
import bench_gather  # noqa: E402
import bench_replace  # noqa: E402
import bench_train  # noqa: E402
from common import synchronize  # noqa: E402

from embdistill.senses.cluster import Batching, ClusterConfig, plan_batches  # noqa: E402
from embdistill.senses.gather import GatherConfig, count_table, count_tokens  # noqa: E402
from embdistill.senses.kmeans import kmeans  # noqa: E402
from embdistill.senses.krule import mcl_counts  # noqa: E402
from embdistill.input_format import format_example  # noqa: E402

SECTIONS = ("attention", "gather", "cluster", "faiss", "skd_step", "replace", "ddp")
DDP_WORKER_ENV = "EMBDISTILL_GPU_CHECK_DDP"  # set for the processes of the ddp section


@dataclass(frozen=True)
class Sizes:
    shape: str  # bench_train.LLAMA_SHAPES key
    texts: int
    max_length: int
    batch: int
    repeats: int
    cluster_tokens: int
    cluster_dim: int
    sklearn_tokens: int
    mcl_tokens: int
    student_layers: int
    skd_batch: int
    skd_steps: int
    k_max: int
    replace_batch: int
    replace_entries: int
    ddp_steps: int


FULL = Sizes(shape="8b", texts=256, max_length=512, batch=16, repeats=3, cluster_tokens=256, cluster_dim=4096,
             sklearn_tokens=64, mcl_tokens=8, student_layers=4, skd_batch=3, skd_steps=10, k_max=60,
             replace_batch=4, replace_entries=4000, ddp_steps=20)
TINY = Sizes(shape="tiny", texts=12, max_length=32, batch=4, repeats=1, cluster_tokens=24, cluster_dim=16,
             sklearn_tokens=8, mcl_tokens=3, student_layers=2, skd_batch=2, skd_steps=2, k_max=5,
             replace_batch=2, replace_entries=40, ddp_steps=2)


class Skip(Exception):
    """A section that cannot run here; its message is the recorded reason."""




def best_of(repeats: int, fn, device: torch.device) -> float:
    """Best wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


def row(measurement: str, baseline: str, ours: str, ratio: str = "", check: str = "") -> dict:
    return {"measurement": measurement, "baseline": baseline, "ours": ours, "ratio": ratio, "check": check}


# ------------------------------------------------------------------------------ inputs


def word_tokenizer(words: int):
    """A fast word-level tokenizer: ``w0`` ... ``w<words-1>``, BOS prepended, EOS, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def random_texts(count: int, max_words: int, words: int, seed: int = 0) -> list[str]:
    """Training examples (instruction, separator, text) of Zipf-distributed random words."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        length = int(rng.integers(max_words // 8, max_words + 1))
        text = " ".join(f"w{i}" for i in (rng.zipf(1.3, length) - 1) % words)
        texts.append(format_example("w0 w1 w2 w3", text))
    return texts


class Context:
    """What sections share: sizes, device, and the teacher (built once, when first needed)."""

    def __init__(self, sizes: Sizes, device: torch.device, out: Path):
        self.sizes, self.device, self.out = sizes, device, out
        self.words = 5000 if sizes is FULL else 200
        self.tokenizer = word_tokenizer(self.words)
        self.texts = random_texts(sizes.texts, sizes.max_length, self.words)
        self._teacher = None

    @property
    def teacher(self):
        if self._teacher is None:
            torch.manual_seed(0)
            self._teacher = bench_gather.random_llama_teacher(
                f"random-llama-{self.sizes.shape}", self.device, self.tokenizer, self.sizes.max_length,
                **bench_train.LLAMA_SHAPES[self.sizes.shape])
        return self._teacher


# ------------------------------------------------------------------------------ sections


def attention(ctx: Context) -> tuple[dict, list]:
    teacher, sizes = ctx.teacher, ctx.sizes
    batch = teacher.tokenize(ctx.texts[: sizes.batch], sizes.max_length)
    length = int(batch["attention_mask"].sum(1).min())  # cut to the shortest: no padding at all
    ids = batch["input_ids"][:, :length].to(ctx.device)
    zero_mask = torch.zeros(len(ids), 1, length, length, dtype=teacher.dtype, device=ctx.device)

    @torch.inference_mode()
    def forward(mask):
        return teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state

    no_mask = best_of(sizes.repeats, lambda: forward(torch.ones_like(ids)), ctx.device)
    masked = best_of(sizes.repeats, lambda: forward(zero_mask), ctx.device)
    difference = float((forward(torch.ones_like(ids)).float() - forward(zero_mask).float()).abs().max())
    results = {"tokens": int(ids.numel()), "no_mask_s": no_mask, "zero_4d_mask_s": masked,
               "max_abs_difference": difference}
    return results, [row(f"teacher forward, {tuple(ids.shape)} tokens, no padding",
                         f"4-D zero mask {masked:.3f} s", f"no mask {no_mask:.3f} s",
                         f"{masked / no_mask:.2f}x", f"max abs difference {difference:.2e}")]


def gather(ctx: Context) -> tuple[dict, list]:
    teacher, sizes = ctx.teacher, ctx.sizes
    counts = count_tokens(teacher.tokenize, ctx.texts, sizes.max_length, progress=False)
    table, text_tokens = count_table(counts), sum(counts.values())
    cfg = GatherConfig(teacher.name, sizes.max_length, 1000, 0, "float16")
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    bare = best_of(sizes.repeats, lambda: bench_gather.bare_forward(teacher, ctx.texts, cfg, sizes.batch), ctx.device)
    kept = {}
    ours = best_of(sizes.repeats, lambda: kept.update(rows=bench_gather.ours(teacher, ctx.texts, cfg, sizes.batch, table)),
                   ctx.device)
    results = {"texts": len(ctx.texts), "text_tokens": text_tokens, "rows_kept": kept["rows"],
               "bare_forward_s": bare, "gather_s": ours, "bare_tokens_per_s": text_tokens / bare,
               "gather_tokens_per_s": text_tokens / ours}
    if ctx.device.type == "cuda":
        results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    return results, [row(f"gather, {len(ctx.texts)} texts, {text_tokens} text tokens, max length {sizes.max_length}",
                         f"bare forward {text_tokens / bare:,.0f} tokens/s", f"gather {text_tokens / ours:,.0f} tokens/s",
                         f"{bare / ours:.2f}x", f"{kept['rows']} rows kept")]


def cluster_inputs(ctx: Context):
    """bench_cluster's synthetic states at the teacher's width; the fixed rule's batches."""
    states = bench_cluster.synthetic_states(ctx.sizes.cluster_tokens, ctx.sizes.cluster_dim, 0)
    batches = plan_batches({t: len(v) for t, v in states.items()}, ClusterConfig("check"),
                           ctx.sizes.cluster_dim, Batching())
    work = [t for b in batches for t in b]
    sample = work[:: max(1, len(work) // ctx.sizes.sklearn_tokens)][: ctx.sizes.sklearn_tokens]
    return states, batches, sample


def run_kmeans(states, tokens: list[int], backend: str, device) -> tuple[float, float]:
    """(seconds, summed objective) of k = 5 on ``tokens``, the stage's batching for torch."""
    batches = plan_batches({t: len(states[t]) for t in tokens}, ClusterConfig("check"),
                           next(iter(states.values())).shape[1], Batching())
    started, objective = time.perf_counter(), 0.0
    for batch in batches:
        results = kmeans([states[t] for t in batch], [5] * len(batch), backend=backend, keys=batch, device=device)
        objective += sum(r.objective[-1] for r in results)
    synchronize(torch.device(device))
    return time.perf_counter() - started, objective


def cluster(ctx: Context) -> tuple[dict, list]:
    states, batches, sample = cluster_inputs(ctx)
    device = ctx.device
    run_kmeans(states, sample[:2], "torch", device)  # warm-up: kernels, allocator
    torch_all, _ = run_kmeans(states, [t for b in batches for t in b], "torch", device)
    torch_s, torch_objective = run_kmeans(states, sample, "torch", device)
    sklearn_s, sklearn_objective = run_kmeans(states, sample, "sklearn", "cpu")
    small = sorted((t for t in sample if len(states[t]) <= 300), key=lambda t: -len(states[t]))[: ctx.sizes.mcl_tokens]
    started = time.perf_counter()
    reference = [bench_cluster.mcl_count_reference(states[t]).clusters for t in small]
    reference_s = time.perf_counter() - started
    batched = {}
    batched_s = best_of(1, lambda: batched.update(c=[c.clusters for c in mcl_counts([states[t] for t in small],
                                                                                      device=device)]), device)
    same = sum(a == b for a, b in zip(reference, batched["c"]))
    results = {"tokens": len(states), "rows": int(sum(len(v) for v in states.values())), "dim": ctx.sizes.cluster_dim,
               "kmeans_torch_all_tokens_s": torch_all, "sample_tokens": len(sample), "kmeans_torch_sample_s": torch_s,
               "kmeans_sklearn_sample_s": sklearn_s, "objective_torch_over_sklearn": torch_objective / sklearn_objective,
               "mcl_tokens": len(small), "mcl_reference_s": reference_s, "mcl_batched_s": batched_s,
               "mcl_same_count": same}
    return results, [
        row(f"k-means k = 5, {len(sample)} tokens of {ctx.sizes.cluster_dim}-d (sample)",
            f"sklearn one at a time {sklearn_s:.2f} s", f"torch batched {torch_s:.2f} s", f"{sklearn_s / torch_s:.1f}x",
            f"objective {torch_objective / sklearn_objective:.4f} of sklearn's; all {len(states)} tokens {torch_all:.2f} s"),
        row(f"MCL count, {len(small)} tokens (n <= 300)", f"NumPy reference {reference_s:.2f} s",
            f"torch batched {batched_s:.2f} s", f"{reference_s / batched_s:.1f}x", f"same count {same}/{len(small)}")]


def faiss_section(ctx: Context) -> tuple[dict, list]:
    if importlib.util.find_spec("faiss") is None:
        raise Skip("faiss is not installed (pip install .[gpu] gives faiss-gpu)")
    import faiss

    on_gpu = ctx.device.type == "cuda"
    if on_gpu and (not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1):
        raise Skip(f"faiss {faiss.__version__} has no GPU support here (a faiss-cpu build)")
    states, _, sample = cluster_inputs(ctx)
    run_kmeans(states, sample[:2], "faiss", ctx.device)
    faiss_s, faiss_objective = run_kmeans(states, sample, "faiss", ctx.device)
    torch_s, torch_objective = run_kmeans(states, sample, "torch", ctx.device)
    results = {"sample_tokens": len(sample), "faiss_on_gpu": on_gpu, "faiss_s": faiss_s, "torch_s": torch_s,
               "objective_faiss_over_torch": faiss_objective / torch_objective}
    return results, [row(f"k-means k = 5, {len(sample)} tokens, faiss {'GPU' if on_gpu else 'CPU'} vs torch",
                         f"torch batched {torch_s:.2f} s", f"faiss one at a time {faiss_s:.2f} s",
                         f"{torch_s / faiss_s:.2f}x", f"objective {faiss_objective / torch_objective:.4f} of torch's")]


def skd_step(ctx: Context) -> tuple[dict, list]:
    """One SKD step on stored sense targets against a plain step (bench_train.py's interleaved
    timing), and the targets stage's work (teacher forward + nearest senses) against a bare
    teacher forward over the same batches."""
    from embdistill.senses.packed import PackedSenses
    from embdistill.objectives import SenseDistillation
    from embdistill.students import build_student

    teacher, sizes, device = ctx.teacher, ctx.sizes, ctx.device
    texts = random_texts(sizes.skd_batch * sizes.skd_steps, sizes.max_length * 2, ctx.words, seed=1)
    batches = [{k: v.to(device) for k, v in teacher.tokenize(texts[i : i + sizes.skd_batch], sizes.max_length).items()}
               for i in range(0, len(texts), sizes.skd_batch)]
    rng = np.random.default_rng(0)
    present = torch.unique(torch.cat([b["input_ids"].flatten() for b in batches])).tolist()
    senses = PackedSenses({t: rng.normal(size=(int(rng.integers(1, sizes.k_max + 1)), teacher.hidden_size))
                           .astype(np.float16) for t in present}, teacher.vocab_size).to(device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def targets_of(batch):
        with torch.inference_mode(), torch.autocast(**autocast):
            return senses.targets(teacher.token_states(batch), batch["input_ids"], batch["embed_mask"])

    def bare_forward(batch):
        with torch.inference_mode(), torch.autocast(**autocast):
            teacher.token_states(batch)

    for batch in batches:  # the targets stage's output, computed once
        batch["sense_targets"] = targets_of(batch)

    def plain(student, batch):
        states = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return states.float().pow(2).mean()

    def step_of(loss_of):
        return bench_train.adamw_step(build_student(teacher, sizes.student_layers).to(device), loss_of, autocast)

    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    objective = SenseDistillation(senses)
    times = bench_train.time_passes({
        "plain": (step_of(plain), batches),
        "skd": (step_of(lambda s, b: objective(s, b).loss), batches),
        "targets": (targets_of, batches),
        "bare_forward": (bare_forward, batches),
    }, device, sizes.repeats)
    results = {"steps": len(batches), "tokens": tokens, "student_layers": sizes.student_layers,
               "dictionary_tokens": len(present), "senses": len(senses.centroids),
               **{f"{name}_s": seconds for name, seconds in times.items()},
               "skd_over_plain": times["skd"] / times["plain"],
               "targets_over_bare_forward": times["targets"] / times["bare_forward"]}
    if device.type == "cuda":
        results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    shape = f"{len(batches)} steps x {sizes.skd_batch} x {sizes.max_length} tokens"
    return results, [
        row(f"training on stored targets, {shape}, {sizes.student_layers}-layer student",
            f"plain step {times['plain'] / len(batches) * 1e3:.0f} ms",
            f"SKD step {times['skd'] / len(batches) * 1e3:.0f} ms", f"{times['skd'] / times['plain']:.2f}x (SKD / plain)",
            f"{len(present)} dictionary tokens, {len(senses.centroids)} senses"),
        row(f"targets stage work, {shape}", f"bare teacher forward {times['bare_forward']:.3f} s",
            f"forward + nearest senses {times['targets']:.3f} s",
            f"{times['targets'] / times['bare_forward']:.2f}x (targets / bare)"),
    ]


def replace(ctx: Context) -> tuple[dict, list]:
    from embdistill.senses.packed import PackedSenses

    sizes, device = ctx.sizes, ctx.device
    args = SimpleNamespace(seed=0, vocab=30522, entries=sizes.replace_entries, k_min=1 if sizes is TINY else 5,
                           k_max=sizes.k_max, dim=sizes.cluster_dim, batch=sizes.replace_batch,
                           length=sizes.max_length, coverage=0.7)
    dictionary, states, input_ids, text_mask = bench_replace.make_inputs(args)
    started = time.perf_counter()
    looped = bench_replace.replace_reference_loop(states, input_ids, text_mask, dictionary)
    loop_s = time.perf_counter() - started
    packed = PackedSenses(dictionary, args.vocab).to(device)
    on_device = [t.to(device) for t in (states, input_ids, text_mask)]
    out = {}
    batched_s = best_of(sizes.repeats, lambda: out.update(r=packed.replace(*on_device)), device)
    equal = bool(torch.equal(out["r"].cpu(), looped))
    if not equal:
        raise AssertionError("batched replace mode differs from the per-token loop")
    results = {"tokens": int(text_mask.sum()), "loop_s": loop_s, "batched_s": batched_s, "outputs_equal": equal}
    return results, [row(f"replace mode, {sizes.replace_batch} x {sizes.max_length} tokens, d {args.dim}",
                         f"per-token loop {loop_s:.3f} s", f"batched {batched_s:.4f} s", f"{loop_s / batched_s:.1f}x",
                         "outputs equal")]


# ------------------------------------------------------------------------------ ddp


def ddp_worker(out_dir: str, steps: int, hang: bool) -> None:
    """One rank: a few Trainer steps of a small bidirectional Llama under DDP, then its
    parameters to a file. With ``hang``, rank 1 never joins the first all-reduce."""
    from embdistill.distributed import bind_device, cleanup, dist_env, init_distributed, resolve_device
    from embdistill.train_config import TrainConfig
    from embdistill.training import LossOutput, Trainer
    from transformers import LlamaConfig

    from embdistill.teachers import BidirectionalLlamaModel

    env = dist_env()
    device = bind_device(resolve_device("cuda" if torch.cuda.is_available() else "cpu", env))
    if hang and env.rank == 1:
        time.sleep(600)
    torch.manual_seed(0)
    model = BidirectionalLlamaModel(LlamaConfig(**bench_train.LLAMA_SHAPES["tiny"], max_position_embeddings=64))
    data = [torch.randint(0, 1000, (16,)) for _ in range(4 * steps)]

    def collate(items):
        ids = torch.stack(items)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def loss(model, batch):
        states = model(**batch).last_hidden_state
        return LossOutput(states.float().pow(2).mean(), int(batch["input_ids"].numel()), {})

    config = TrainConfig(epochs=1, batch_size=2, lr=1e-3, warmup_steps=0, max_steps=steps, save_every=10**6,
                         log_every=10**6, dist_timeout_s=20.0 if hang else 300.0)
    init_distributed(timeout_s=config.dist_timeout_s)
    trainer = Trainer(model, loss, data, collate, config, Path(out_dir) / "run", device=device, resume=False)
    started = time.perf_counter()  # after the rendezvous: the steps (and the checkpoint at the end)
    trainer.train()
    seconds = time.perf_counter() - started
    torch.save({"params": {k: v.cpu() for k, v in model.state_dict().items()}, "seconds": seconds},
               Path(out_dir) / f"rank{env.rank}.pt")
    cleanup()


def launch_ddp(out_dir: Path, steps: int, hang: bool, timeout: float) -> subprocess.CompletedProcess:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), DDP_WORKER_ENV: json.dumps([str(out_dir), steps, hang])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(Path(__file__).resolve())]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def ddp(ctx: Context) -> tuple[dict, list]:
    if ctx.device.type == "cuda" and torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU visible: DDP with NCCL needs 2 (one per process)")
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    run = ctx.out / "ddp"
    done = launch_ddp(run, ctx.sizes.ddp_steps, hang=False, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"DDP run failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    ranks = [torch.load(run / f"rank{r}.pt", weights_only=True) for r in range(2)]
    same = all(torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]) for k in ranks[0]["params"])
    if not same:
        raise AssertionError("the two DDP ranks ended with different parameters")
    results = {"backend": backend, "steps": ctx.sizes.ddp_steps, "seconds_rank0": ranks[0]["seconds"],
               "parameters_equal": same}
    rows = [row(f"DDP, 2 processes, {backend}, {ctx.sizes.ddp_steps} Trainer steps", "",
                f"{ranks[0]['seconds'] / ctx.sizes.ddp_steps * 1e3:.0f} ms/step", "", "parameters equal on both ranks")]
    if backend == "nccl":  # what a user sees when a peer hangs: the watchdog, not our one line
        hung = launch_ddp(ctx.out / "ddp-hang", 2, hang=True, timeout=240)
        lines = [line for line in hung.stderr.splitlines() if "atchdog" in line or "error:" in line or "ended" in line]
        results["hung_peer"] = {"returncode": hung.returncode, "lines": lines[-8:]}
        rows.append(row("a peer that hangs (--dist-timeout 20 s)", "", f"exit {hung.returncode}", "",
                        (lines[-1] if lines else "no watchdog line")[:160]))
    return results, rows


# ------------------------------------------------------------------------------ driver


RUNNERS = {"attention": attention, "gather": gather, "cluster": cluster, "faiss": faiss_section,
           "skd_step": skd_step, "replace": replace, "ddp": ddp}


def meta(sizes: Sizes, device: torch.device) -> dict:
    import transformers

    info = {"date": dt.date.today().isoformat(), "mode": "tiny" if sizes is TINY else "gpu", "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else f"CPU, {os.cpu_count()} cores ({platform.machine()})"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "sizes": asdict(sizes)}
    if device.type == "cuda":
        info["gpus_visible"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return info


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"# GPU check ({m['mode']}), {m['date']}", "",
             f"{m['device_name']} ({m['device']}); torch {m['torch']}, CUDA {m['cuda']}, transformers "
             f"{m['transformers']}, Python {m['python']}; {report['seconds']:.0f} s in all", "",
             "| section | status | measurement | baseline | ours | ratio | check |", "|---|---|---|---|---|---|---|"]
    for name, section in report["sections"].items():
        if section["status"] != "ok":
            why = section.get("reason") or section.get("error")
            lines.append(f"| {name} | {section['status']} | {why} | | | | |")
            continue
        for r in section["rows"]:
            lines.append(f"| {name} | ok | {r['measurement']} | {r['baseline']} | {r['ours']} | {r['ratio']} | {r['check']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if os.environ.get(DDP_WORKER_ENV):
        ddp_worker(*json.loads(os.environ[DDP_WORKER_ENV]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--tiny", action="store_true", help="the same code on the CPU at toy sizes")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA device here; --tiny runs the same code on the CPU", file=sys.stderr)
        return 2
    sizes, device = (TINY, torch.device("cpu")) if args.tiny else (FULL, torch.device("cuda", 0))
    if args.tiny:  # toy sizes gain nothing from threads, and a shared CI machine loses by them
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(1)
        threadpool_limits(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"meta": meta(sizes, device), "sections": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        ctx = Context(sizes, device, Path(scratch))
        for name in args.only:
            section_started = time.perf_counter()
            try:
                results, rows = RUNNERS[name](ctx)
                section = {"status": "ok", "results": results, "rows": rows}
            except Skip as skip:
                section = {"status": "skipped", "reason": str(skip)}
            except Exception as exc:  # recorded, and the other sections still run
                section = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:1000],
                           "traceback": traceback.format_exc()[-4000:]}
            section["seconds"] = round(time.perf_counter() - section_started, 2)
            report["sections"][name] = section
            print(f"gpu_check: {name}: {section['status']} ({section['seconds']} s)", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if any(s["status"] == "failed" for s in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
