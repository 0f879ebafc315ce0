"""Causal language modelling on plain text: tokenize, pack into fixed-length blocks, split."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader

from lit_qft.assets import load_tokenizer


def resolve_text_source(source: str) -> Path:
    """A built-in corpus name (``web-english``) or a path to a ``.txt`` file (one document per line)."""
    path = Path(source).expanduser()
    if path.suffix:
        if not path.is_file():
            raise FileNotFoundError(f"--data.source: file {source!r} does not exist")
        return path
    from lit_qft.assets.corpora import builtin_corpus

    return builtin_corpus(source)


def pack_blocks(input_ids: list[list[int]], block_size: int, eos_token_id: int) -> list[list[int]]:
    """Concatenate documents (each followed by EOS) and cut into ``block_size`` blocks.

    The tail shorter than one block is dropped, so no padding is ever trained on. Every other token
    of every document appears exactly once, in order.
    """
    stream: list[int] = []
    for ids in input_ids:
        stream.extend(ids)
        stream.append(eos_token_id)
    n = len(stream) // block_size
    return [stream[i * block_size : (i + 1) * block_size] for i in range(n)]


class LanguageModelingDataModule(L.LightningDataModule):
    """Plain text for causal LM fine-tuning, packed into fixed-length blocks (no padding waste).

    Args:
        source: Built-in corpus (``web-english``: the World English Bible, public domain, fetched
            from Debian on first use) or a ``.txt`` file with one document per line.
        tokenizer: ``gpt2`` (real GPT-2 BPE, offline), ``smollm2`` (offline), a hub id or a folder.
        block_size: Tokens per training sequence; must not exceed the model's context length.
        batch_size: Sequences per batch, per process.
        val_fraction: Share of documents held out for validation (split before packing).
        max_documents: Use only the first N documents (after shuffling); ``null`` uses all.
        num_workers: DataLoader worker processes.
        num_proc: Processes for tokenization with ``datasets.map``.
        seed: Seed for the document shuffle and split.
    """

    def __init__(
        self,
        source: str = "web-english",
        tokenizer: str = "gpt2",
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        max_documents: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if block_size < 2:
            raise ValueError(f"--data.block_size={block_size} must be at least 2")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"--data.val_fraction={val_fraction} must be between 0 and 1")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def _load_documents(self) -> Dataset:
        path = resolve_text_source(self.hparams.source)
        ds = load_dataset("text", data_files=str(path), split="train")
        ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
        if len(ds) == 0:
            raise ValueError(f"--data.source: {path} contains no non-empty lines")
        ds = ds.shuffle(seed=self.hparams.seed)
        if self.hparams.max_documents:
            ds = ds.select(range(min(self.hparams.max_documents, len(ds))))
        return ds

    def _tokenize_and_pack(self, docs: Dataset) -> Dataset:
        tok, block, eos = self.tokenizer, self.hparams.block_size, self.tokenizer.eos_token_id
        ids = docs.map(
            lambda b: {"input_ids": tok(b["text"], add_special_tokens=False)["input_ids"]},
            batched=True, remove_columns=docs.column_names, num_proc=self.hparams.num_proc,
            desc="Tokenizing",
        )
        packed = ids.map(
            lambda b: {"input_ids": pack_blocks(b["input_ids"], block, eos)},
            batched=True, batch_size=1000, desc="Packing",
        )
        return packed.with_format("torch")

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        docs = self._load_documents()
        split = docs.train_test_split(test_size=self.hparams.val_fraction, seed=self.hparams.seed)
        self.train_dataset = self._tokenize_and_pack(split["train"])
        self.val_dataset = self._tokenize_and_pack(split["test"])
        if len(self.train_dataset) == 0 or len(self.val_dataset) == 0:
            raise ValueError(
                f"--data.source has too little text for one block of {self.hparams.block_size} tokens "
                "in both splits; use more documents or a smaller --data.block_size"
            )

    @staticmethod
    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack([r["input_ids"] for r in rows])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds, batch_size=self.hparams.batch_size, shuffle=shuffle, collate_fn=self.collate,
            num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
