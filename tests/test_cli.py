"""The ``lit-qft`` CLI end to end on tiny models and tiny text (no network)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_qft.cli import build_cli
from lit_qft.export import load_quantized
from lit_qft.quantization import quantized_modules

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
TINY = "--model.config_overrides={n_layer: 2, n_embd: 64, n_head: 4, n_positions: 64}"


def fit_args(tmp_path, text_file, recipe: str, steps: int = 30) -> list[str]:
    return [
        "fit",
        "--data=lit_qft.data.LanguageModelingDataModule",
        f"--data.source={text_file}", "--data.block_size=32", "--data.batch_size=8",
        TINY, f"--model.quantization={recipe}",
        "--model.optimizer=AdamW", "--model.optimizer.lr=3e-3", "--model.warmup=0",
        f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=4", f"--trainer.default_root_dir={tmp_path}",
        f"--export.output_dir={tmp_path / 'quantized'}",
    ]


@pytest.mark.parametrize("recipe", ["QAT8da4w", "PTQInt8WeightOnly"])
def test_fit_lowers_loss_and_exports_a_reloadable_model(tmp_path, text_file, recipe):
    torch.manual_seed(0)
    cli = build_cli(fit_args(tmp_path, text_file, recipe))
    report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "QuantizedExport").report
    # A random GPT-2 starts at ln(50257) = 10.8 nats; the tiny corpus is learnable far below that.
    assert report["float_loss"] < 0.7 * math.log(50257)
    assert report["quantized_loss"] < report["float_loss"] + 0.5
    assert report["quantized_bytes"] < report["float_bytes"]
    in_memory = cli.model.model
    assert len(quantized_modules(in_memory)) == 8

    model, tokenizer, loaded_recipe = load_quantized(tmp_path / "quantized")
    assert type(loaded_recipe).__name__ == recipe
    assert sorted(quantized_modules(model)) == sorted(quantized_modules(in_memory))
    ids = tokenizer("In the beginning God created the heavens", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, in_memory.eval()(ids).logits, rtol=0, atol=0)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_float_recipe_writes_no_quantized_model(tmp_path, text_file):
    build_cli(fit_args(tmp_path, text_file, "NoQuantization", steps=3))
    assert not (tmp_path / "quantized").exists()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config):
    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("# lit-qft ") and config.name in first_line, "YAML must start with its command"
    out = subprocess.run(
        [sys.executable, "-m", "lit_qft.cli", "fit", f"--config={config}", "--print_config"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    parsed = yaml.safe_load(out.stdout)
    assert parsed["model"]["quantization"]["class_path"].startswith("lit_qft.")
    assert parsed["data"]["class_path"].startswith("lit_qft.data.")


def test_help_lists_recipe_and_optimizer_options():
    out = subprocess.run([sys.executable, "-m", "lit_qft.cli", "fit", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0
    for flag in ("--model.quantization", "--model.optimizer", "--model.lr_schedule", "--export.output_dir"):
        assert flag in out.stdout


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lit_qft.cli", "fit", "--data=lit_qft.data.LanguageModelingDataModule",
         f"--data.source={tmp_path / 'missing.txt'}", "--trainer.max_steps=1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "lit-qft: error: --data.source: file" in out.stderr
    assert "Traceback" not in out.stderr


def test_default_precision_follows_the_hardware(tmp_path, text_file, monkeypatch):
    from lit_qft import runtime

    monkeypatch.delenv("LIT_QFT_DEFAULT_PRECISION")  # the suite pins it; here the hardware decides
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)  # AVX-512 BF16 / AMX CPU or bf16 GPU
    assert runtime.default_precision() == "bf16-mixed"
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)  # AVX2 only: bf16 is emulated
    assert runtime.default_precision() == "32-true"
    monkeypatch.setenv("LIT_QFT_DEFAULT_PRECISION", "bf16-mixed")
    args = fit_args(tmp_path, text_file, "PTQInt8WeightOnly", steps=1)[1:]  # run=False: no subcommand
    cli = build_cli(args, run=False)
    assert cli.config.trainer.precision == "bf16-mixed" and cli.trainer.precision == "bf16-mixed"
    cli = build_cli([*args, "--trainer.precision=32-true"], run=False)  # an explicit choice wins
    assert cli.trainer.precision == "32-true"
