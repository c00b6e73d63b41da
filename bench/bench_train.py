"""Benchmark: SKD training throughput against a plain forward+backward of the student.

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
* skd: the real objective (TokenDistillation: teacher forward without grad, student forward,
  sense loss), backward, AdamW step;
* parts: the teacher's forward alone and the sense loss alone (forward + backward on fixed states);
* trainer: embdistill.training.Trainer end to end over the same steps (tokenisation, one
  checkpoint and the plot included).

Throughput counts every input token (attention mask), best of --repeats passes after a warm-up.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from embdistill.losses import SenseLoss
from embdistill.paths import Paths, base_dir
from embdistill.senses.dictionary import load_sense_dict
from embdistill.students import TokenDistillation, build_student
from embdistill.teachers import BidirectionalLlamaModel, Teacher, load_teacher
from embdistill.texts import read_train_texts
from embdistill.training import Trainer, TrainConfig

LLAMA_SHAPES = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def task_inputs(args, device):
    """MiniLM (or --teacher), the task's examples, batches and sense dictionary."""
    teacher = load_teacher(args.teacher, device=device)
    paths = Paths(base_dir(args.base_dir), args.task, teacher.slug)
    examples = read_train_texts(paths)[: args.batch * args.steps]
    batches = [teacher.tokenize(examples[i : i + args.batch], args.length)
               for i in range(0, len(examples), args.batch)]
    senses = load_sense_dict(paths.sense_dict, hidden_size=teacher.hidden_size)
    return teacher, examples, batches, senses, max(len(teacher.tokenizer), teacher.model.config.vocab_size)


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
                      max_seq_length=args.length)
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


def time_passes(step, batches, device, repeats: int) -> float:
    """Best time of ``repeats`` passes over ``batches`` (after one warm-up step)."""
    step(batches[0])
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
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
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    make_inputs = random_llama_inputs if args.random_llama else task_inputs
    teacher, examples, batches, senses, vocab_size = make_inputs(args, device)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    sense_loss = SenseLoss(senses, vocab_size).to(device)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    scored = sum(int(((sense_loss.entry_of_token[b["input_ids"]] >= 0) & b["embed_mask"].bool()).sum())
                 for b in batches)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def fresh_student():
        student = build_student(teacher, args.student_layers).to(device)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
        return student, optimizer

    def training_step(objective):
        student, optimizer = fresh_student()

        def step(batch):
            with torch.autocast(**autocast):
                loss = objective(student, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def plain_loss(student, batch):
        states = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return states.float().pow(2).mean()

    distillation = TokenDistillation(teacher, sense_loss)
    times = {
        "plain": time_passes(training_step(plain_loss), batches, device, args.repeats),
        "skd": time_passes(training_step(lambda s, b: distillation(s, b).loss), batches, device, args.repeats),
    }
    with torch.autocast(**autocast):
        times["teacher forward"] = time_passes(teacher.token_states, batches, device, args.repeats)
        fixed = [(teacher.token_states(b).float(), b) for b in batches]

    def loss_alone(item):
        states, batch = item
        student_states = (states + 0.1).requires_grad_(True)
        sense_loss(student_states, states, batch["input_ids"], batch["embed_mask"])[0].backward()

    times["sense loss"] = time_passes(loss_alone, fixed, device, args.repeats)

    if examples is not None:  # the Trainer tokenises examples itself
        student, _ = fresh_student()
        with tempfile.TemporaryDirectory() as run_dir:
            config = TrainConfig(epochs=1, batch_size=args.batch, lr=1e-6, warmup_steps=0,
                                 max_steps=len(batches), save_every=10**9, log_every=10**9)
            trainer = Trainer(student, distillation, examples,
                              lambda items: teacher.tokenize(items, args.length), config, Path(run_dir),
                              device=device, resume=False)
            start = time.perf_counter()
            trainer.train()
            times["trainer"] = time.perf_counter() - start

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}")
    print(f"teacher {teacher.name} ({teacher.model.config.num_hidden_layers} layers, d={teacher.hidden_size}), "
          f"student {args.student_layers or 'default'} layers; {len(batches)} steps x {args.batch} examples, "
          f"{tokens} tokens ({scored} scored by the sense loss); dictionary {len(senses)} tokens, "
          f"{sense_loss.centroids.shape[0]} senses")
    for name, seconds in times.items():
        ratio = "" if name == "plain" else f"  ({seconds / times['plain']:.2f}x plain)"
        print(f"{name:>16}: {seconds:7.3f} s  {tokens / seconds:9.0f} tokens/s{ratio}")
    print(f"SKD step / plain step: {times['skd'] / times['plain']:.2f}; sense loss share of the SKD step: "
          f"{times['sense loss'] / times['skd']:.1%}; teacher forward share: "
          f"{times['teacher forward'] / times['skd']:.1%}")


if __name__ == "__main__":
    main()
