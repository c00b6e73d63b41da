"""What merging LLM2Vec's supervised LoRA into bf16 weights costs, against keeping it a branch.

    PYTHONPATH=. python bench/bench_lora_merge.py

llm2vec loads the base in bf16, merges the MNTP adapter, and keeps the supervised adapter as a
PEFT LoRA branch (its weights in float32, added to each bf16 layer output); embdistill merges
both (``teachers._merge_lora``), so its teacher is a plain bf16 model that a student can be cut
from. Merging rounds ``W + scale * B @ A`` to bf16 once more. On a random bidirectional Llama
(float32 reference = the bf16 base weights plus the exact update, run in float32) this prints,
for several sizes of the update ``|scale * B @ A| / |W|``, the error of the final token states
(relative L2, mean over tokens) and of the mean-pooled embeddings (1 - cosine) of:

* branch: bf16 base + the float32 LoRA branch (llm2vec's way);
* merged in bf16: ``_merge_lora`` on the bf16 model (ours);
* merged in float32, then rounded to bf16 once (a lower bound for any merged bf16 model).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform

import torch
from transformers import LlamaConfig

from embdistill.teachers import BidirectionalLlamaModel, mean_pool

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(model, relative: float, seed: int, rank: int = 16, alpha: int = 32):
    """``model`` wrapped in a random LoRA (LLM2Vec supervised's r 16, alpha 32, every linear
    layer) whose update has norm ``relative`` times its layer's weight."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS,
                                            init_lora_weights=False))
    for module in peft.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            update = module.scaling["default"] * (b.float() @ a.float())
            b.data *= relative * module.base_layer.weight.float().norm() / update.norm()
    return peft


def merged(peft) -> torch.nn.Module:
    return copy.deepcopy(peft).merge_and_unload()


@torch.no_grad()
def states(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state.float()


def errors(output: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean relative L2 error of token states, mean 1 - cosine of pooled embeddings)."""
    relative = ((output - reference).norm(dim=-1) / reference.norm(dim=-1))[mask.bool()].mean()
    pooled = torch.nn.functional.cosine_similarity(mean_pool(output, mask), mean_pool(reference, mask), dim=-1)
    return float(relative), float((1 - pooled).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--relative", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
                         num_key_value_heads=4, intermediate_size=2 * args.hidden, vocab_size=2000,
                         max_position_embeddings=args.length, attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    base = BidirectionalLlamaModel(config).to(torch.bfloat16).eval()  # the MNTP-merged bf16 weights
    batch = {"input_ids": torch.randint(0, 2000, (args.texts, args.length)),
             "attention_mask": torch.ones(args.texts, args.length, dtype=torch.long)}
    mask = batch["attention_mask"]

    print(f"{dt.date.today()}; {platform.machine()}, torch {torch.__version__}, CPU; random bidirectional "
          f"Llama (hidden {args.hidden}, {args.layers} layers), LoRA r 16 alpha 32 on every linear layer, "
          f"{args.texts} x {args.length} tokens\n")
    print("| update / W | branch (llm2vec): states, pooled | merged in bf16 (ours): states, pooled "
          "| merged in fp32, rounded once: states, pooled | ours vs branch: states |")
    print("|---|---|---|---|---|")
    for relative in args.relative:
        branch = with_lora(copy.deepcopy(base), relative, args.seed + 1).eval()
        exact = merged(with_lora(copy.deepcopy(base).float(), relative, args.seed + 1))  # float32 all along
        reference = states(exact, batch)
        ours = merged(branch)
        once = copy.deepcopy(exact).to(torch.bfloat16)
        rows = [errors(states(m, batch), reference, mask) for m in (branch, ours, once)]
        between = errors(states(ours, batch), states(branch, batch), mask)[0]
        cells = " | ".join(f"{s:.2e}, {p:.1e}" for s, p in rows)
        print(f"| {relative:g} | {cells} | {between:.2e} |")


if __name__ == "__main__":
    main()
