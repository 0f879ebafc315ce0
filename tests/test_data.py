"""DataModules: sources, batch shapes and masks per task, packing, tokenization cache, input errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lit_qft.data import (
    LanguageModelingDataModule, SentimentDataModule, TranslationDataModule, load_source, pack_blocks,
)

_POS = "great wonderful moving brilliant fun superb".split()
_NEG = "dull boring awful weak tedious bad".split()
_FILL = "the film a story with and of its cast plot".split()


def make_reviews(path, n: int = 120, labels=("negative", "positive"), seed: int = 0) -> str:
    """CSV ``text,label`` whose label is readable from the words (learnable)."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        y = i % 2
        words = [rng.choice(_FILL) for _ in range(rng.randint(4, 20))] + [rng.choice(_POS if y else _NEG)]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{labels[y]}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def make_pairs(path, n: int = 80, seed: int = 0) -> str:
    rng = random.Random(seed)
    en_es = {"the": "el", "house": "casa", "dog": "perro", "water": "agua", "big": "grande", "light": "luz"}
    with open(path, "w") as f:
        for _ in range(n):
            words = [rng.choice(list(en_es)) for _ in range(rng.randint(2, 8))]
            f.write(json.dumps({"source": " ".join(words), "target": " ".join(en_es[w] for w in words)}) + "\n")
    return str(path)


@pytest.fixture(autouse=True)
def tokenized_cache(tmp_path, monkeypatch):
    """Tokenized splits go to a fresh folder per test (built-in corpora stay in the real cache)."""
    root = tmp_path / "tokenized-cache"

    def fake_cache_dir(*parts):
        path = root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    monkeypatch.setattr("lit_qft.data.base.cache_dir", fake_cache_dir)
    return root


@pytest.fixture
def reviews(tmp_path):
    return make_reviews(tmp_path / "reviews.csv")


@pytest.fixture
def pairs(tmp_path):
    return make_pairs(tmp_path / "pairs.jsonl")


# ------------------------------------------------------------------ language modelling
def test_pack_blocks_keeps_every_token_in_order():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    blocks = pack_blocks(docs, block_size=4, eos_token_id=0)
    stream = [1, 2, 3, 0, 4, 0, 5, 6, 7, 8, 9, 0, 10, 11, 0]
    assert all(len(b) == 4 for b in blocks)
    assert sum(blocks, []) == stream[: len(stream) // 4 * 4]


def test_packed_lm_batches_are_full_blocks_with_every_token(text_file):
    dm = LanguageModelingDataModule(source=text_file, block_size=32, batch_size=4, val_fraction=0.1)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    assert bool(batch["attention_mask"].all()) and torch.equal(batch["labels"], batch["input_ids"])
    # Every token of the training documents (plus one EOS each) is in a block, minus the last partial block.
    lines = [ln for ln in open(text_file).read().splitlines() if ln.strip()]
    total = sum(len(dm.tokenizer(t)["input_ids"]) + 1 for t in lines)
    packed = (len(dm.train_dataset) + len(dm.val_dataset)) * 32
    assert total - 2 * 32 < packed <= total


def test_unpacked_lm_pads_and_masks_padding(text_file):
    dm = LanguageModelingDataModule(source=text_file, block_size=16, batch_size=8, packing=False,
                                    truncation_side="left")
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape[1] <= 16 and ids.shape == mask.shape == labels.shape
    assert torch.equal(labels == -100, mask == 0)
    assert bool((mask.sum(1) < ids.shape[1]).any())  # the batch really has padding
    eos = dm.tokenizer.eos_token_id
    last_real = ids[torch.arange(len(ids)), mask.sum(1) - 1]
    assert bool((last_real == eos).all())  # left truncation keeps each document's end (EOS)


def test_lm_from_csv_and_parquet_columns(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"body": [f"line number {i} of the body text" for i in range(40)], "id": range(40)})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        dm = LanguageModelingDataModule(source=str(tmp_path / name), text_column="body", block_size=8, batch_size=2)
        dm.setup()
        assert next(iter(dm.train_dataloader()))["input_ids"].shape == (2, 8)


