"""Loading a checkpoint or a saved model never runs code from the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lit_qft.export import load_quantized, recipe_from_dict
from lit_qft.resume import SafeCheckpointIO


class RunsCode:
    """Unpickling this object runs a shell command (the classic malicious-pickle payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_evil(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": RunsCode(marker)}, path)
    return path


def test_the_payload_really_runs_code_when_loaded_unsafely(tmp_path):
    """Guards the other tests: the crafted file does execute under a plain pickle load."""
    marker = tmp_path / "pwned"
    write_evil(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_lightning_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = write_evil(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError, match=r"--ckpt_path .*evil.ckpt was refused: it holds Python objects"):
        SafeCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


def test_quantized_folder_with_code_is_refused(tmp_path, tiny_gpt2):
    from lit_qft import quantization as Q
    from lit_qft.assets import load_tokenizer
    from lit_qft.export import WEIGHTS_FILE, save_quantized

    recipe = Q.PTQInt8WeightOnly()
    Q.prepare(tiny_gpt2, recipe)
    Q.convert(tiny_gpt2, recipe)
    folder = save_quantized(tiny_gpt2, load_tokenizer("gpt2"), recipe, tmp_path / "q")
    load_quantized(folder)  # the genuine folder loads

    marker = tmp_path / "pwned"
    write_evil(folder / WEIGHTS_FILE, marker)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_quantized(folder)
    assert not marker.exists()


def test_recipe_file_cannot_name_arbitrary_classes():
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_from_dict({"class_path": "os.system", "init_args": {}})
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_from_dict({"class_path": "lit_qft.quantization.torch", "init_args": {}})


def test_remote_code_in_a_model_folder_does_not_run_by_default(tmp_path):
    """A model folder whose config asks for custom code: refused unless trust_remote_code is on."""
    from lit_qft.models import build_model

    marker = tmp_path / "pwned"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "evil_config.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import GPT2Config\nclass EvilConfig(GPT2Config):\n    model_type = 'evil'\n"
    )
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil_config.EvilConfig"},
        "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 64,
    }))
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_model(str(folder))
    assert not marker.exists()


def test_real_checkpoints_load_with_weights_only(tmp_path, text_file):
    """A checkpoint written by ``lit-qft fit`` (QAT model, optimizer, schedule, loops) loads with weights_only=True."""
    from lit_qft.cli import build_cli

    build_cli([
        "fit", "--data=lit_qft.data.LanguageModelingDataModule", f"--data.source={text_file}",
        "--data.block_size=32", "--data.batch_size=8", "--data.max_documents=40",
        "--model.config_overrides={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 32}",
        "--model.quantization=QAT8da4w", "--trainer.max_steps=2", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1", "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}", "--checkpoint_every_n_steps=1",
        f"--export.output_dir={tmp_path / 'q'}", "--export.max_val_batches=1",
    ])
    checkpoint = SafeCheckpointIO().load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2 and checkpoint["lit_qft_recipe"]["class_path"].endswith("QAT8da4w")
    assert any(isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values())
