"""Shared machinery of the task DataModules: load, check, split, tokenize once (cached), pad, batch."""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from torch.utils.data import DataLoader

from lit_qft.assets import atomic_dir, cache_dir, load_tokenizer
from lit_qft.data.sources import check_columns, check_not_empty, describe, drop_empty, load_source
from lit_qft.resume import resumable_loader

Side = Literal["left", "right"]

# Bump when an encoding changes, so older cached datasets are not reused silently.
_CACHE_FORMAT = "v1"


def code_fingerprint(cls: type) -> str:
    """A hash of the source files that define ``cls``'s encoding, so a code change never reuses a stale cache."""
    h = hashlib.sha256()
    for klass in cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is not None and klass.__module__.startswith("lit_qft"):
            h.update(inspect.getsource(module).encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in a tokenizer that changes the ids it produces."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((type(tokenizer).__name__, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id,
                   tokenizer.bos_token_id)).encode())
    return h.hexdigest()[:16]


def pad(seqs: list[list[int]], pad_id: int, side: Side, fill_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``seqs`` to one length on ``side``; return ``(ids, attention_mask)``.

    With ``fill_labels`` the padding value is ``-100`` (ignored by the loss) instead of ``pad_id``.
    """
    width = max(len(s) for s in seqs)
    value = -100 if fill_labels else pad_id
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.as_tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def truncate(ids: list[int], max_length: int, side: Side) -> list[int]:
    """Keep at most ``max_length`` ids, cutting from ``side``."""
    if len(ids) <= max_length:
        return ids
    return ids[len(ids) - max_length:] if side == "left" else ids[:max_length]


class TextDataModule(L.LightningDataModule):
    """Base class: subclasses name their columns, encode a batch of rows and collate encoded rows.

    Tokenized splits are saved under ``<cache>/tokenized/<class>-<hash>``, keyed by the raw
    dataset's fingerprint (which changes with the file's content), the tokenizer and every setting
    that changes the encoding; a second run with the same settings loads them instead of
    tokenizing again (``self.cache_hit`` tells which happened).
    """

    #: Name of the flag that bounds the sequence length, for error messages.
    length_flag = "max_length"

    def __init__(
        self, *, source: str, tokenizer: str, batch_size: int, max_length: int, val_fraction: float,
        val_split: str | None, split: str, subset: str | None, max_examples: int | None,
        padding_side: Side, truncation_side: Side, num_workers: int, num_proc: int | None, seed: int,
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"--data.{self.length_flag}={max_length} must be at least 2")
        if val_split is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"--data.val_fraction={val_fraction} must be between 0 and 1")
        if batch_size < 1:
            raise ValueError(f"--data.batch_size={batch_size} must be at least 1")
        for flag, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"--data.{flag}={side!r} must be 'left' or 'right'")
        self.source, self.split, self.subset, self.val_split = source, split, subset, val_split
        self.batch_size, self.max_length, self.val_fraction = batch_size, max_length, val_fraction
        self.max_examples, self.num_workers, self.num_proc, self.seed = max_examples, num_workers, num_proc, seed
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.tokenizer_name = tokenizer
        self.tokenizer = load_tokenizer(tokenizer)  # sets the pad token (EOS) when the tokenizer has none
        self.tokenizer.padding_side = padding_side
        self.tokenizer.truncation_side = truncation_side
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.cache_hit: bool | None = None
        self.cache_path: Path | None = None

    # ------------------------------------------------------------------ subclass API
    def columns(self) -> dict[str, str]:
        """``{flag: column}`` of the columns this task reads (text columns first)."""
        raise NotImplementedError

    def text_columns(self) -> list[str]:
        """Columns holding text; rows where one is empty are dropped."""
        return list(self.columns().values())

    def validate(self, ds: Dataset, where: str) -> None:
        """Extra checks on the raw rows (e.g. labels in the declared set)."""

    def encoder(self) -> Callable[[dict[str, list]], dict[str, list]]:
        """A picklable batched ``datasets.map`` function from raw columns to encoded columns."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the encoding (part of the cache key)."""
        return {"max_length": self.max_length, "truncation_side": self.truncation_side}

    def postprocess(self, ds: Dataset) -> Dataset:
        """Transform an encoded split (e.g. pack into blocks)."""
        return ds

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def task(self):
        """The :mod:`lit_qft.tasks` object that trains and evaluates on this module's batches."""
        raise NotImplementedError

    # ------------------------------------------------------------------ loading and caching
    def _load(self, split: str) -> tuple[Dataset, str]:
        ds = load_source(self.source, split=split, subset=self.subset)
        where = describe(self.source, split)
        check_not_empty(ds, where)
        if any("." in c and c not in ds.column_names for c in self.columns().values()):
            ds = ds.flatten()  # nested columns ({"translation": {"en", "es"}}) as "translation.en"
        check_columns(ds, self.columns(), where)
        return ds, where

    def _clean(self, ds: Dataset, where: str) -> Dataset:
        ds = ds.select_columns(list(dict.fromkeys(self.columns().values())))
        ds = drop_empty(ds, self.text_columns(), num_proc=self.num_proc)
        check_not_empty(ds, f"{where} (after dropping empty rows)")
        self.validate(ds, where)
        ds = ds.shuffle(seed=self.seed)
        return ds

    def _cache_key(self, raw: list[Dataset]) -> str:
        spec = {
            "format": _CACHE_FORMAT, "class": type(self).__name__, "code": code_fingerprint(type(self)), "data": [d._fingerprint for d in raw],
            "source": self.source, "split": self.split, "val_split": self.val_split, "subset": self.subset,
            "val_fraction": self.val_fraction, "max_examples": self.max_examples, "seed": self.seed,
            "columns": self.columns(), "tokenizer": tokenizer_fingerprint(self.tokenizer), **self.settings(),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _encode(self, ds: Dataset, desc: str) -> Dataset:
        # datasets hashes module-level functions by name, not code: its own map cache could go
        # stale across code changes, so we skip it and cache under our own key instead.
        ds = ds.map(self.encoder(), batched=True, remove_columns=ds.column_names, num_proc=self.num_proc,
                    desc=f"Tokenizing {desc}", load_from_cache_file=False)
        return self.postprocess(ds)

    def prepare_splits(self) -> DatasetDict:
        """Tokenized ``train``/``validation`` splits, from the cache when the same run was prepared before."""
        train_raw, where = self._load(self.split)
        raw = [train_raw]
        if self.val_split is not None:
            val_raw, val_where = self._load(self.val_split)
            raw.append(val_raw)
        self.cache_path = cache_dir("tokenized") / f"{type(self).__name__}-{self._cache_key(raw)}"
        if (self.cache_path / "dataset_dict.json").is_file():
            self.cache_hit = True
            return load_from_disk(str(self.cache_path))
        self.cache_hit = False
        train = self._clean(train_raw, where)
        if self.max_examples:
            train = train.select(range(min(self.max_examples, len(train))))
        if self.val_split is not None:
            val = self._clean(val_raw, val_where)
        else:
            if len(train) < 2:
                raise ValueError(f"--data.source: {where} needs at least 2 examples to split off validation")
            parts = train.train_test_split(test_size=self.val_fraction, seed=self.seed)
            train, val = parts["train"], parts["test"]
        splits = DatasetDict({"train": self._encode(train, "train"), "validation": self._encode(val, "validation")})
        self._check_sizes(splits)
        with atomic_dir(self.cache_path) as tmp:
            splits.save_to_disk(str(tmp))
        return load_from_disk(str(self.cache_path))  # memory-mapped, like a cache hit

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        splits = self.prepare_splits()
        self.train_dataset, self.val_dataset = splits["train"], splits["validation"]

    def _check_sizes(self, splits: DatasetDict) -> None:
        for name, ds in (("training", splits["train"]), ("validation", splits["validation"])):
            if len(ds) == 0:
                raise ValueError(
                    f"--data.source: the {name} split is empty after tokenization; use more data "
                    f"or a smaller --data.{self.length_flag}"
                )

    # ------------------------------------------------------------------ loaders
    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds, batch_size=self.batch_size, shuffle=shuffle, collate_fn=self.collate,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # Seeded, stateful and rank-aware: a resumed run continues mid-epoch in the same order,
        # and N processes see the same global batches as one (lit_qft.resume, docs/reliability.md).
        return resumable_loader(
            self.train_dataset, batch_size=self.batch_size, seed=self.seed, collate_fn=self.collate,
            num_workers=self.num_workers, trainer=self.trainer,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