# ------------------------------------------------------------------ sentiment
@pytest.mark.parametrize("side", ["left", "right"])
def test_sentiment_head_batches(reviews, side):
    dm = SentimentDataModule(source=reviews, batch_size=8, padding_side=side, max_length=40)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 8 and ids.shape[1] <= 40
    assert batch["labels"].shape == (8,) and set(batch["labels"].tolist()) <= {0, 1}
    short = int(mask.sum(1).argmin())
    assert mask[short].sum() < ids.shape[1]
    edge = 0 if side == "left" else -1  # padding sits on the chosen side
    assert mask[short, edge] == 0 and ids[short, edge] == dm.tokenizer.pad_token_id
    # Each label agrees with the word that decides it in the text.
    for row, y in zip(ids, batch["labels"].tolist()):
        words = set(dm.tokenizer.decode(row, skip_special_tokens=True).split())
        assert words & set(_POS if y else _NEG)


def test_sentiment_prompt_puts_loss_on_label_word_only(reviews):
    dm = SentimentDataModule(source=reviews, style="prompt", batch_size=6, padding_side="right")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    labels, classes = batch["labels"], batch["class_labels"]
    assert labels.shape == batch["input_ids"].shape and classes.shape == (6,)
    for row, ids, y in zip(labels, batch["input_ids"], classes.tolist()):
        kept = row[row != -100]
        assert dm.tokenizer.decode(kept) == [" negative", " positive"][y]
        first = int((row != -100).int().argmax())
        assert dm.tokenizer.decode(ids[:first]).endswith("\nSentiment:")
    assert dm.task.label_token_ids == [dm.tokenizer.encode(" negative")[0], dm.tokenizer.encode(" positive")[0]]


def test_integer_labels_index_the_declared_set(tmp_path):
    path = make_reviews(tmp_path / "int.csv", labels=("0", "1"))
    dm = SentimentDataModule(source=path, labels=["neg", "pos"], batch_size=4)
    dm.setup()
    assert set(dm.train_dataset["class_index"]) == {0, 1}


@pytest.mark.slow  # reads the whole built-in corpus
def test_builtin_sentiment_corpus_loads():
    dm = SentimentDataModule(source="rotten-tomatoes", max_examples=64, batch_size=8)
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 64 and set(dm.train_dataset["class_index"]) == {0, 1}


# ------------------------------------------------------------------ translation
def test_translation_labels_cover_target_only(pairs):
    dm = TranslationDataModule(source=pairs, batch_size=5, max_length=64, max_target_length=40)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    for ids, labels, mask, prompt, pmask, ref in zip(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                                       batch["prompt_ids"], batch["prompt_attention_mask"],
                                                       batch["references"]):
        target = labels[labels != -100].tolist()
        assert tok.decode(target) == " " + ref + tok.eos_token  # target tokens and EOS, nothing else
        n_prompt = int(pmask.sum())
        assert torch.equal(ids[:n_prompt], prompt[-n_prompt:])  # same prompt, left-padded for generation
        assert tok.decode(prompt[-n_prompt:]).endswith(" ->") and pmask[-1] == 1
        assert bool((labels[:n_prompt] == -100).all()) and int(mask.sum()) == n_prompt + len(target)


def test_translation_reads_nested_columns(tmp_path):
    path = tmp_path / "nested.jsonl"
    path.write_text("".join(json.dumps({"translation": {"en": f"the house {i}", "es": f"la casa {i}"}}) + "\n"
                            for i in range(30)))
    dm = TranslationDataModule(source=str(path), source_column="translation.en", target_column="translation.es",
                               batch_size=2, val_fraction=0.2)
    dm.setup()
    assert next(iter(dm.val_dataloader()))["references"][0].startswith("la casa")


