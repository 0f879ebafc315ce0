"""Sentiment classification with a causal LM: a classification head, or a prompt + label word."""

from __future__ import annotations

import functools
from typing import Literal

import torch
from datasets import Dataset

from lit_qft.data.base import Side, TextDataModule, pad, truncate

Style = Literal["head", "prompt"]


def _encode_head(batch, *, tokenizer, text_column, label_column, label_index, max_length, side):
    ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
    return {"input_ids": [truncate(x, max_length, side) for x in ids],
            "class_index": [label_index[str(v)] for v in batch[label_column]]}


def _encode_prompt(batch, *, tokenizer, text_column, label_column, label_index, word_ids, template,
                   max_length, side):
    """``template`` around the text, then the label word; the text is cut so the label word always fits."""
    before, after = template.split("{text}")
    pre, post = (tokenizer(s, add_special_tokens=False)["input_ids"] if s else [] for s in (before, after))
    texts = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
    input_ids, label_mask, labels = [], [], []
    for text, value in zip(texts, batch[label_column]):
        label = label_index[str(value)]
        word = word_ids[label]
        room = max(max_length - len(pre) - len(post) - len(word), 0)
        prompt = pre + truncate(text, room, side) + post
        input_ids.append(prompt + word)
        label_mask.append([0] * len(prompt) + [1] * len(word))
        labels.append(label)
    return {"input_ids": input_ids, "label_mask": label_mask, "class_index": labels}


class SentimentDataModule(TextDataModule):
    """Labelled text for sentiment classification, in one of two styles (``style``).

    ``head``: a ``*ForSequenceClassification`` head on the last real token (GPT-2 classifier style).
    ``prompt``: ``template`` filled with the text, followed by the label word; the LM is trained on
    the label word only and predicts the label whose word's first token it scores highest.

    Args:
        source: ``rotten-tomatoes`` (built-in, offline), a local ``.csv``/``.jsonl``/``.json``/``.parquet``
            file, or a hub dataset id (``stanfordnlp/sst2`` with ``text_column: sentence``).
        tokenizer: ``gpt2`` (offline), ``smollm2`` (offline), a hub id or a folder.
        style: ``head`` (classification head) or ``prompt`` (label word scored by the LM).
        labels: The declared label set, in class order. String labels must be one of these; integer
            labels (hub ``ClassLabel``) index into it. Any other value is an error.
        label_words: Words the LM writes for each label in ``prompt`` style (default: ``labels``);
            their first tokens must differ.
        template: Prompt in ``prompt`` style; ``{text}`` is replaced by the example.
        text_column: Column holding the text.
        label_column: Column holding the label.
        max_length: Longest sequence in tokens (prompt and label word included); longer texts are cut.
        batch_size: Examples per batch.
        val_fraction: Share held out for validation when ``val_split`` is not given.
        val_split: Split to validate on (``validation`` for SST-2).
        split: Split to train on.
        subset: Hub dataset configuration.
        max_examples: Use only the first N examples (after shuffling, before splitting off validation).
        padding_side: ``left`` or ``right``; the head finds the last real token either way.
        truncation_side: Which end of a long text is cut.
        num_workers: DataLoader worker processes.
        num_proc: Processes for tokenization.
        seed: Seed for shuffling and the split.
    """

    def __init__(
        self,
        source: str = "rotten-tomatoes",
        tokenizer: str = "gpt2",
        style: Style = "head",
        labels: list[str] = ["negative", "positive"],  # noqa: B006 - jsonargparse shows the default
        label_words: list[str] | None = None,
        template: str = "Review: {text}\nSentiment:",
        text_column: str = "text",
        label_column: str = "label",
        max_length: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        val_split: str | None = None,
        split: str = "train",
        subset: str | None = None,
        max_examples: int | None = None,
        padding_side: Side = "left",
        truncation_side: Side = "right",
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 42,
    ) -> None:
        super().__init__(
            source=source, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
            val_fraction=val_fraction, val_split=val_split, split=split, subset=subset,
            max_examples=max_examples, padding_side=padding_side, truncation_side=truncation_side,
            num_workers=num_workers, num_proc=num_proc, seed=seed,
        )
        self.save_hyperparameters()
        if style not in ("head", "prompt"):
            raise ValueError(f"--data.style={style!r} must be 'head' or 'prompt'")
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"--data.labels={labels} must list at least 2 distinct labels")
        words = list(label_words) if label_words is not None else list(labels)
        if len(words) != len(labels):
            raise ValueError(f"--data.label_words needs one word per label ({len(labels)}), got {len(words)}")
        if style == "prompt" and "{text}" not in template:
            raise ValueError("--data.template must contain {text}")
        self.style, self.labels, self.label_words, self.template = style, list(labels), words, template
        self.text_column, self.label_column = text_column, label_column
        # A leading space: GPT-2-style BPE gives " positive" its own token after "Sentiment:".
        self.word_ids = [self.tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
        firsts = [w[0] for w in self.word_ids]
        if style == "prompt" and len(set(firsts)) != len(firsts):
            raise ValueError(f"--data.label_words={words} start with the same token; choose words that differ at the start")

    def columns(self) -> dict[str, str]:
        return {"text_column": self.text_column, "label_column": self.label_column}

    def text_columns(self) -> list[str]:
        return [self.text_column]

    def _label_index(self, ds: Dataset | None = None) -> dict[str, int]:
        """Raw label value (as text) -> class index; integer labels index ``labels``."""
        index = {name: i for i, name in enumerate(self.labels)}
        index.update({str(i): i for i in range(len(self.labels))})
        return index

    def validate(self, ds: Dataset, where: str) -> None:
        index = self._label_index()
        bad = sorted({str(v) for v in ds.unique(self.label_column)} - set(index))
        if bad:
            raise ValueError(
                f"--data.labels: {where} column {self.label_column!r} has labels {bad[:5]} not in the "
                f"declared label set {self.labels}"
            )

    def settings(self) -> dict:
        return {**super().settings(), "style": self.style, "labels": self.labels,
                "label_words": self.label_words, "template": self.template}

    def encoder(self):
        common = dict(tokenizer=self.tokenizer, text_column=self.text_column, label_column=self.label_column,
                      label_index=self._label_index(), max_length=self.max_length, side=self.truncation_side)
        if self.style == "head":
            return functools.partial(_encode_head, **common)
        return functools.partial(_encode_prompt, word_ids=self.word_ids, template=self.template, **common)

    @property
    def task(self):
        from lit_qft.tasks import LabelWordClassification, SequenceClassification

        if self.style == "head":
            return SequenceClassification(num_labels=len(self.labels))
        return LabelWordClassification(label_token_ids=[w[0] for w in self.word_ids])

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [list(r["input_ids"]) for r in rows]
        input_ids, mask = pad(seqs, self.tokenizer.pad_token_id, self.padding_side)
        classes = torch.tensor([r["class_index"] for r in rows], dtype=torch.long)
        if self.style == "head":
            return {"input_ids": input_ids, "attention_mask": mask, "labels": classes}
        label_mask, _ = pad([list(r["label_mask"]) for r in rows], 0, self.padding_side)
        labels = input_ids.masked_fill(label_mask == 0, -100)  # loss on the label word only
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "class_labels": classes}
