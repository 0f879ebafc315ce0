"""Translation with a causal LM: ``<source> -> <target><eos>``, loss on the target tokens only."""

from __future__ import annotations

import functools

import torch
from datasets import Dataset

from lit_qft.data.base import Side, TextDataModule, pad, truncate


def _encode_pairs(batch, *, tokenizer, source_column, target_column, template, max_length, max_target_length, side):
    """Prompt ids, target ids (+EOS) and the reference text; the target keeps up to ``max_target_length``."""
    before, after = template.split("{source}")
    pre, post = (tokenizer(s, add_special_tokens=False)["input_ids"] if s else [] for s in (before, after))
    sources = tokenizer(batch[source_column], add_special_tokens=False)["input_ids"]
    targets = tokenizer([" " + t.strip() for t in batch[target_column]], add_special_tokens=False)["input_ids"]
    prompts, answers = [], []
    for src, tgt in zip(sources, targets):
        tgt = tgt[: max_target_length - 1] + [tokenizer.eos_token_id]
        room = max(max_length - len(tgt) - len(pre) - len(post), 0)
        prompts.append(pre + truncate(src, room, side) + post)
        answers.append(tgt)
    return {"prompt_ids": prompts, "target_ids": answers, "reference": [t.strip() for t in batch[target_column]]}


def _shorter_than(batch, max_length):
    return [len(p) + len(t) <= max_length for p, t in zip(batch["prompt_ids"], batch["target_ids"])]


class TranslationDataModule(TextDataModule):
    """Sentence pairs for translation fine-tuning of a causal LM.

    Each example is ``template`` filled with the source (default ``"<source> ->"``) followed by the
    target and EOS; only target tokens carry a loss. Validation batches also carry the prompts
    left-padded for greedy generation and the reference texts for BLEU / chrF.

    Args:
        source: ``bible-en-es`` (built-in, offline: English -> Spanish verse pairs), a local
            ``.jsonl``/``.json``/``.csv``/``.parquet`` file, or a hub dataset id.
        tokenizer: ``gpt2`` (offline), ``smollm2`` (offline), a hub id or a folder.
        source_column: Column holding the text to translate (``translation.en`` style nested
            columns are not supported: flatten them first).
        target_column: Column holding the translation.
        template: Prompt; ``{source}`` is replaced by the source text.
        max_length: Longest prompt + target in tokens; longer sources are cut (``truncation_side``).
        max_target_length: Longest target in tokens (EOS included); longer targets are cut.
        max_new_tokens: Tokens generated per example on validation (default: ``max_target_length``).
        batch_size: Examples per batch.
        val_fraction: Share held out for validation when ``val_split`` is not given.
        val_split: Split to validate on.
        split: Split to train on.
        subset: Hub dataset configuration (``en-es`` for ``Helsinki-NLP/opus_books``).
        max_examples: Use only the first N examples (after shuffling, before splitting off validation).
        truncation_side: Which end of a long source is cut.
        num_workers: DataLoader worker processes.
        num_proc: Processes for tokenization.
        seed: Seed for shuffling and the split.
    """

    def __init__(
        self,
        source: str = "bible-en-es",
        tokenizer: str = "gpt2",
        source_column: str = "source",
        target_column: str = "target",
        template: str = "{source} ->",
        max_length: int = 128,
        max_target_length: int = 64,
        max_new_tokens: int | None = None,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        val_split: str | None = None,
        split: str = "train",
        subset: str | None = None,
        max_examples: int | None = None,
        truncation_side: Side = "right",
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 42,
    ) -> None:
        # Right padding for teacher forcing; generation prompts are padded on the left in collate.
        super().__init__(
            source=source, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
            val_fraction=val_fraction, val_split=val_split, split=split, subset=subset,
            max_examples=max_examples, padding_side="right", truncation_side=truncation_side,
            num_workers=num_workers, num_proc=num_proc, seed=seed,
        )
        self.save_hyperparameters()
        if "{source}" not in template:
            raise ValueError("--data.template must contain {source}")
        if not 2 <= max_target_length < max_length:
            raise ValueError(f"--data.max_target_length={max_target_length} must be between 2 and --data.max_length - 1")
        self.source_column, self.target_column, self.template = source_column, target_column, template
        self.max_target_length = max_target_length
        self.max_new_tokens = max_new_tokens or max_target_length

    def columns(self) -> dict[str, str]:
        return {"source_column": self.source_column, "target_column": self.target_column}

    def settings(self) -> dict:
        return {**super().settings(), "template": self.template, "max_target_length": self.max_target_length}

    def encoder(self):
        return functools.partial(
            _encode_pairs, tokenizer=self.tokenizer, source_column=self.source_column,
            target_column=self.target_column, template=self.template, max_length=self.max_length,
            max_target_length=self.max_target_length, side=self.truncation_side,
        )

    def postprocess(self, ds: Dataset) -> Dataset:
        # A template longer than max_length leaves no room for the source: drop such rows.
        return ds.filter(functools.partial(_shorter_than, max_length=self.max_length), batched=True, load_from_cache_file=False)

    @property
    def task(self):
        from lit_qft.tasks import Translation

        return Translation(max_new_tokens=self.max_new_tokens)

    def collate(self, rows: list[dict]) -> dict:
        pad_id = self.tokenizer.pad_token_id
        prompts = [list(r["prompt_ids"]) for r in rows]
        seqs = [p + list(r["target_ids"]) for p, r in zip(prompts, rows)]
        input_ids, mask = pad(seqs, pad_id, "right")
        labels = torch.full_like(input_ids, -100)
        for i, (p, r) in enumerate(zip(prompts, rows)):
            labels[i, len(p): len(p) + len(r["target_ids"])] = torch.as_tensor(list(r["target_ids"]))
        prompt_ids, prompt_mask = pad(prompts, pad_id, "left")  # left: generation appends on the right
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "prompt_ids": prompt_ids, "prompt_attention_mask": prompt_mask,
                "references": [r["reference"] for r in rows]}