@pytest.mark.slow  # reads the whole built-in corpus
def test_builtin_translation_corpus_loads():
    dm = TranslationDataModule(source="bible-en-es", max_examples=32, batch_size=4, max_length=96, max_target_length=48)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 96 and len(batch["references"]) == 4


# ------------------------------------------------------------------ sources
def test_local_folder_with_splits_uses_val_split(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    make_reviews(folder / "train.csv", n=40)
    make_reviews(folder / "validation.csv", n=10, seed=1)
    assert len(load_source(str(folder), split="validation")) == 10
    dm = SentimentDataModule(source=str(folder), val_split="validation", batch_size=4)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (40, 10)


# ------------------------------------------------------------------ tokenization cache
def test_second_run_reuses_the_tokenized_cache(reviews, tokenized_cache, monkeypatch):
    first = SentimentDataModule(source=reviews, batch_size=4)
    first.setup()
    assert first.cache_hit is False and first.cache_path.parent == tokenized_cache / "tokenized"

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache was valid")

    monkeypatch.setattr(SentimentDataModule, "encoder", no_tokenizing)
    second = SentimentDataModule(source=reviews, batch_size=4)
    second.setup()
    assert second.cache_hit is True and second.cache_path == first.cache_path
    assert second.train_dataset["input_ids"] == first.train_dataset["input_ids"]
    monkeypatch.undo()
    # A setting that changes the encoding, or a changed file, gets its own entry.
    third = SentimentDataModule(source=reviews, batch_size=4, max_length=8)
    third.setup()
    assert third.cache_hit is False and third.cache_path != first.cache_path
    make_reviews(__import__("pathlib").Path(reviews), seed=5)
    fourth = SentimentDataModule(source=reviews, batch_size=4)
    fourth.setup()
    assert fourth.cache_hit is False and fourth.cache_path != first.cache_path


# ------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^--data.source: file .*missing.csv' does not exist$"):
        SentimentDataModule(source=str(tmp_path / "missing.csv")).setup()


def test_unsupported_file_type(tmp_path):
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="--data.source: unsupported file type '.xml'"):
        LanguageModelingDataModule(source=str(tmp_path / "x.xml")).setup()


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="--data.source: .*empty.txt .*contains no examples"):
        LanguageModelingDataModule(source=str(tmp_path / "empty.txt")).setup()


def test_missing_column(reviews):
    with pytest.raises(ValueError, match=r"--data.text_column: column 'review' not found in .* columns \['text', 'label'\]"):
        SentimentDataModule(source=reviews, text_column="review").setup()


def test_label_outside_declared_set(tmp_path):
    path = make_reviews(tmp_path / "r.csv", labels=("negative", "neutral"))
    with pytest.raises(ValueError, match=r"--data.labels: .* has labels \['neutral'\] not in the declared label set"):
        SentimentDataModule(source=path).setup()


def test_integer_label_out_of_range(tmp_path):
    path = make_reviews(tmp_path / "r.csv", labels=("0", "2"))
    with pytest.raises(ValueError, match=r"has labels \['2'\] not in the declared label set"):
        SentimentDataModule(source=path).setup()


def test_label_words_sharing_first_token():
    with pytest.raises(ValueError, match="--data.label_words=.* start with the same token"):
        SentimentDataModule(style="prompt", labels=["a", "b"], label_words=["pos itive", "pos ting"])


def test_text_too_short_for_one_block(tmp_path):
    (tmp_path / "short.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(ValueError, match="split is empty after tokenization.*--data.block_size"):
        LanguageModelingDataModule(source=str(tmp_path / "short.txt"), block_size=64, val_fraction=0.5).setup()


def test_unknown_hub_dataset_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises((ValueError, FileNotFoundError), match="--data.source: cannot (load|reach)"):
        load_source("no-such-user/no-such-dataset-xyz")
