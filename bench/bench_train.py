"""Benchmark: SKD training and its targets stage against a plain forward+backward of the student.

    PYTHONPATH=. python bench/bench_train.py --base-dir /tmp/skd_bbc --threads 1
    PYTHONPATH=. python bench/bench_train.py --random-llama 8b --device cuda --length 512   # GPU

Default inputs: the task's train.json and sense dictionary under --base-dir (scripts 00-03),
the MiniLM teacher and its 2-layer student, batches of --batch examples cut at --length tokens.
``--random-llama 8b``: random weights in the Llama-3-8B shape (bidirectional, bf16 teacher,
4-layer float32 student with bf16 autocast on CUDA), random token ids, a synthetic dictionary
(--entries tokens, k uniform in [--k-min, --k-max]); ``tiny`` is the same path at toy size.

Every variant trains a fresh student on the same batches with AdamW, in the same process:

* plain: student forward, backward of a trivial loss (mean square of the states), AdamW step:
  the cost any distillation pays (the baseline);
* skd: the real objective on stored targets (SenseDistillation: student forward, sense loss
  against the targets the targets stage computed once), backward, AdamW step;
* mse: the ablation, whose teacher runs at every step (StateMatching);
* parts: the teacher's forward alone and the sense loss alone (forward + backward on fixed states);
* trainer: embdistill.training.Trainer end to end over the same steps (data, tokenisation,
  targets collation, logging every step); its checkpoint writes and the final plot are timed
  apart and reported separately;
* targets: the targets stage's work (``text_targets``: tokenise, teacher forward, nearest
  senses) over the examples against a bare teacher forward over the same batches (tokenise +
  ``token_states``, nothing kept: the baseline).

Throughput counts every input token (attention mask), best of --repeats passes after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, run as a script or imported
from common import add_machine_args, machine, synchronize  # noqa: E402
from embdistill.losses import SenseLoss
from embdistill.paths import Paths, base_dir
from embdistill.senses.dictionary import load_sense_dict
from embdistill.senses.packed import PackedSenses
from embdistill.senses.targets import SenseTargets, TargetCollator, text_targets
from embdistill.objectives import SenseDistillation, StateMatching
from embdistill.students import build_student
from embdistill.teachers import BidirectionalLlamaModel, Teacher, load_teacher
from embdistill.input_format import LLM2VEC
from embdistill.texts import read_train_texts
from embdistill.train_config import TrainConfig
from embdistill.training import Trainer

LLAMA_SHAPES = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000),
}




def task_inputs(args, device):
    """MiniLM (or --teacher), the task's examples, batches and sense dictionary."""
    teacher = load_teacher(args.teacher, device=device)
    paths = Paths(base_dir(args.base_dir), args.task, teacher.slug)
    examples = read_train_texts(paths)[: args.batch * args.steps]
    batches = [teacher.tokenize(examples[i : i + args.batch], args.length)
               for i in range(0, len(examples), args.batch)]
    senses = load_sense_dict(paths.sense_dict, hidden_size=teacher.hidden_size)
    return teacher, examples, batches, senses, teacher.vocab_size


def random_llama_inputs(args, device):
    """A random bidirectional Llama teacher, random token batches, a synthetic dictionary."""
    from transformers import LlamaConfig

    shape = LLAMA_SHAPES[args.random_llama]
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**shape, max_position_embeddings=max(args.length, 128))
    with torch.device(device):
        model = BidirectionalLlamaModel(config).to(dtype)
    model.eval().requires_grad_(False)
    teacher = Teacher(f"random-llama-{args.random_llama}", "random-llama", model, None, normalize=False,
                      max_seq_length=args.length, input_format=LLM2VEC)
    rng = np.random.default_rng(args.seed)
    vocab = shape["vocab_size"]
    batches = [{"input_ids": torch.from_numpy(rng.integers(0, vocab, (args.batch, args.length))),
                "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
                "embed_mask": torch.ones(args.batch, args.length, dtype=torch.long)}
               for _ in range(args.steps)]
    tokens = rng.choice(vocab, size=min(args.entries, vocab), replace=False)
    senses = {int(t): rng.normal(size=(int(rng.integers(args.k_min, args.k_max + 1)), shape["hidden_size"]))
              .astype(np.float16) for t in tokens}
    return teacher, None, batches, senses, vocab


