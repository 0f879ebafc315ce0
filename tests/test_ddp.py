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

# Dropout off: each process draws its own masks, so only a dropout-free run is bitwise comparable.
TINY = ("--model.config_overrides={n_layer: 2, n_embd: 64, n_head: 4, n_positions: 64, "
        "resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}")
STEPS = 6


def run(root: Path, text_file: str, recipe: str, devices: int, global_batch: int = 8) -> Path:
    args = [
        sys.executable, "-m", "lit_qft.cli", "fit", "--seed_everything=3",
        "--data=lit_qft.data.LanguageModelingDataModule", f"--data.source={text_file}", "--data.block_size=32",
        f"--data.batch_size={global_batch // devices}", "--data.max_documents=80", TINY,
        f"--model.quantization={recipe}", "--model.optimizer=AdamW", "--model.optimizer.lr=3e-3", "--model.warmup=2",
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
    moved = 0.0
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
    # Training happened (the weights are not simply both at their initial values).
    init = torch.load(single / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    moved = max(float(s["exp_avg"].abs().max()) for s in init.values())
    assert moved > 0

    ma, _, _ = load_quantized(single / "quantized")
    mb, _, _ = load_quantized(ddp / "quantized")
    ids = torch.arange(64).reshape(2, 32)
    with torch.no_grad():
        la, lb = ma(ids).logits, mb(ids).logits
    # Same converted model: logits agree to far below the quantization error itself.
    assert (la - lb).abs().max() < 1e-2 * la.abs().max()


@pytest.mark.slow
def test_fsdp_with_qat_is_refused_with_one_line(tmp_path, text_file):
    out = subprocess.run(
        [sys.executable, "-m", "lit_qft.cli", "fit", "--data=lit_qft.data.LanguageModelingDataModule",
         f"--data.source={text_file}", "--data.block_size=32", TINY, "--model.quantization=QAT8da4w",
         "--trainer.strategy=fsdp", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_steps=1",
         f"--trainer.default_root_dir={tmp_path}", f"--export.output_dir={tmp_path / 'quantized'}"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "lit-qft: error: --trainer.strategy" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "quantized").exists()
