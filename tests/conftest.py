"""Shared fixtures: tiny randomly initialised Qwen3 models and a tiny tokenizer built locally."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared

ONE_THREAD_ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # for the scripts the tests start


def tiny_qwen3(vocab_size=64, hidden_size=64, layers=2, heads=2, kv_heads=1, head_dim=32, seed=0,
               dtype=torch.float32):
    """A random Qwen3ForCausalLM small enough to run in milliseconds on a CPU (head_dim 32: vLLM's CPU
    attention rejects 16)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen3ForCausalLM(config).to(dtype).eval()


def tiny_tokenizer(with_think=True, eos_token="<|im_end|>"):
    """Character-level fast tokenizer with ChatML special tokens and a Qwen-style chat template.
    eos_token="<|endoftext|>" adds that token as the EOS, as base checkpoints name it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"] + (["<think>", "</think>"] if with_think else []) \
        + ([eos_token] if eos_token != "<|im_end|>" else [])
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token="<|pad|>",
                                   chat_template=template)


def write_tiny_run(d: Path, edit=None) -> Path:
    """d/student (seed 0), d/teacher (seed 1), same tokenizer, and d/data.jsonl with 40 problems: the
    inputs of a tiny train.py run. `edit(name, model, tokenizer)` may change a model before it is saved."""
    tok = tiny_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        m = tiny_qwen3(vocab_size=len(tok), seed=seed)
        if edit is not None:
            edit(name, m, tok)
        m.config.eos_token_id, m.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
        m.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    (d / "data.jsonl").write_text("".join(json.dumps({"problem": f"What is {i} + {2 * i}?"}) + "\n"
                                          for i in range(40)))
    return d


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@torch.no_grad()
def favour_token(model, token_id: int, input_ids: list[int], scale: float = 0.5):
    """Make `token_id` likely after any context: its lm_head row becomes `scale` times the unit mean
    direction of the model's last hidden states over `input_ids`, which every position's hidden state
    leans towards (a random tiny Qwen3: about 8% per token at scale 0.5, against 1% uniformly)."""
    hidden = model.get_decoder()(input_ids=torch.tensor([input_ids])).last_hidden_state[0]  # (T, H)
    direction = hidden.mean(0)
    model.get_output_embeddings().weight[token_id] = scale * direction / direction.norm()
    return model
