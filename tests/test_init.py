"""Initialization schemes (lit_qft/init.py): pretrained, scratch, re-initialized top blocks, small head."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_GPT2, TINY_LLAMA
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, LlamaConfig

from lit_qft import quantization as Q
from lit_qft.cli import build_cli
from lit_qft.init import apply_init, classification_head, resolve_scheme, transformer_blocks
from lit_qft.module import LitCausalLM


def _perturbed_checkpoint(model, folder):
    """Save ``model`` with every tensor moved away from its init values (LayerNorm weights != 1...)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def gpt2_checkpoint(tiny_gpt2, tmp_path):
    return _perturbed_checkpoint(tiny_gpt2, tmp_path / "gpt2")


@pytest.fixture
def llama_checkpoint(tiny_llama, tmp_path):
    return _perturbed_checkpoint(tiny_llama, tmp_path / "llama")


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reinit_top_k_changes_exactly_the_top_blocks(family, gpt2_checkpoint, llama_checkpoint):
    folder = gpt2_checkpoint if family == "gpt2" else llama_checkpoint
    pretrained = _state(AutoModelForCausalLM.from_pretrained(folder))
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    assert apply_init(model, "reinit_top_k", folder, reinit_top_k=1) == "reinit_top_k"
    path, blocks = transformer_blocks(model)
    assert path == {"gpt2": "transformer.h", "llama": "model.layers"}[family] and len(blocks) == 2
    top = f"{path}.1."
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, pretrained[n])}
    assert changed == {n for n in pretrained if n.startswith(top)}  # every top-block tensor, nothing else


def test_reinit_follows_the_models_own_init(gpt2_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint)
    apply_init(model, "reinit_top_k", gpt2_checkpoint, reinit_top_k=1)
    block, std = model.transformer.h[1], model.config.initializer_range
    assert torch.equal(block.ln_1.weight, torch.ones(64)) and torch.equal(block.ln_1.bias, torch.zeros(64))
    assert torch.equal(block.attn.c_attn.bias, torch.zeros_like(block.attn.c_attn.bias))
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(std, rel=0.1)
    # GPT-2's residual projections are scaled by 1/sqrt(2 n_layer): the parent rule must win
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(std / math.sqrt(2 * 2), rel=0.1)


def test_reinit_is_reproducible_under_a_seed(gpt2_checkpoint):
    def run():
        model = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint)
        torch.manual_seed(7)
        apply_init(model, "reinit_top_k", gpt2_checkpoint, reinit_top_k=2)
        return _state(model)

    a, b = run(), run()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_scratch_from_a_pretrained_checkpoint_discards_every_weight(gpt2_checkpoint):
    pretrained = _state(AutoModelForCausalLM.from_pretrained(gpt2_checkpoint))
    model = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint)
    apply_init(model, "scratch", gpt2_checkpoint)
    assert all(not torch.equal(p, pretrained[n]) for n, p in model.named_parameters())
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert model.transformer.wte.weight.std().item() == pytest.approx(model.config.initializer_range, rel=0.1)


def test_pretrained_is_the_default_and_leaves_weights_alone(gpt2_checkpoint):
    pretrained = _state(AutoModelForCausalLM.from_pretrained(gpt2_checkpoint))
    model = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint)
    assert apply_init(model, None, gpt2_checkpoint) == "pretrained"
    assert all(torch.equal(p, pretrained[n]) for n, p in model.named_parameters())
    assert resolve_scheme(None, None) == "scratch"


def test_bad_init_choices_name_the_flag():
    with pytest.raises(ValueError, match="--model.pretrained"):
        resolve_scheme("reinit_top_k", None, 2)
    with pytest.raises(ValueError, match="--model.reinit_top_k"):
        resolve_scheme("reinit_top_k", "gpt2", 0)
    with pytest.raises(ValueError, match="--model.reinit_top_k"):
        resolve_scheme("pretrained", "gpt2", 3)
    with pytest.raises(ValueError, match="--model.init"):
        resolve_scheme("xavier", "gpt2")


def test_reinit_more_blocks_than_exist(gpt2_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint)
    with pytest.raises(ValueError, match="between 1 and the number of blocks"):
        apply_init(model, "reinit_top_k", gpt2_checkpoint, reinit_top_k=3)


def test_classification_head_initialized_small():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, num_labels=3, pad_token_id=0, **TINY_GPT2)
    model = AutoModelForSequenceClassification.from_config(config)
    apply_init(model, "scratch", None, classifier_init_std=1e-3)
    head = classification_head(model)
    assert head is model.score and head.weight.shape == (3, 64)
    assert head.weight.std().item() == pytest.approx(1e-3, rel=0.25)
    torch.manual_seed(0)
    llama = AutoModelForSequenceClassification.from_config(
        LlamaConfig(vocab_size=512, num_labels=2, pad_token_id=0, **TINY_LLAMA))
    assert transformer_blocks(llama)[0] == "model.layers"  # reinit works under the task wrapper too


def test_classifier_init_std_on_a_language_model_is_refused(tiny_gpt2):
    with pytest.raises(ValueError, match="--model.classifier_init_std"):
        apply_init(tiny_gpt2, "scratch", None, classifier_init_std=1e-3)


def test_qat_ranges_start_from_the_initialized_weights(gpt2_checkpoint):
    """With range learning, the learned scales start PTQ-style: absmax of each weight group / 7.5 (int4)."""
    model = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint)
    apply_init(model, "reinit_top_k", gpt2_checkpoint, reinit_top_k=1)
    Q.prepare(model, Q.QAT8da4w(group_size=32, range_learning=True))
    for block in model.transformer.h:
        layer = block.mlp.c_fc
        expected = layer.weight.detach().abs().reshape(layer.weight.shape[0], -1, 32).amax(-1) / 7.5
        scale = layer.weight_fake_quantizer.scale
        assert isinstance(scale, torch.nn.Parameter)
        torch.testing.assert_close(scale.detach().reshape(expected.shape), expected)


def test_module_applies_init_before_prepare_and_cli_sets_it(tmp_path, gpt2_checkpoint):
    # A GPT-2 tokenizer needs the full vocabulary: make a tiny checkpoint with 50257 tokens.
    torch.manual_seed(0)
    big = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=50257, **TINY_GPT2))
    folder = _perturbed_checkpoint(big, tmp_path / "gpt2-50257")
    pretrained = AutoModelForCausalLM.from_pretrained(folder)
    args = ["--data=lit_qft.data.LanguageModelingDataModule", "--data.source=x.txt",
            f"--model.pretrained={folder}", "--model.init=reinit_top_k", "--model.reinit_top_k=1",
            "--model.quantization=QAT8da4w"]
    module = build_cli(args, run=False).model
    assert isinstance(module, LitCausalLM)
    assert (module.hparams.init, module.hparams.reinit_top_k) == ("reinit_top_k", 1)
    module.configure_model()
    # Conv1D became nn.Linear (weight transposed); block 0 is the checkpoint's, block 1 is new
    for i, same in ((0, True), (1, False)):
        got = module.model.transformer.h[i].mlp.c_fc.weight
        assert torch.equal(got, pretrained.transformer.h[i].mlp.c_fc.weight.t()) is same
    assert Q.fake_quantized_modules(module.model)
