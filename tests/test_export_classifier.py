"""A quantized sequence classifier saved by lit-qft loads back as a classifier with the same logits."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from lit_qft import quantization as Q
from lit_qft.assets import load_tokenizer
from lit_qft.export import load_quantized, save_quantized

from conftest import TINY_GPT2


def test_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    tok = load_tokenizer("gpt2")
    model = GPT2ForSequenceClassification(
        GPT2Config(vocab_size=len(tok), num_labels=2, pad_token_id=tok.pad_token_id, **TINY_GPT2)
    ).eval()
    recipe = Q.PTQInt8WeightOnly(skip=[r"^score$"])
    Q.prepare(model, recipe)
    Q.convert(model, recipe)
    save_quantized(model, tok, recipe, tmp_path / "clf")

    loaded, _, loaded_recipe = load_quantized(tmp_path / "clf")
    assert type(loaded).__name__ == "GPT2ForSequenceClassification"
    assert loaded_recipe.skip == [r"^score$"]
    assert sorted(Q.quantized_modules(loaded)) == sorted(Q.quantized_modules(model))
    assert "score" not in Q.quantized_modules(loaded)
    ids = tok(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, model(**ids).logits, rtol=0, atol=0)
