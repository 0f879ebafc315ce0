"""Tasks: classification head on the last real token, label-word scoring, target-only translation loss,
generation with left padding, metrics, quantization of a classifier, model/data compatibility errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from conftest import TINY_GPT2, TINY_LLAMA

from lit_qft import quantization as Q
from lit_qft.assets import load_tokenizer
from lit_qft.data.base import pad
from lit_qft.tasks import (
    LabelWordClassification, LanguageModeling, SequenceClassification, Translation, check_compatible, position_ids,
)

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def texts(tok):
    return [tok.encode(t) for t in ("a fine film", "the plot is thin and the cast is bored", "wonderful")]


def _batch(seqs, pad_id, side):
    ids, mask = pad(seqs, pad_id, side)
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch, overrides", [("gpt2", TINY_GPT2), ("llama", TINY_LLAMA)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_classification_head_reads_the_last_real_token(tok, texts, arch, overrides, side):
    torch.manual_seed(0)
    task = SequenceClassification(num_labels=3)
    model = task.build_model(None, arch, overrides, vocab_size=len(tok), pad_token_id=tok.pad_token_id).eval()
    assert model.config.pad_token_id == tok.pad_token_id
    batch = _batch(texts, tok.pad_token_id, side)
    batch["labels"] = torch.tensor([0, 1, 2])
    with torch.no_grad():
        padded = task.forward(model, batch).logits
        alone = torch.cat([model(input_ids=torch.tensor([t])).logits for t in texts])
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)
    # and the loss is cross-entropy of those logits
    torch.testing.assert_close(task.forward(model, batch).loss, F.cross_entropy(alone, batch["labels"]),
                               rtol=1e-4, atol=1e-5)


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_classifier_head_stays_float_under_qat(tok):
    task = SequenceClassification(num_labels=2)
    model = task.build_model(None, "gpt2", TINY_GPT2, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    recipe = Q.QAT8da4w(group_size=16)
    adapted = task.adapt_recipe(recipe)
    assert recipe.skip == [] and adapted.skip == [r"(^|\.)score$"] and adapted.group_size == 16
    Q.prepare(model, adapted)
    fq = Q.fake_quantized_modules(model)
    assert len(fq) == 8 and not any("score" in name for name in fq)  # 4 linears x 2 blocks, head in float
    assert type(model.score) is torch.nn.Linear


def test_label_word_loss_and_prediction(tok, tiny_gpt2):
    words = [tok.encode(" negative")[0], tok.encode(" positive")[0]]
    task = LabelWordClassification(words)
    prompts = [tok.encode("Review: dull\nSentiment:"), tok.encode("Review: a great, moving film\nSentiment:")]
    seqs = [p + [words[y]] for p, y in zip(prompts, (0, 1))]
    vocab = tiny_gpt2.config.vocab_size
    seqs = [[i % vocab for i in s] for s in seqs]  # the tiny model has 512 tokens
    task = LabelWordClassification([w % vocab for w in words])
    batch = _batch(seqs, 0, "right")
    labels = torch.full_like(batch["input_ids"], -100)
    for i, s in enumerate(seqs):
        labels[i, len(s) - 1] = s[-1]
    batch.update(labels=labels, class_labels=torch.tensor([0, 1]))
    with torch.no_grad():
        out = task.forward(tiny_gpt2, batch)
        # loss: cross-entropy of the label word only, predicted from the position before it
        logits = [tiny_gpt2(input_ids=torch.tensor([s])).logits[0, -2] for s in seqs]
        expected = F.cross_entropy(torch.stack(logits), torch.tensor([s[-1] for s in seqs]))
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)
    assert task.loss_weight(batch) == 2
    preds = task.predict(out.logits, labels)
    wanted = torch.stack([lg[task.label_token_ids] for lg in logits]).argmax(-1)
    assert torch.equal(preds, wanted)
    # a logit pushed up at the right place decides the prediction
    boosted = out.logits.clone()
    boosted[0, len(seqs[0]) - 2, task.label_token_ids[1]] = 1e4
    assert task.predict(boosted, labels)[0] == 1


def test_translation_loss_is_on_target_tokens_only(tiny_gpt2):
    task = Translation(max_new_tokens=4)
    prompt, target = [5, 6, 7, 8], [9, 10, 11]
    ids = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        loss = task.forward(tiny_gpt2, batch).loss
        logits = tiny_gpt2(input_ids=ids).logits[0]
    expected = F.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(target))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert task.loss_weight(batch) == len(target)


class _Ids:
    """A tokenizer stand-in for a 512-token model: decodes ids as words "token<id>"."""

    pad_token_id, eos_token_id = 0, 1

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(f"token{int(i)}" for i in r if int(i) > 1) for r in rows]


def test_translation_generation_ignores_left_padding_and_feeds_metrics(tiny_gpt2):
    task = Translation(max_new_tokens=5)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    ids, mask = pad(prompts, 0, "left")
    hyps = task.generate(tiny_gpt2, {"prompt_ids": ids, "prompt_attention_mask": mask}, _Ids())
    alone = [task.generate(tiny_gpt2, {"prompt_ids": torch.tensor([p]), "prompt_attention_mask": torch.ones(1, len(p), dtype=torch.long)}, _Ids())[0]
             for p in prompts]
    assert hyps == alone and all(h for h in hyps)
    refs = [hyps[0], "token3 token4 token5 token6"]
    metrics = task.metrics()
    batch = {"prompt_ids": ids, "prompt_attention_mask": mask, "references": refs}
    task.update_metrics(metrics, tiny_gpt2, batch, None, _Ids())
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score / 100
    chrf = sacrebleu.corpus_chrf(hyps, [refs]).score / 100
    assert float(metrics["bleu"].compute()) == pytest.approx(bleu, abs=1e-4)
    assert float(metrics["chrf"].compute()) == pytest.approx(chrf, abs=1e-3)


def test_language_modeling_masks_padding(tiny_gpt2):
    seqs = [[5, 6, 7, 8, 9], [10, 11]]
    batch = _batch(seqs, 0, "right")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    task = LanguageModeling()
    with torch.no_grad():
        loss = task.forward(tiny_gpt2, batch).loss
        parts = [(tiny_gpt2(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss, len(s) - 1) for s in seqs]
    expected = sum(l * n for l, n in parts) / sum(n for _, n in parts)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert task.loss_weight(batch) == 5


class _Data:
    def __init__(self, tokenizer, max_length, flag="max_length"):
        self.tokenizer, self.max_length, self.length_flag = tokenizer, max_length, flag


def test_sequence_longer_than_context(tok):
    model = SequenceClassification(2).build_model(None, "gpt2", TINY_GPT2, vocab_size=len(tok), pad_token_id=0)
    check_compatible(model, tok, _Data(tok, 64))
    with pytest.raises(ValueError, match=r"^--data.block_size=65 is longer than the model's context \(64 positions\)"):
        check_compatible(model, tok, _Data(tok, 65, "block_size"))


def test_vocabulary_mismatch(tok, tiny_gpt2):
    with pytest.raises(ValueError, match=r"^--data.tokenizer has 50257 tokens but the model's vocabulary has 512"):
        check_compatible(tiny_gpt2, None, _Data(tok, 32))
    other = copy.deepcopy(tok)
    other.add_tokens(["<extra-token>"])
    big = SequenceClassification(2).build_model(None, "gpt2", TINY_GPT2, vocab_size=len(other), pad_token_id=0)
    with pytest.raises(ValueError, match="--data.tokenizer and --model.tokenizer have different vocabularies"):
        check_compatible(big, tok, _Data(other, 32))


# ------------------------------------------------------------------ end to end through the CLI
TASK_CONFIGS = {
    "gpt2-sentiment-qat8da4w.yaml": ({"val/acc", "val/f1", "val/loss"}, []),
    "gpt2-sentiment-qat8da4w.yaml:prompt": ({"val/acc", "val/f1", "val/loss"}, ["--data.style=prompt"]),
    "gpt2-translation-qat8da4w.yaml": ({"val/bleu", "val/chrf", "val/loss", "val/ppl"}, []),
    "quickstart.yaml": ({"val/loss", "val/ppl"}, []),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TASK_CONFIGS))
def test_offline_task_config_runs_through_the_cli(tmp_path, name):
    from lit_qft.cli import build_cli

    metrics, extra = TASK_CONFIGS[name]
    cli = build_cli([
        "fit", f"--config={CONFIGS / name.split(':')[0]}", *extra, "--trainer.max_steps=6",
        "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2", "--export.max_val_batches=2",
        f"--trainer.default_root_dir={tmp_path}", f"--export.output_dir={tmp_path / 'q'}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
    ])
    logged = cli.trainer.callback_metrics
    assert metrics <= set(logged), sorted(logged)
    assert all(torch.isfinite(logged[m]) for m in metrics)
    assert (tmp_path / "q" / "model.pt").is_file()
    if "sentiment" in name:
        assert 0.0 <= float(logged["val/acc"]) <= 1.0


# ------------------------------------------------------------------ predict
def test_predict_on_translation_data_returns_one_greedy_translation_per_example(tmp_path, tok):
    import json

    import lightning as L

    from lit_qft.data import TranslationDataModule
    from lit_qft.module import LitCausalLM

    words = "the house water light day night earth good".split()
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(14):
            f.write(json.dumps({"source": " ".join(words[j % 8] for j in range(i, i + 2 + i % 4)),
                                "target": f"la casa {i}"}) + "\n")
    data = TranslationDataModule(source=str(tmp_path / "pairs.jsonl"), batch_size=3, val_fraction=0.5,
                                 max_length=32, max_target_length=8, max_new_tokens=4)
    torch.manual_seed(0)
    module = LitCausalLM(architecture="gpt2", config_overrides=TINY_GPT2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    batches = trainer.predict(module, datamodule=data)
    assert isinstance(module.task, Translation)
    texts = [t for b in batches for t in b]
    assert [len(b) for b in batches] == [len(b["references"]) for b in data.predict_dataloader()]
    assert len(texts) == len(data.val_dataset) >= 4 and all(isinstance(t, str) for t in texts)
    # each is the greedy translation of its prompt alone (no padding, no peek at the reference)
    model = module.model.eval()
    alone = []
    for row in data.val_dataset:
        prompt = torch.tensor([row["prompt_ids"]])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        alone.append(tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip())
    assert texts == alone and any(texts)
    assert [t for b in trainer.predict(module, datamodule=data) for t in b] == texts  # deterministic
