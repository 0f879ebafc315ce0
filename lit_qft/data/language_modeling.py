"""Causal language modelling on plain text: pack into fixed-length blocks, or pad documents per batch."""

from __future__ import annotations

import functools

import torch
from datasets import Dataset

from lit_qft.data.base import Side, TextDataModule, pad, truncate
from lit_qft.data.sources import resolve_text_source

__all__ = ["LanguageModelingDataModule", "pack_blocks", "resolve_text_source"]


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


def _encode_documents(batch, *, tokenizer, column: str, packing: bool, block_size: int, side: Side):
    ids = tokenizer(batch[column], add_special_tokens=False)["input_ids"]
    if not packing:  # one document per row: EOS appended, then cut to the block
        ids = [truncate(x + [tokenizer.eos_token_id], block_size, side) for x in ids]
    return {"input_ids": ids}


class LanguageModelingDataModule(TextDataModule):
    """Text for causal LM fine-tuning: packed into fixed-length blocks, or one padded document per row.

    Args:
        source: Built-in corpus (``web-english``: the World English Bible, public domain), a local
            ``.txt`` (one document per line) / ``.csv`` / ``.jsonl`` / ``.json`` / ``.parquet`` file,
            or a hub dataset id (``Salesforce/wikitext`` with ``subset: wikitext-2-raw-v1``).
        tokenizer: ``gpt2`` (real GPT-2 BPE, offline), ``smollm2`` (offline), a hub id or a folder.
        block_size: Tokens per training sequence; must not exceed the model's context length.
        batch_size: Sequences per batch, per process.
        val_fraction: Share of documents held out for validation (split before packing), when
            ``val_split`` is not given.
        max_documents: Use only the first N training documents (after shuffling); ``null`` uses all.
        num_workers: DataLoader worker processes.
        num_proc: Processes for tokenization with ``datasets.map``.
        seed: Seed for the document shuffle and split.
        text_column: Column holding the text (``text`` for ``.txt`` files).
        packing: ``true``: concatenate documents and cut into full blocks (no padding).
            ``false``: one document per row, cut to ``block_size``, padded per batch (padding masked in the loss).
        split: Split to train on (hub datasets and folders).
        val_split: Split to validate on (e.g. ``validation``); ``null`` splits off ``val_fraction``.
        subset: Hub dataset configuration (e.g. ``wikitext-2-raw-v1``).
        padding_side: Where padding goes when ``packing`` is off.
        truncation_side: Which end of a long document is cut when ``packing`` is off.
    """

    length_flag = "block_size"

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
        text_column: str = "text",
        packing: bool = True,
        split: str = "train",
        val_split: str | None = None,
        subset: str | None = None,
        padding_side: Side = "right",
        truncation_side: Side = "right",
    ) -> None:
        super().__init__(
            source=source, tokenizer=tokenizer, batch_size=batch_size, max_length=block_size,
            val_fraction=val_fraction, val_split=val_split, split=split, subset=subset,
            max_examples=max_documents, padding_side=padding_side, truncation_side=truncation_side,
            num_workers=num_workers, num_proc=num_proc, seed=seed,
        )
        self.save_hyperparameters()
        self.text_column, self.packing, self.block_size = text_column, packing, block_size

    def columns(self) -> dict[str, str]:
        return {"text_column": self.text_column}

    def settings(self) -> dict:
        return {**super().settings(), "packing": self.packing}

    def encoder(self):
        return functools.partial(
            _encode_documents, tokenizer=self.tokenizer, column=self.text_column, packing=self.packing,
            block_size=self.block_size, side=self.truncation_side,
        )

    def postprocess(self, ds: Dataset) -> Dataset:
        if not self.packing:
            return ds
        block, eos = self.block_size, self.tokenizer.eos_token_id
        return ds.map(lambda b: {"input_ids": pack_blocks(b["input_ids"], block, eos)},
                      batched=True, batch_size=1000, desc="Packing", load_from_cache_file=False)

    @property
    def task(self):
        from lit_qft.tasks import LanguageModeling

        return LanguageModeling()

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [list(r["input_ids"]) for r in rows]
        input_ids, mask = pad(seqs, self.tokenizer.pad_token_id, self.padding_side)
        labels = input_ids.masked_fill(mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