def adamw_step(student, objective, autocast: dict):
    """One training step of ``objective(student, batch) -> loss`` with AdamW, as a function of
    the batch (forward under ``autocast``, backward, optimiser step)."""
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)

    def step(batch):
        with torch.autocast(**autocast):
            loss = objective(student, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_passes(variants: dict, device, repeats: int) -> dict[str, float]:
    """Best time of ``repeats`` passes of each variant (name -> (step, items)), after one warm-up
    step each. Passes are interleaved (A B C, A B C, ...), so that a load change on a shared
    machine hits every variant alike instead of the one measured at that moment."""
    for step, items in variants.values():
        step(items[0])
    synchronize(device)
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, (step, items) in variants.items():
            start = time.perf_counter()
            for item in items:
                step(item)
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--base-dir", default=None, help="where text_train/ and sense_dict/ are")
    parser.add_argument("--task", default="bbc-news")
    parser.add_argument("--teacher", default="minilm")
    parser.add_argument("--student-layers", type=int, default=None, help="default: 2 (encoder), 4 (Llama)")
    parser.add_argument("--random-llama", choices=sorted(LLAMA_SHAPES), default=None)
    parser.add_argument("--batch", type=int, default=3, help="examples per step (the paper's 3)")
    parser.add_argument("--length", type=int, default=128, help="max tokens per example")
    parser.add_argument("--steps", type=int, default=10, help="steps per pass")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--entries", type=int, default=20000, help="(--random-llama) dictionary tokens")
    parser.add_argument("--k-min", type=int, default=1)
    parser.add_argument("--k-max", type=int, default=60)
    add_machine_args(parser)
    args = parser.parse_args()
    device = machine(args)
    make_inputs = random_llama_inputs if args.random_llama else task_inputs
    teacher, examples, batches, senses, vocab_size = make_inputs(args, device)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    senses = PackedSenses(senses, vocab_size).to(device)
    sense_loss = SenseLoss(senses)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.autocast(**autocast):  # the targets stage's output, computed once
        for batch in batches:
            batch["sense_targets"] = senses.targets(teacher.token_states(batch), batch["input_ids"],
                                                    batch["embed_mask"])
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    scored = sum(int((batch["sense_targets"] >= 0).sum()) for batch in batches)

    def training_step(objective):
        return adamw_step(build_student(teacher, args.student_layers).to(device), objective, autocast)

    def plain_loss(student, batch):
        states = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return states.float().pow(2).mean()

    with torch.autocast(**autocast):
        fixed = [(teacher.token_states(b).float(), b) for b in batches]

    def loss_alone(item):
        states, batch = item
        student_states = (states + 0.1).requires_grad_(True)
        sense_loss(student_states, batch["input_ids"], batch["sense_targets"])[0].backward()

    def teacher_forward(batch):
        with torch.autocast(**autocast):
            teacher.token_states(batch)

    times = time_passes({
        "plain": (training_step(plain_loss), batches),
        "skd": (training_step(lambda s, b: SenseDistillation(senses)(s, b).loss), batches),
        "mse": (training_step(lambda s, b: StateMatching(teacher)(s, b).loss), batches),
        "teacher forward": (teacher_forward, batches),
        "sense loss": (loss_alone, fixed),
    }, device, args.repeats)
    apart = {}
    if examples is not None:  # the Trainer and the targets stage tokenise examples themselves
        student = build_student(teacher, args.student_layers).to(device)
        times["trainer"], apart = time_trainer(args, teacher, senses, examples, batches, student, device)
        times["targets stage"], times["bare teacher forward"] = time_targets_stage(args, teacher, senses, examples,
                                                                                    device)

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}")
    print(f"teacher {teacher.name} ({teacher.model.config.num_hidden_layers} layers, d={teacher.hidden_size}), "
          f"student {args.student_layers or 'default'} layers; {len(batches)} steps x {args.batch} examples, "
          f"{tokens} tokens ({scored} scored by the sense loss); dictionary {len(senses.sizes)} tokens, "
          f"{len(senses.centroids)} senses")
    for name, seconds in times.items():
        ratio = "" if name == "plain" else f"  ({seconds / times['plain']:.2f}x plain)"
        print(f"{name:>20}: {seconds:7.3f} s  {tokens / seconds:9.0f} tokens/s{ratio}")
    print(f"SKD step / plain step: {times['skd'] / times['plain']:.2f}; MSE step (teacher on the fly) / plain: "
          f"{times['mse'] / times['plain']:.2f}; sense loss share of the SKD step: "
          f"{times['sense loss'] / times['skd']:.1%}")
    if examples is not None:
        print(f"Trainer end to end / plain: {times['trainer'] / times['plain']:.2f} (checkpoint writes "
              f"{apart['checkpoints']:.3f} s and the final plot {apart['plot']:.3f} s counted apart: with them "
              f"{(times['trainer'] + sum(apart.values())) / times['plain']:.2f})")
        print(f"targets stage / bare teacher forward over the same texts: "
              f"{times['targets stage'] / times['bare teacher forward']:.2f}")


