"""Shared fixtures: tiny models built from config and tiny text made here (no network)."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `lit-qft fit` defaults to bf16-mixed on hardware with native bf16: pin fp32 so every machine checks the same numbers
os.environ.setdefault("LIT_QFT_DEFAULT_PRECISION", "32-true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: GPT-2 shapes small enough for CPU tests; group sizes 16/32 divide 64 and 256.
TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64}
#: Llama-style (nn.Linear) counterpart.
TINY_LLAMA = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64,
}

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their light water earth day night said god"
).split()


def make_text(path, n_docs: int = 300, seed: int = 0) -> str:
    """Write ``n_docs`` lines of pseudo-English with a learnable pattern (frequent bigrams)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            words = []
            for _ in range(rng.randint(12, 40)):
                w = rng.choice(_WORDS)
                words.append(w)
                if w == "the":  # a learnable regularity: "the" is usually followed by "light"
                    words.append("light" if rng.random() < 0.8 else "earth")
            f.write(" ".join(words) + "\n")
    return str(path)


@pytest.fixture
def text_file(tmp_path):
    return make_text(tmp_path / "tiny.txt")


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=512, **TINY_GPT2)).eval()


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, tie_word_embeddings=True, **TINY_LLAMA)).eval()
