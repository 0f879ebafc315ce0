"""Resume after a kill gives the uninterrupted result; writes are atomic; NaN stops with one line.

The fast tests interrupt ``fit`` in-process (an exception at a chosen step: what is on disk is then
exactly what a kill leaves) and resume with ``--ckpt_path last``. The slow ones kill a real
``lit-qft fit`` subprocess with SIGKILL / SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_qft.cli import build_cli, main
from lit_qft.export import load_quantized

TINY = "--model.config_overrides={n_layer: 2, n_embd: 64, n_head: 4, n_positions: 64}"
STEPS, EVERY = 12, 4


class Interrupt(Exception):
    """Stands in for a kill: raised at the start of a chosen step, after a checkpoint was written."""


class InterruptAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Interrupt(f"interrupted at step {self.step}")


def fit_args(root: Path, text_file: str, recipe: str, extra: list[str] = ()) -> list[str]:
    """A tiny resumable run: dropout on, 12 steps over 2+ epochs, last.ckpt every 4 steps, validation every 5."""
    return [
        "fit", "--seed_everything=7",
        "--data=lit_qft.data.LanguageModelingDataModule", f"--data.source={text_file}",
        "--data.block_size=32", "--data.batch_size=8", "--data.max_documents=60",
        TINY, f"--model.quantization={recipe}",
        "--model.optimizer=AdamW", "--model.optimizer.lr=3e-3", "--model.warmup=2",
        f"--trainer.max_steps={STEPS}", "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.val_check_interval=5", "--trainer.check_val_every_n_epoch=null", "--trainer.limit_val_batches=2",
        f"--trainer.default_root_dir={root}", f"--checkpoint_every_n_steps={EVERY}",
        f"--export.output_dir={root / 'quantized'}", "--export.max_val_batches=2",
        *extra,
    ]


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == STEPS
    return state["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("recipe", ["NoQuantization", "QAT8da4w"])
def test_interrupted_fit_resumes_to_the_uninterrupted_result(tmp_path, text_file, recipe):
    build_cli(fit_args(tmp_path / "a", text_file, recipe))

    # Interrupted at step 6 (last.ckpt is from step 4, mid-epoch, before the validation at step 5).
    with pytest.raises(Interrupt):
        build_cli(fit_args(tmp_path / "b", text_file, recipe, [f"--trainer.callbacks+={__name__}.InterruptAt",
                                                               "--trainer.callbacks.step=6"]))
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == EVERY
    assert not (tmp_path / "b" / "quantized").exists()
    build_cli(fit_args(tmp_path / "b", text_file, recipe, ["--ckpt_path=last"]))

    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert_same_weights(a, b)
    # The run did train: the weights moved away from their initial values.
    if recipe != "NoQuantization":
        ma, _, _ = load_quantized(tmp_path / "a" / "quantized")
        mb, _, _ = load_quantized(tmp_path / "b" / "quantized")
        ids = torch.arange(40).reshape(2, 20)
        with torch.no_grad():
            torch.testing.assert_close(ma(ids).logits, mb(ids).logits, rtol=1e-5, atol=1e-5)
