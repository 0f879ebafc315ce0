"""LoRA over a frozen quantized base (int8, NF4), QAT + LoRA: training, saving, reloading, merging."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_GPT2, TINY_LLAMA
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peft.tuners.lora import LoraLayer

from lit_qft import quantization as Q
from lit_qft.export import load_quantized, save_quantized
from lit_qft.lora import LoraSettings, add_lora, float_base_weights, load_adapters, merge_and_quantize, save_adapters
from lit_qft.memory import parameter_counts

CONFIGS = Path(__file__).parents[1] / "configs"
#: tiny layers have 16-128 blocks of 64 weights; NF4's second-level blocks must divide that.
NF4 = Q.PTQNF4WeightOnly(scaler_block_size=16)
RECIPES = {
    "int8": Q.PTQInt8WeightOnly(),
    "nf4": NF4,
    "qat8da4w": Q.QAT8da4w(group_size=32),
}
#: quantized (or fake-quantized) linear layers in the two tiny models: head tied and left in float
N_LINEAR = {"gpt2": 8, "llama": 14}


def quantized_layers(model) -> list[str]:
    """Quantized linear layers (peft's LoRA wrappers expose their base layer's weight: not counted)."""
    return [n for n in Q.quantized_modules(model) if not isinstance(model.get_submodule(n), LoraLayer)]


def build(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=512, **TINY_GPT2))
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, tie_word_embeddings=True, **TINY_LLAMA))


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Rows walking a fixed cycle of 8 random token ids: learnable by small adapters in a few steps."""
    g = torch.Generator().manual_seed(seed)
    cycle = torch.randperm(512, generator=g)[:8]
    starts = torch.randint(0, 8, (4, 1), generator=g)
    ids = cycle[(starts + torch.arange(24)) % 8]
    return {"input_ids": ids, "labels": ids}


