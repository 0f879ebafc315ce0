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
        x, y = a[k], b[k]
        if type(x) is not torch.Tensor and hasattr(x, "dequantize"):  # torchao tensor (quantized LoRA base)
            x, y = x.dequantize(), y.dequantize()
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("recipe, extra", [
    pytest.param("NoQuantization", [], marks=pytest.mark.slow, id="float"),
    pytest.param("QAT8da4w", [], id="qat"),
    # fake quantization starts at step 5: the run resumes from step 4 (before) and crosses it
    pytest.param("QAT8da4w", ["--model.quantization.fake_quant_after_steps=5"], marks=pytest.mark.slow, id="qat-delayed"),
    # LoRA over an int8 base: the checkpoint holds torchao tensor subclasses (loaded weights_only)
    pytest.param("PTQInt8WeightOnly", ["--model.lora.rank=4"], marks=pytest.mark.slow, id="int8-lora"),
])
def test_interrupted_fit_resumes_to_the_uninterrupted_result(tmp_path, text_file, recipe, extra):
    build_cli(fit_args(tmp_path / "a", text_file, recipe, extra))

    # Interrupted at step 6 (last.ckpt is from step 4, mid-epoch, before the validation at step 5).
    with pytest.raises(Interrupt):
        build_cli(fit_args(tmp_path / "b", text_file, recipe, [*extra, f"--trainer.callbacks+={__name__}.InterruptAt",
                                                               "--trainer.callbacks.step=6"]))
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == EVERY
    assert not (tmp_path / "b" / "quantized").exists()
    build_cli(fit_args(tmp_path / "b", text_file, recipe, [*extra, "--ckpt_path=last"]))

    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert_same_weights(a, b)
    if (tmp_path / "a" / "quantized" / "model.pt").is_file():
        ma, _, _ = load_quantized(tmp_path / "a" / "quantized")
        mb, _, _ = load_quantized(tmp_path / "b" / "quantized")
        ids = torch.arange(40).reshape(2, 20)
        with torch.no_grad():
            torch.testing.assert_close(ma(ids).logits, mb(ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- real kills (subprocess)
KILLER = '''
import os
import lightning as L


class KillAt(L.Callback):
    """Sends ``signum`` to this very process at the start of step ``step``."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
'''


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_cli_resumes_to_the_uninterrupted_result(tmp_path, text_file, signum):
    recipe = "QAT8da4w"
    build_cli(fit_args(tmp_path / "a", text_file, recipe))

    (tmp_path / "killer.py").write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "lit_qft.cli", *fit_args(tmp_path / "b", text_file, recipe)]
    killed = subprocess.run(
        [*cmd, "--trainer.callbacks+=killer.KillAt", "--trainer.callbacks.step=6", f"--trainer.callbacks.signum={int(signum)}"],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    if signum == signal.SIGKILL:
        assert killed.returncode == -signal.SIGKILL
    else:  # Lightning finishes the step, then lit-qft exits 143 with one line
        assert killed.returncode == 143, killed.stderr[-3000:]
        assert "lit-qft: stopped by SIGTERM" in killed.stderr and "Traceback" not in killed.stderr
    assert not (tmp_path / "b" / "quantized").exists()
    assert not list((tmp_path / "b" / "checkpoints").glob(".*tmp*")), "no temporary checkpoint left behind"

    resumed = subprocess.run([*cmd, "--ckpt_path=last"], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    ma, _, _ = load_quantized(tmp_path / "a" / "quantized")
    mb, _, _ = load_quantized(tmp_path / "b" / "quantized")
    ids = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(ma(ids).logits, mb(ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- NaN
class PoisonAt(L.Callback):
    """Makes the model produce NaN from step ``step`` on (a weight set to NaN)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.get_input_embeddings().weight.fill_(float("nan"))


def test_nan_loss_stops_with_one_line_naming_the_step(tmp_path, text_file, capsys):
    args = fit_args(tmp_path, text_file, "QAT8da4w", [f"--trainer.callbacks+={__name__}.PoisonAt", "--trainer.callbacks.step=5"])
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    errors = [line for line in err.splitlines() if line.startswith("lit-qft: error:")]
    assert errors == ["lit-qft: error: train loss is nan at step 5; lower the learning rate or enable gradient "
                      "clipping (--trainer.gradient_clip_val)"], err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "quantized").exists()
    # The last checkpoint (step 4) holds finite weights to go back to.
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


# ---------------------------------------------------------------- atomic writes
def test_interrupted_export_leaves_no_loadable_half_written_model(tmp_path, tiny_gpt2, monkeypatch):
    from lit_qft import export
    from lit_qft import quantization as Q
    from lit_qft.assets import load_tokenizer

    recipe = Q.PTQInt8WeightOnly()
    Q.prepare(tiny_gpt2, recipe)
    Q.convert(tiny_gpt2, recipe)
    tok = load_tokenizer("gpt2")
    good = export.save_quantized(tiny_gpt2, tok, recipe, tmp_path / "q")
    ids = torch.arange(20).reshape(1, 20)
    with torch.no_grad():
        before = export.load_quantized(good)[0](ids).logits

    real_save = torch.save

    def save_half_then_die(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])  # a half-written file ...
        raise KeyboardInterrupt  # ... and the process is interrupted

    monkeypatch.setattr(export.torch, "save", save_half_then_die)
    with torch.no_grad():  # change the weights, so a partial overwrite would show
        tiny_gpt2.transformer.wpe.weight.add_(1.0)
    for target in (tmp_path / "q", tmp_path / "new"):
        with pytest.raises(KeyboardInterrupt):
            export.save_quantized(tiny_gpt2, tok, recipe, target)
    monkeypatch.undo()

    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"], "no temporary folder left behind"
    with torch.no_grad():  # the previous export is intact and loads to the same model
        torch.testing.assert_close(export.load_quantized(good)[0](ids).logits, before, rtol=0, atol=0)


def test_interrupted_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from lit_qft import resume

    io = resume.SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "w": torch.ones(3)}, path)

    def die_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(resume.torch, "save", die_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 8, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert io.load_checkpoint(path)["global_step"] == 4
