"""Conv1D swap, recipes (prepare / convert), tied-head policy and size accounting."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torchao.quantization import quantize_
from torchao.quantization.qat.linear import FakeQuantizedLinear
from torchao.utils import TorchAOBaseTensor
from transformers.pytorch_utils import Conv1D

from lit_qft import quantization as Q

RECIPES = [Q.QAT8da4w(group_size=32), Q.QATInt8WeightOnly(), Q.PTQInt8WeightOnly(), Q.PTQInt8DynamicActivationInt8Weight()]
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_conv1d_swap_is_exact_and_complete(tiny_gpt2):
    ids = torch.randint(0, 512, (2, 24))
    before = _logits(tiny_gpt2, ids)
    assert Q.swap_conv1d(tiny_gpt2) == 4 * tiny_gpt2.config.n_layer
    assert not any(isinstance(m, Conv1D) for m in tiny_gpt2.modules())
    torch.testing.assert_close(_logits(tiny_gpt2, ids), before, rtol=0, atol=1e-6)
    assert Q.swap_conv1d(tiny_gpt2) == 0  # idempotent


def _block_projections(model):
    n = model.config.n_layer
    return sorted(f"transformer.h.{i}.{p}" for i in range(n) for p in PROJECTIONS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: type(r).__name__)
def test_every_projection_is_quantized(tiny_gpt2, recipe):
    ids = torch.randint(0, 512, (2, 24))
    Q.prepare(tiny_gpt2, recipe)
    if recipe.qat:
        assert sorted(Q.fake_quantized_modules(tiny_gpt2)) == _block_projections(tiny_gpt2)
        fake = _logits(tiny_gpt2, ids)
    Q.convert(tiny_gpt2, recipe)
    assert sorted(Q.quantized_modules(tiny_gpt2)) == _block_projections(tiny_gpt2)
    for name in _block_projections(tiny_gpt2):
        w = tiny_gpt2.get_submodule(name).weight
        assert isinstance(w, TorchAOBaseTensor)
        assert any(getattr(w, a).dtype == torch.int8 for a in w.__tensor_flatten__()[0])
    assert not any(isinstance(m, FakeQuantizedLinear) for m in tiny_gpt2.modules())
    out = tiny_gpt2(ids, labels=ids)
    assert torch.isfinite(out.loss)
    if recipe.qat:  # QAT convert reproduces the fake-quantized numerics in fp32
        torch.testing.assert_close(out.logits.detach(), fake, rtol=0, atol=1e-4)


def test_tied_head_stays_float_and_tied_by_default(tiny_gpt2):
    Q.prepare(tiny_gpt2, Q.QAT8da4w())
    Q.convert(tiny_gpt2, Q.QAT8da4w())
    assert tiny_gpt2.lm_head.weight is tiny_gpt2.transformer.wte.weight
    assert not isinstance(tiny_gpt2.lm_head.weight, TorchAOBaseTensor)


def test_untie_head_policy_quantizes_head_separately(tiny_gpt2):
    recipe = Q.PTQInt8WeightOnly(embedding_policy="untie_head")
    Q.prepare(tiny_gpt2, recipe)
    Q.convert(tiny_gpt2, recipe)
    assert "lm_head" in Q.quantized_modules(tiny_gpt2)
    assert not isinstance(tiny_gpt2.transformer.wte.weight, TorchAOBaseTensor)
    assert tiny_gpt2.config.tie_word_embeddings is False


def test_skip_keeps_matching_layers_float(tiny_gpt2):
    recipe = Q.PTQInt8WeightOnly(skip=[r"h\.0\."])
    Q.prepare(tiny_gpt2, recipe)
    Q.convert(tiny_gpt2, recipe)
    assert sorted(Q.quantized_modules(tiny_gpt2)) == sorted(f"transformer.h.1.{p}" for p in PROJECTIONS)


def test_size_counts_tied_storage_once(tiny_gpt2):
    params = {id(p): p for p in tiny_gpt2.parameters()}.values()  # parameters() already dedupes
    expected = sum(p.numel() * p.element_size() for p in params) + sum(
        b.numel() * b.element_size() for b in tiny_gpt2.buffers()
    )
    assert Q.model_size_bytes(tiny_gpt2) == expected
    before = Q.model_size_bytes(tiny_gpt2)
    Q.prepare(tiny_gpt2, Q.PTQInt8WeightOnly())
    Q.convert(tiny_gpt2, Q.PTQInt8WeightOnly())
    block_weights = 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64)  # n_layer * projection weights
    # int8 weights save 3 of every 4 fp32 bytes; per-channel scales take back a little
    saved = before - Q.model_size_bytes(tiny_gpt2)
    assert block_weights * 3 * 0.97 <= saved <= block_weights * 3


def test_llama_linear_layers_are_quantized(tiny_llama):
    recipe = Q.QAT8da4w(group_size=32)
    Q.prepare(tiny_llama, recipe)
    Q.convert(tiny_llama, recipe)
    names = Q.quantized_modules(tiny_llama)
    assert len(names) == 7 * tiny_llama.config.num_hidden_layers  # q,k,v,o,gate,up,down
    assert "lm_head" not in names


def test_bad_recipe_arguments_name_the_field():
    with pytest.raises(ValueError, match="group_size"):
        Q.QAT8da4w(group_size=0)
    with pytest.raises(ValueError, match="embedding_policy"):
        Q.PTQInt8WeightOnly(embedding_policy="nope")


# --------------------------------------------------------------------------------------------
# Recipes: validation, hardware checks, learned ranges
# --------------------------------------------------------------------------------------------
def test_new_recipe_arguments_are_validated():
    with pytest.raises(ValueError, match="bits"):
        Q.QATIntxWeightOnly(bits=9)
    with pytest.raises(ValueError, match="bits"):
        Q.PTQIntxWeightOnly(bits=1)
    with pytest.raises(ValueError, match="group_size"):
        Q.QATInt4WeightOnly(group_size=-1)
    with pytest.raises(ValueError, match="fake_quant_after_steps"):
        Q.QAT8da4w(fake_quant_after_steps=2.5)
    with pytest.raises(ValueError, match="int4_format"):
        Q.PTQInt4WeightOnly(int4_format="nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_only_int4_format_fails_at_prepare_naming_the_hardware(tiny_gpt2):
    with pytest.raises(ValueError, match="needs a CUDA GPU.*int4_format='intx'"):
        Q.prepare(tiny_gpt2, Q.PTQInt4WeightOnly(int4_format="tile_packed_to_4d"))
    assert any(isinstance(m, Conv1D) for m in tiny_gpt2.modules())  # failed before touching the model


@pytest.mark.parametrize("bits,group_size", [(2, 32), (6, None)])
def test_nbit_weights_take_only_2_to_the_bits_values(tiny_llama, bits, group_size):
    recipe = Q.QATIntxWeightOnly(bits=bits, group_size=group_size)
    Q.prepare(tiny_llama, recipe)
    Q.convert(tiny_llama, recipe)
    w = tiny_llama.model.layers[0].mlp.up_proj.weight
    q = w.qdata
    assert q.dtype == torch.int8
    assert -(2 ** (bits - 1)) <= int(q.min()) and int(q.max()) <= 2 ** (bits - 1) - 1
    groups = 1 if group_size is None else 64 // group_size
    assert w.scale.numel() == 128 * groups  # one scale per output channel (and group)


def test_fake_quant_delay_start_step():
    assert Q.QAT8da4w(fake_quant_after_steps=0).fake_quant_start_step(100) == 0
    assert Q.QAT8da4w(fake_quant_after_steps=0.25).fake_quant_start_step(100) == 25
    assert Q.QAT8da4w(fake_quant_after_steps=7).fake_quant_start_step(100) == 7
    with pytest.raises(ValueError, match="max_steps"):
        Q.QAT8da4w(fake_quant_after_steps=0.5).fake_quant_start_step(float("inf"))


def test_learned_ranges_are_parameters_used_by_convert(tiny_gpt2):
    recipe = Q.QATIntxWeightOnly(bits=4, group_size=32, range_learning=True)
    Q.prepare(tiny_gpt2, recipe)
    scales = {n: p for n, p in tiny_gpt2.named_parameters() if "weight_fake_quantizer.scale" in n}
    assert len(scales) == 8
    ids = torch.randint(0, 512, (2, 16))
    tiny_gpt2(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales.values())
    name = "transformer.h.0.mlp.c_fc.weight_fake_quantizer.scale"
    with torch.no_grad():
        scales[name].mul_(1.5)  # as if training had learned wider ranges
    fake = _logits(tiny_gpt2, ids)
    learned = scales[name].detach().clone()
    Q.convert(tiny_gpt2, recipe)
    torch.testing.assert_close(tiny_gpt2.transformer.h[0].mlp.c_fc.weight.scale.reshape(learned.shape), learned)
    torch.testing.assert_close(_logits(tiny_gpt2, ids), fake, rtol=0, atol=1e-4)


def test_set_fake_quant_switches_linears_and_embeddings(tiny_gpt2):
    recipe = Q.QATInt8WeightOnly(embedding_policy="quantize_embedding")
    ids = torch.randint(0, 512, (2, 16))
    float_logits = _logits(tiny_gpt2, ids)
    Q.prepare(tiny_gpt2, recipe)
    assert "transformer.wte" in Q.fake_quantized_modules(tiny_gpt2) and "lm_head" in Q.fake_quantized_modules(tiny_gpt2)
    assert Q.fake_quant_enabled(tiny_gpt2) is True
    assert not torch.equal(_logits(tiny_gpt2, ids), float_logits)
    Q.set_fake_quant(tiny_gpt2, False)
    assert Q.fake_quant_enabled(tiny_gpt2) is False
    torch.testing.assert_close(_logits(tiny_gpt2, ids), float_logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the package layout
REPO = Path(__file__).parents[1]


def _names_the_repo_uses() -> set[str]:
    """Names reached through the package in code and docs: attribute access on ``Q`` or the dotted path, and imports."""
    names: set[str] = set()
    files = [p for d in ("lit_qft", "tests", "benchmarks", "docs", "configs") for p in (REPO / d).rglob("*")
             if p.suffix in (".py", ".md", ".yaml") and "quantization" not in p.relative_to(REPO).parts[1:2]]
    for path in files + [REPO / "README.md"]:
        text = path.read_text()
        if "quantization as Q" in text:
            names |= set(re.findall(r"\bQ\.([A-Za-z_]\w*)", text))
        names |= set(re.findall(r"\blit_qft\.quantization\.([A-Za-z_]\w*)", text))
        for block in re.findall(r"from lit_qft\.quantization import (\([^)]*\)|[^\n]+)", text):
            names |= set(re.findall(r"[A-Za-z_]\w*", block.split("#")[0]))
    # test_safe_loading names lit_qft.quantization.torch on purpose (a non-recipe must be refused)
    return names - {"torch"}


def test_every_name_the_repo_uses_is_exported_by_the_package():
    used = _names_the_repo_uses()
    assert {"Recipe", "prepare", "convert", "quantized_modules", "NoQuantization"} <= used  # the scan sees them
    assert sorted(n for n in used if not hasattr(Q, n)) == []
    # private helpers other code may reach for stay reachable at the old path too
    for name in ("_target_filter", "_check_intx_weight_only", "_intx_weight_only_config", "_embedding_config",
                 "_head_is_tied", "_output_head", "_input_embedding", "_check_group_size", "EmbeddingPolicy"):
        assert hasattr(Q, name), name


def test_torchao_is_imported_only_inside_the_quantization_package():
    package = REPO / "lit_qft"
    importers = sorted(
        str(p.relative_to(package)) for p in package.rglob("*.py")
        if re.search(r"^\s*(from|import)\s+torchao\b", p.read_text(), re.M)
    )
    assert importers and all(name.startswith("quantization/") for name in importers), importers


@pytest.mark.parametrize("path", ["QAT8da4w", "lit_qft.QAT8da4w", "lit_qft.quantization.QAT8da4w",
                                  "lit_qft.quantization.recipes.QAT8da4w"])
def test_recipe_class_paths_resolve_on_the_command_line(text_file, path):
    from lit_qft.cli import build_cli

    cli = build_cli(["--data=lit_qft.data.LanguageModelingDataModule", f"--data.source={text_file}",
                     f"--model.quantization={path}", "--model.quantization.group_size=16",
                     "--trainer.logger=false"], run=False)
    assert type(cli.model.recipe) is Q.QAT8da4w and cli.model.recipe.group_size == 16


# ------------------------------------------------------------------ NF4 block sizes
GPT2_VOCAB = 50257


def _gpt2_with_full_vocab():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, n_layer=1, n_embd=64, n_head=4, n_positions=64)).eval()


@pytest.mark.parametrize("shape, block_size, scaler_block_size", [
    ((GPT2_VOCAB, 64), 64, 16), ((GPT2_VOCAB, 64), 64, 1), ((32, 64), 64, 64), ((32, 64), 64, 16),
    ((192, 64), 64, 64), ((192, 64), 64, 3), ((3, 7), 7, 1), ((4, 7), 7, 2), ((6, 10), 12, 5),
])
def test_nf4_fits_says_exactly_what_torchao_can_store(shape, block_size, scaler_block_size):
    recipe = Q.PTQNF4WeightOnly(block_size=block_size, scaler_block_size=scaler_block_size)
    linear = torch.nn.Linear(shape[1], shape[0], bias=False)
    try:
        quantize_(linear, recipe.base_config())
        stored = True
    except AssertionError:  # torchao's only complaint about a shape
        stored = False
    assert recipe.fits(linear.weight.numel()) == stored


def test_nf4_untied_gpt2_head_is_a_one_line_error_before_training():
    model = _gpt2_with_full_vocab()
    recipe = Q.PTQNF4WeightOnly(embedding_policy="untie_head", scaler_block_size=16)
    with pytest.raises(ValueError) as e:
        Q.prepare(model, recipe)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"PTQNF4WeightOnly cannot store layer lm_head (weight [{GPT2_VOCAB}, 64]) in NF4: "
                              f"its {GPT2_VOCAB} blocks of 64 weights must be a multiple of scaler_block_size=16")
    assert "embedding_policy: float" in message and "more layer" not in message  # the blocks fit
    # the advice works: the head in float (the default) or one int8 table shared with the head
    for policy in ("float", "quantize_embedding"):
        fixed = dataclasses.replace(recipe, embedding_policy=policy)
        model = Q.convert(Q.prepare(_gpt2_with_full_vocab(), fixed), fixed)
        blocks = [f"transformer.h.0.{p}" for p in PROJECTIONS]
        assert all(type(model.get_submodule(n).weight).__name__ == "NF4Tensor" for n in blocks)
        assert model.lm_head.weight is model.transformer.wte.weight
        if policy == "quantize_embedding":  # the 50,257-row table is int8 per row, not NF4
            assert type(model.transformer.wte.weight).__name__ == "IntxUnpackedToInt8Tensor"
        assert torch.isfinite(_logits(model, torch.tensor([[464, 3290, 50256]]))).all()


def test_nf4_layers_too_small_for_the_blocks_name_a_skip_that_works(tiny_llama):
    recipe = Q.PTQNF4WeightOnly()  # 64 x 64: the tiny k/v projections (32 x 64) have only 32 blocks
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.k_proj \(weight \[32, 64\]\) in NF4: "
                                         r"its 32 blocks of 64 weights must be a multiple of scaler_block_size=64 "
                                         r"\(3 more layer\(s\) too\)") as e:
        Q.prepare(tiny_llama, recipe)
    skip = re.search(r"skip: \['(.+?)'\]", str(e.value)).group(1)
    fixed = dataclasses.replace(recipe, skip=[skip])
    Q.convert(Q.prepare(tiny_llama, fixed), fixed)
    assert sorted({n.rsplit(".", 1)[-1] for n in Q.quantized_modules(tiny_llama)}) == [
        "down_proj", "gate_proj", "o_proj", "q_proj", "up_proj"]
