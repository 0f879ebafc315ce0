"""Delayed fake quantization and QAT resume: a run resumed from a Lightning checkpoint taken inside
the float window, or after fake quantization started, ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from conftest import TINY_GPT2
from lit_qft import quantization as Q
from lit_qft.module import LitCausalLM

#: One batch per epoch: Lightning does not restore the position inside a plain (non-stateful)
#: DataLoader on resume, which would change the data order; data order is not what is tested here.
STEPS, BATCHES_PER_EPOCH = 6, 1


def _batches():
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(BATCHES_PER_EPOCH):
        ids = torch.randint(0, 512, (2, 16), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _adamw(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)


class FakeQuantLog(L.Callback):
    """Records, per optimizer step, whether fake quantization was on when the loss was computed."""

    def __init__(self):
        self.states: dict[int, bool | None] = {}

    def on_before_backward(self, trainer, pl_module, loss):
        self.states[trainer.global_step] = Q.fake_quant_enabled(pl_module.model)


def _fit(root, recipe, ckpt_path=None, every_n_epochs=None):
    torch.manual_seed(0)
    module = LitCausalLM(
        architecture="gpt2", tokenizer="gpt2", quantization=recipe, optimizer=_adamw, lr_schedule="cosine", warmup=0,
        config_overrides={**TINY_GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    )
    log = FakeQuantLog()
    callbacks = [log]
    if every_n_epochs:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_epochs=every_n_epochs, save_top_k=-1,
                                         save_on_train_epoch_end=True, filename="{step}"))
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(every_n_epochs), callbacks=callbacks, limit_val_batches=0, default_root_dir=root,
    )
    trainer.fit(module, train_dataloaders=DataLoader(_batches(), batch_size=None), ckpt_path=ckpt_path)
    return module, trainer, log.states


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run saving a checkpoint every epoch, and runs resumed from steps 2 and 4."""
    root = tmp_path_factory.mktemp("resume")
    # Fake quantization starts at step 3 (half the run); learned ranges make the quantizer stateful too.
    recipe = Q.QAT8da4w(group_size=32, fake_quant_after_steps=0.5, range_learning=True)
    full = _fit(root, recipe, every_n_epochs=1)
    resumed = {step: _fit(root / f"r{step}", recipe, ckpt_path=root / f"step={step}.ckpt") for step in (2, 4)}
    return recipe, full, resumed


def _weights(module):
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_fake_quant_switches_on_at_the_delayed_step(runs):
    recipe, (_, _, states), _ = runs
    start = recipe.fake_quant_start_step(STEPS)
    assert start == 3
    assert states == {step: step >= start for step in range(STEPS)}


@pytest.mark.parametrize("step", [2, 4], ids=["inside-delay-window", "after-switch"])
def test_resumed_run_matches_uninterrupted_run(runs, step):
    _, (full, full_trainer, full_states), resumed = runs
    module, trainer, states = resumed[step]
    # the resumed run trains steps step..STEPS-1 with the same fake-quant state as the full run
    assert states == {s: full_states[s] for s in range(step, STEPS)}
    ours, theirs = _weights(module), _weights(full)
    assert ours.keys() == theirs.keys()
    assert any("weight_fake_quantizer.scale" in k for k in ours)  # learned ranges are resumed too
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    # the optimizer state (AdamW moments and step counts) is restored, not restarted
    opt, full_opt = trainer.optimizers[0].state_dict(), full_trainer.optimizers[0].state_dict()
    for pid, state in full_opt["state"].items():
        torch.testing.assert_close(opt["state"][pid]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert float(opt["state"][pid]["step"]) == float(state["step"])
    steps = sorted({float(state["step"]) for state in opt["state"].values()})
    assert steps == [STEPS - 3, STEPS]  # learned scales only step once fake quantization is on


def test_checkpoint_records_the_recipe(runs, tmp_path_factory):
    recipe, _, _ = runs
    root = next(p for p in tmp_path_factory.getbasetemp().glob("resume*"))
    ckpt = torch.load(root / "step=4.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["lit_qft_recipe"]["class_path"] == "lit_qft.quantization.QAT8da4w"
    assert ckpt["lit_qft_recipe"]["init_args"]["fake_quant_after_steps"] == recipe.fake_quant_after_steps


def test_delay_changes_training(runs, tmp_path):
    """Without the delay the same run ends elsewhere: the switch is not a no-op."""
    recipe, (full, _, _), _ = runs
    no_delay, _, states = _fit(tmp_path, Q.QAT8da4w(group_size=32, range_learning=True))
    assert all(states.values())
    a, b = _weights(no_delay), _weights(full)
    assert not torch.allclose(a["transformer.h.0.mlp.c_fc.weight"], b["transformer.h.0.mlp.c_fc.weight"], atol=1e-6)