def time_trainer(args, teacher, senses, examples, batches, student, device) -> tuple[float, dict]:
    """The Trainer over the same examples and steps (one pass, after a warm-up pass in the same
    process), with its checkpoint writes and final plot timed apart."""
    stored = SenseTargets(*_flat_targets(batches))
    apart = {"checkpoints": 0.0, "plot": 0.0}

    def timed(name, function):
        def wrapper(*a, **k):
            start = time.perf_counter()
            result = function(*a, **k)
            apart[name] += time.perf_counter() - start
            return result
        return wrapper

    import embdistill.training as training

    elapsed = []
    for _ in range(2):  # the first pass warms up (imports, allocator); the second is measured
        apart.update(checkpoints=0.0, plot=0.0)
        with tempfile.TemporaryDirectory() as run_dir:
            config = TrainConfig(epochs=1, batch_size=args.batch, lr=1e-6, warmup_steps=0,
                                 max_steps=len(batches), save_every=10**9, log_every=1)
            trainer = Trainer(student, SenseDistillation(senses), list(range(len(examples))),
                              TargetCollator(teacher.tokenize, examples, stored, args.length), config,
                              Path(run_dir), device=device, resume=False)
            trainer._sampler = lambda epoch: range(len(examples))  # the benchmark's batches, in order
            trainer._save_checkpoint = timed("checkpoints", trainer._save_checkpoint)
            original_plot = training.plot_metrics
            training.plot_metrics = timed("plot", original_plot)
            try:
                start = time.perf_counter()
                trainer.train()
                elapsed.append(time.perf_counter() - start)
            finally:
                training.plot_metrics = original_plot
    return elapsed[-1] - sum(apart.values()), dict(apart)


def _flat_targets(batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The benchmark batches' targets as the targets stage stores them (offsets, ids, targets)."""
    lengths, ids, targets = [], [], []
    for batch in batches:
        text = batch["embed_mask"].bool() & batch["attention_mask"].bool()
        lengths += text.sum(1).tolist()
        ids.append(batch["input_ids"][text].cpu().numpy())
        targets.append(batch["sense_targets"][text].cpu().numpy())
    return (np.concatenate([[0], np.cumsum(lengths)]), np.concatenate(ids).astype(np.int32),
            np.concatenate(targets).astype(np.int32))


def time_targets_stage(args, teacher, senses, examples, device) -> tuple[float, float]:
    """text_targets over the examples against a bare forward over the same length-sorted batches."""
    def bare(_):
        batch = teacher.tokenize(examples, args.length)
        order = torch.argsort(batch["attention_mask"].sum(1), stable=True)
        with torch.inference_mode():
            for start in range(0, len(order), args.batch):
                rows = order[start : start + args.batch]
                cols = batch["attention_mask"][rows].bool().any(0)
                teacher.token_states({key: value[rows][:, cols] for key, value in batch.items()})

    def stage(_):
        text_targets(teacher, senses, examples, args.length, args.batch)

    times = time_passes({"stage": (stage, [None]), "bare": (bare, [None])}, device, args.repeats)
    return times["stage"], times["bare"]


if __name__ == "__main__":
    main()
