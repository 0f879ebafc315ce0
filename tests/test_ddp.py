"""DDP with 2 CPU processes (gloo) gives the model a single process gives with the same global batch.

Slow: each run starts Lightning's DDP launcher, which re-executes ``lit-qft`` once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_qft.export import load_quantized

# Dropout off: each process draws its own masks, so only a dropout-free run is comparable element-wise.
# SGD, not Adam: Adam divides by |gradient|, so the float rounding of a different reduction order
# (two half-batch gradients all-reduced vs one full batch) flips the sign of near-zero gradients
# (vocabulary rows of the tied head) and moves those weights by a whole learning rate.
TINY = ("--model.config_overrides={n_layer: 2, n_embd: 64, n_head: 4, n_positions: 64, "
        "resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}")
STEPS = 6


def run(root: Path, text_file: str, recipe: str, devices: int, global_batch: int = 8) -> Path:
    args = [
        sys.executable, "-m", "lit_qft.cli", "fit", "--seed_everything=3",
        "--data=lit_qft.data.LanguageModelingDataModule", f"--data.source={text_file}", "--data.block_size=32",
        f"--data.batch_size={global_batch // devices}", "--data.max_documents=80", TINY,
        f"--model.quantization={recipe}", "--model.optimizer=SGD", "--model.optimizer.lr=0.5", "--model.warmup=2",
        f"--trainer.max_steps={STEPS}", "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
        f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={root}", f"--checkpoint_every_n_steps={STEPS}",
        f"--export.output_dir={root / 'quantized'}", "--export.max_val_batches=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, capture_output=True, text=True, timeout=1200, cwd=root.parent, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["QAT8da4w", "PTQInt8WeightOnly"])
def test_ddp_two_processes_match_one_process(tmp_path, text_file, recipe):
    single = run(tmp_path / "single", text_file, recipe, devices=1)
    ddp = run(tmp_path / "ddp", text_file, recipe, devices=2)

    a = torch.load(single / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    diff = total = 0.0
    for key, value in a["state_dict"].items():
        other = b["state_dict"][key]
        if recipe.startswith("PTQ"):  # float training: equal up to the rounding of the gradient sums
            torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
        else:  # QAT rounds activations per token: rounding noise can move a value across a step
            assert (other - value).abs().max() < 5e-3, key
            diff, total = diff + float((other - value).norm() ** 2), total + float(value.norm() ** 2)
    assert diff ** 0.5 <= 1e-3 * total ** 0.5

    ma, _, _ = load_quantized(single / "quantized")
    mb, _, _ = load_quantized(ddp / "quantized")
    ids = torch.arange(64).reshape(2, 32)
    with torch.no_grad():
        la, lb = ma(ids).logits, mb(ids).logits
    # Same converted model: logits agree to far below the quantization error itself.
    assert (la - lb).abs().max() < 1e-2 * la.abs().max()


def test_sharded_strategies_are_refused_up_front():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lit_qft.checks import check_strategy

    with pytest.raises(ValueError, match=r"--trainer.strategy: FSDPStrategy .* use --trainer.strategy=ddp"):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy()))
    check_strategy(SimpleNamespace(strategy=DDPStrategy()))  # accepted


@pytest.mark.slow
def test_fsdp_on_cpu_is_one_line(tmp_path, text_file):
    """On CPU Lightning itself refuses FSDP (GPU only); on GPUs lit-qft's check_strategy does."""
    out = subprocess.run(
        [sys.executable, "-m", "lit_qft.cli", "fit", "--data=lit_qft.data.LanguageModelingDataModule",
         f"--data.source={text_file}", "--data.block_size=32", TINY, "--model.quantization=QAT8da4w",
         "--trainer.strategy=fsdp", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_steps=1",
         f"--trainer.default_root_dir={tmp_path}", f"--export.output_dir={tmp_path / 'quantized'}"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("lit-qft: error:")]
    assert len(errors) == 1 and "fsdp" in errors[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "quantized").exists()