def flat(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside a (possibly torchao-quantized) tensor."""
    if hasattr(t, "__tensor_flatten__"):
        return [x for name in t.__tensor_flatten__()[0] for x in flat(getattr(t, name))]
    return [t]


def base_snapshot(model) -> dict[str, list[torch.Tensor]]:
    return {n: [x.detach().clone() for x in flat(p)] for n, p in model.named_parameters() if "lora_" not in n}


def train(model, steps: int = 8, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def lora_model(arch: str, recipe_name: str, rank: int = 4):
    settings = LoraSettings(rank=rank, alpha=2 * rank, dropout=0.0)
    return add_lora(build(arch), RECIPES[recipe_name], settings, prepared=False)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("recipe_name", ["int8", "nf4", "qat8da4w"])
def test_only_adapters_learn_and_the_quantized_base_stays_bit_identical(arch, recipe_name):
    model = lora_model(arch, recipe_name)
    recipe = RECIPES[recipe_name]
    inner = model.get_base_model()
    if recipe.qat:
        assert len(Q.fake_quantized_modules(inner)) == N_LINEAR[arch]
    else:
        assert len(quantized_layers(inner)) == N_LINEAR[arch]  # GPT-2: the Conv1D blocks too
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * N_LINEAR[arch]  # A and B for every linear layer but the head
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base_before = base_snapshot(model)

    loss = model(**batch()).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    model.zero_grad()
    losses = train(model)

    assert losses[-1] < losses[0] - 0.4, losses  # memorizing one batch: the adapters really learn
    for n, p in model.named_parameters():
        if n in lora_before and ".lora_B." in n:  # B starts at zero, so every B must have moved
            assert not torch.equal(p, lora_before[n]), n
    for n, tensors in base_snapshot(model).items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, base_before[n], strict=True)), n
    if not recipe.qat:
        assert len(quantized_layers(inner)) == N_LINEAR[arch]


@pytest.mark.parametrize(("arch", "recipe_name"), [("gpt2", "int8"), ("llama", "nf4"), ("llama", "qat8da4w")])
def test_saved_adapters_reload_onto_a_freshly_quantized_base(tmp_path, arch, recipe_name):
    model = lora_model(arch, recipe_name)
    train(model, steps=2)
    ids = batch(seed=7)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapters(model, tmp_path / "adapter", RECIPES[recipe_name], {"architecture": arch})
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "lit_qft_quantization.json"} <= files
    assert sum(p.stat().st_size for p in (tmp_path / "adapter").iterdir()) < 200_000  # adapters only

    reloaded = load_adapters(tmp_path / "adapter", model=build(arch))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="built from scratch"):
        load_adapters(tmp_path / "adapter")


@pytest.mark.parametrize(("arch", "recipe_name"), [("gpt2", "int8"), ("llama", "int8"), ("llama", "nf4"), ("gpt2", "qat8da4w")])
def test_merged_and_requantized_model_saves_loads_and_matches(tmp_path, arch, recipe_name):
    recipe = RECIPES[recipe_name]
    model = lora_model(arch, recipe_name)
    train(model, steps=6)
    b = batch()
    with torch.no_grad():
        adapter_loss = float(model(**b).loss)
        with model.disable_adapter():
            base_loss = float(model(**b).loss)
    merged = merge_and_quantize(model, recipe)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert len(Q.quantized_modules(merged)) == N_LINEAR[arch]
    with torch.no_grad():
        merged_loss = float(merged(**b).loss)
    # the merged model keeps what the adapters learned (re-quantization adds only rounding)
    assert abs(merged_loss - adapter_loss) < 0.25 * (base_loss - adapter_loss), (base_loss, adapter_loss, merged_loss)

    save_quantized(merged, _tokenizer(), recipe, tmp_path / "merged")
    loaded, _, loaded_recipe = load_quantized(tmp_path / "merged")
    assert loaded_recipe == recipe
    assert sorted(Q.quantized_modules(loaded)) == sorted(Q.quantized_modules(merged))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, merged(**b).logits, rtol=0, atol=0)


def test_merge_into_a_float_base_reproduces_the_adapter_model():
    model = add_lora(build("llama"), Q.NoQuantization(), LoraSettings(rank=4, dropout=0.0), prepared=False)
    train(model, steps=2)
    ids = batch(seed=3)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = merge_and_quantize(model, Q.NoQuantization())
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_int8_merge_requantizes_the_dequantized_weight_plus_delta():
    model = lora_model("llama", "int8")
    train(model, steps=2)
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    want = Q.dequantize_weight(layer.base_layer.weight) + layer.get_delta_weight("default")
    merged = merge_and_quantize(model, RECIPES["int8"])
    got = merged.model.layers[0].mlp.up_proj.weight
    assert Q.is_quantized_weight(got) and not got.requires_grad
    step = want.abs().amax(dim=1, keepdim=True) / 127  # per-row int8 scale: error <= half a step
    assert (Q.dequantize_weight(got) - want).abs().le(step / 2 + 1e-6).all()


def _small_update_lora(recipe_name: str):
    """A LoRA model whose adapters move each weight by ~1/4 of an int8 step: all of it rounds away on the grid."""
    float_model = build("llama")
    reference = {n: m.weight.detach().clone() for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear)}
    model = add_lora(float_model, RECIPES[recipe_name], LoraSettings(rank=4, alpha=4, dropout=0.0), prepared=False)
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            w = reference[next(n for n in reference if module is model.get_submodule("base_model.model." + n))]
            step = w.abs().amax(dim=1, keepdim=True) / 127
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
            b.copy_(torch.randn(b.shape, generator=g) * (0.25 * step) / (a.shape[0] ** 0.5))
    return model


@pytest.mark.parametrize("recipe_name", ["int8", "nf4"])
def test_merging_a_ptq_base_through_its_float_weights_keeps_small_updates(recipe_name):
    """Updates of a quarter int8 step: merged onto the dequantized grid they round away (kept share ~0);
    merged into the float weights they survive re-quantization in expectation (kept share ~1), like a
    PTQ of fully fine-tuned weights. Kept share = least-squares slope of (merged - base) on the update."""
    with torch.no_grad():
        adapters = _small_update_lora(recipe_name)
        reference = Q.prepare(build("llama"), RECIPES[recipe_name])  # the pretrained float base, rebuilt
        floats = float_base_weights(adapters, reference)
        assert len(floats) == N_LINEAR["llama"]  # every adapted layer found its float weight
        before = {n: (Q.dequantize_weight(m.get_base_layer().weight), m.get_delta_weight("default"))
                  for n, m in adapters.named_modules() if isinstance(m, LoraLayer)}
        on_grid = merge_and_quantize(_small_update_lora(recipe_name), RECIPES[recipe_name])
        via_float = merge_and_quantize(adapters, RECIPES[recipe_name], floats)

    def kept(merged) -> float:
        num = den = 0.0
        for name, (base, delta) in before.items():
            w = Q.dequantize_weight(merged.get_submodule(name.removeprefix("base_model.model.")).weight)
            num += float(((w - base) * delta).sum())
            den += float((delta * delta).sum())
        return num / den

    assert kept(on_grid) < 0.25
    assert 0.75 < kept(via_float) < 1.25


def test_float_weights_of_another_model_are_not_used_for_merging():
    adapters = lora_model("llama", "int8")
    torch.manual_seed(123)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=512, tie_word_embeddings=True, **TINY_LLAMA))
    assert float_base_weights(adapters, Q.prepare(other, RECIPES["int8"])) == {}


def test_trainable_parameter_count_and_settings_errors():
    model = lora_model("gpt2", "int8", rank=4)
    trainable, total = parameter_counts(model)
    # per layer r * (in + out): c_attn 64->192, attn c_proj 64->64, c_fc 64->256, mlp c_proj 256->64
    assert trainable == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert total == trainable + parameter_counts(build("gpt2"))[1]
    for bad, field in [({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"), ({"alpha": 0}, "alpha")]:
        with pytest.raises(ValueError, match=f"--model.lora.{field}"):
            LoraSettings(**bad)
    with pytest.raises(ValueError, match="--model.lora"):
        add_lora(build("gpt2"), RECIPES["int8"], LoraSettings(target_modules=["no_such_layer"]), prepared=False)
    with pytest.raises(ValueError, match="scaler_block_size"):
        add_lora(build("llama"), Q.PTQNF4WeightOnly(scaler_block_size=256), LoraSettings(), prepared=False)


def _tokenizer():
    from lit_qft.assets import load_tokenizer

    return load_tokenizer("gpt2")


def lora_fit_args(tmp_path, text_file, recipe: str, steps: int, extra: list[str] = ()) -> list[str]:
    return [
        "fit", "--data=lit_qft.data.LanguageModelingDataModule",
        f"--data.source={text_file}", "--data.block_size=32", "--data.batch_size=8",
        "--model.config_overrides={n_layer: 2, n_embd: 64, n_head: 4, n_positions: 64}",
        f"--model.quantization={recipe}", "--model.lora.rank=8", "--model.lora.dropout=0.0",
        "--model.optimizer=AdamW", "--model.optimizer.lr=1e-2", "--model.warmup=0",
        f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0", f"--trainer.default_root_dir={tmp_path}",
        f"--export.output_dir={tmp_path / 'quantized'}", *extra,
    ]


def test_cli_int8_lora_fit_saves_adapters_and_merged_model(tmp_path, text_file, capsys):
    from lit_qft.cli import build_cli

    torch.manual_seed(0)
    cli = build_cli(lora_fit_args(tmp_path, text_file, "PTQInt8WeightOnly", steps=6))
    out = capsys.readouterr().out
    report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "QuantizedExport").report
    memory = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "TrainingMemory").report
    trainable = 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))  # 2 blocks, r * (in + out)
    assert report["trainable_params"] == memory["trainable_params"] == trainable
    assert memory["peak_rss_bytes"] >= memory["start_rss_bytes"] > 0
    assert f"trainable parameters {trainable:,} of" in out and "peak training memory: RSS" in out
    assert "frozen base before training" in out and "adapters on the frozen base" in out and "merged + re-quantized" in out
    assert math.isfinite(report["adapter_loss"]) and abs(report["merged_loss"] - report["adapter_loss"]) < 0.05
    assert report["adapter_loss"] < report["base_loss"] - 0.1  # measured at fit start: the adapters learned
    assert report["quantized_modules"] == 8
    model, _, recipe = load_quantized(tmp_path / "quantized")
    assert type(recipe).__name__ == "PTQInt8WeightOnly" and len(Q.quantized_modules(model)) == 8
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_lora_over_a_pretrained_ptq_base_merges_into_its_float_weights(tmp_path, text_file, capsys):
    from lit_qft.cli import build_cli

    torch.manual_seed(0)  # a local "pretrained" GPT-2 folder (vocab = the GPT-2 tokenizer's)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_layer=2, n_embd=64, n_head=4, n_positions=64)).save_pretrained(
        tmp_path / "pretrained")
    args = [a for a in lora_fit_args(tmp_path, text_file, "PTQInt8WeightOnly", steps=6)
            if not a.startswith("--model.config_overrides")] + [f"--model.pretrained={tmp_path / 'pretrained'}"]
    cli = build_cli(args)
    out = capsys.readouterr().out
    report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "QuantizedExport").report
    # every adapted layer (Conv1D swapped to Linear in both the base and the rebuilt reference) merged in float
    assert report["merged_through_float_layers"] == 8 == report["quantized_modules"]
    assert "merged into the pretrained float weights (8 layers)" in out
    assert report["adapter_loss"] < report["base_loss"] - 0.1
    assert abs(report["merged_loss"] - report["adapter_loss"]) < 0.05


def test_cli_refuses_bad_lora_settings(tmp_path, text_file):
    out = subprocess.run(
        [sys.executable, "-m", "lit_qft.cli", *lora_fit_args(tmp_path, text_file, "PTQInt8WeightOnly", 1),
         "--model.lora.rank=0"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode != 0 and "--model.lora.rank=0" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("config", ["smollm2-lm-int8-lora.yaml", "smollm2-lm-nf4-lora.yaml"])
def test_smollm2_lora_config_runs_a_few_steps(tmp_path, config):
    """The real SmolLM2-135M: a few LoRA steps on the quantized base, adapters reload, merged model loads."""
    from lit_qft.cli import build_cli

    cli = build_cli([
        "fit", f"--config={CONFIGS / config}", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=2", "--export.max_val_batches=2", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
        f"--export.output_dir={tmp_path / 'quantized'}", "--data.init_args.max_documents=400",
    ])
    report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "QuantizedExport").report
    assert report["quantized_modules"] == 30 * 7  # every q/k/v/o/gate/up/down projection
    assert report["base_loss"] < 5.0  # a pretrained model on English text (a random one: ln 49152 = 10.8)
    assert report["adapter_loss"] < report["base_loss"] - 0.01  # the adapters learned in 4 steps
    # Merge-then-requantize: 4 steps of adapter updates are mostly smaller than half a quantization
    # step and round away (docs/lora.md), so the merged model may fall back to the base's loss
    # (measured: int8 adapters 0.109 better than merged) but must never end worse than the base.
    assert report["merged_loss"] < report["base_loss"] + 0.02
    ids = cli.model.tokenizer("In the beginning God created", return_tensors="pt").input_ids
    merged, _, _ = load_quantized(tmp_path / "quantized")
    with torch.no_grad():
        assert torch.isfinite(merged(ids).logits).all()
    # adapters rebuilt onto SmolLM2 loaded by its saved name and quantized afresh: the same val loss
    cli.model.model = load_adapters(tmp_path / "adapter")
    val = cli.datamodule.val_dataloader()
    assert cli.model.evaluate_loss(val, 2) == pytest.approx(report["adapter_loss"], abs=1e-4)
