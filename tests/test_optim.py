"""Optimizers, parameter groups and per-step LR schedules (lit_qft/optim.py and their CLI wiring)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from lit_qft import quantization as Q
from lit_qft.cli import build_cli
from lit_qft.optim import (
    build_schedule,
    call_scheduler_factory,
    optimizer_state_bytes,
    parameter_groups,
    warmup_steps,
)

TINY = "--model.config_overrides={n_layer: 2, n_embd: 64, n_head: 4, n_positions: 64}"
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def names(groups) -> dict[str, set[str]]:
    return {g["name"]: {n for n, _ in g["params"]} for g in groups}


def gpt2_expected():
    decay = {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in BLOCK_LINEARS}
    no_decay = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    for i in range(2):
        no_decay |= {f"transformer.h.{i}.{m}.bias" for m in BLOCK_LINEARS}
        no_decay |= {f"transformer.h.{i}.{ln}.{p}" for ln in ("ln_1", "ln_2") for p in ("weight", "bias")}
    return decay, no_decay


# ------------------------------------------------------------------ parameter groups
def test_default_groups_gpt2_exact_names_and_tied_head_once(tiny_gpt2):
    Q.prepare(tiny_gpt2, Q.NoQuantization())
    groups = parameter_groups(tiny_gpt2)
    decay, no_decay = gpt2_expected()
    assert names(groups) == {"decay": decay, "no_decay": no_decay}
    assert [g.get("weight_decay") for g in groups] == [None, 0.0]  # decay group takes the optimizer's
    # lm_head is tied to wte: counted once, under the embedding's name
    assert sum(len(g["params"]) for g in groups) == len({id(p) for p in tiny_gpt2.parameters()})
    assert tiny_gpt2.lm_head.weight is tiny_gpt2.transformer.wte.weight


def test_default_groups_llama_rmsnorm_and_embedding_not_decayed(tiny_llama):
    groups = names(parameter_groups(tiny_llama))
    proj = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert groups["decay"] == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in proj}
    assert groups["no_decay"] == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    }


def test_decay_all_and_custom_patterns(tiny_gpt2):
    Q.prepare(tiny_gpt2, Q.NoQuantization())
    decay, no_decay = gpt2_expected()
    assert names(parameter_groups(tiny_gpt2, "decay_all")) == {"decay": decay | no_decay}
    custom = names(parameter_groups(tiny_gpt2, "custom", [r"\.bias$", r"^transformer\.wte\."]))
    assert custom["no_decay"] == {"transformer.wte.weight"} | {n for n in no_decay if n.endswith(".bias")}
    assert custom["decay"] == (decay | no_decay) - custom["no_decay"]


def test_bad_decay_settings_name_the_flag(tiny_gpt2):
    with pytest.raises(ValueError, match="--model.no_decay_patterns"):
        parameter_groups(tiny_gpt2, "custom")
    with pytest.raises(ValueError, match="--model.no_decay_patterns"):
        parameter_groups(tiny_gpt2, "decay_all", ["bias"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        parameter_groups(tiny_gpt2, "custom", ["(bias"])
    with pytest.raises(ValueError, match="--model.weight_decay_strategy"):
        parameter_groups(tiny_gpt2, "no_decay")


def test_learned_quantizer_ranges_get_their_own_group(tiny_gpt2):
    Q.prepare(tiny_gpt2, Q.QAT8da4w(group_size=32, range_learning=True))
    groups = parameter_groups(tiny_gpt2, quantizer_lr=1e-4)
    decay, no_decay = gpt2_expected()
    scales = {f"transformer.h.{i}.{m}.weight_fake_quantizer.scale" for i in range(2) for m in BLOCK_LINEARS}
    assert names(groups) == {"decay": decay, "no_decay": no_decay, "quantizer": scales}
    quantizer = groups[-1]
    assert quantizer["lr"] == 1e-4 and quantizer["weight_decay"] == 0.0
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3, 1e-4]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0, 0.0]
    assert set(optimizer.param_groups[2]["param_names"]) == scales


# ------------------------------------------------------------------ schedules
def _schedule_lrs(name, warmup, total, kwargs=None, lr=0.1):
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=lr)
    scheduler = build_schedule(optimizer, name, warmup, total, kwargs)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def expected_lr(name, step, warmup, total, lr=0.1, power=1.0, lr_end=1e-7):
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / (total - warmup)
    if name == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "linear":
        return lr * (1 - progress)
    if name == "polynomial":
        return (lr - lr_end) * (1 - progress) ** power + lr_end
    if name == "constant":
        return lr
    raise AssertionError(name)


@pytest.mark.parametrize("name,kwargs", [
    ("cosine", {}), ("linear", {}), ("polynomial", {"power": 2.0, "lr_end": 1e-4}), ("constant", {}),
])
def test_schedule_matches_formula(name, kwargs):
    total, warmup = 40, 0.1  # a fraction: 4 warmup steps
    assert warmup_steps(warmup, total) == 4
    lrs = _schedule_lrs(name, warmup, total, kwargs)
    for step in (0, 1, 3, 4, 10, 20, 39):
        assert lrs[step] == pytest.approx(expected_lr(name, step, 4, total, **kwargs), rel=1e-6, abs=1e-12), step


def test_warmup_in_steps_and_bad_values():
    assert _schedule_lrs("linear", 5, 20)[:6] == pytest.approx([0, 0.02, 0.04, 0.06, 0.08, 0.1])
    with pytest.raises(ValueError, match="--model.warmup"):
        warmup_steps(-1, 10)
    with pytest.raises(ValueError, match="--model.warmup"):
        warmup_steps(2.5, 10)
    with pytest.raises(ValueError, match="--model.warmup"):
        _schedule_lrs("linear", 30, 20)
    with pytest.raises(ValueError, match="--model.lr_schedule"):
        _schedule_lrs("cosine_annealing", 0, 20)
    with pytest.raises(ValueError, match="--model.lr_schedule_kwargs"):
        _schedule_lrs("polynomial", 0, 20, {"powr": 2})


def test_onecycle_total_steps_filled_from_the_run():
    p = torch.nn.Parameter(torch.zeros(1))
    cli = build_cli(["--data=lit_qft.data.LanguageModelingDataModule", "--data.source=x.txt",
                     "--model.scheduler=OneCycleLR", "--model.scheduler.max_lr=0.01"], run=False)
    scheduler = call_scheduler_factory(cli.model.scheduler_factory, torch.optim.SGD([p], lr=0.01), lambda: 123)
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and scheduler.total_steps == 123


# ------------------------------------------------------------------ CLI / YAML
OPTIM_FLAGS = [
    "--model.optimizer=SGD", "--model.optimizer.lr=0.05", "--model.optimizer.momentum=0.9",
    "--model.optimizer.weight_decay=0.01",
    "--model.scheduler=CosineAnnealingLR", "--model.scheduler.T_max=50",
    "--model.lr_schedule=polynomial", "--model.lr_schedule_kwargs={power: 2.0}", "--model.warmup=10",
    "--model.total_steps=200", "--model.weight_decay_strategy=custom", "--model.no_decay_patterns=[bias$, wte]",
    "--model.quantizer_lr=0.001",
]
OPTIM_YAML = """
model:
  optimizer:
    class_path: torch.optim.SGD
    init_args: {lr: 0.05, momentum: 0.9, weight_decay: 0.01}
  scheduler:
    class_path: torch.optim.lr_scheduler.CosineAnnealingLR
    init_args: {T_max: 50}
  lr_schedule: polynomial
  lr_schedule_kwargs: {power: 2.0}
  warmup: 10
  total_steps: 200
  weight_decay_strategy: custom
  no_decay_patterns: [bias$, wte]
  quantizer_lr: 0.001
data:
  class_path: lit_qft.data.LanguageModelingDataModule
  init_args: {source: x.txt}
"""


@pytest.mark.parametrize("source", ["cli", "yaml"])
def test_every_optimization_choice_from_cli_and_yaml(tmp_path, source):
    if source == "cli":
        args = ["--data=lit_qft.data.LanguageModelingDataModule", "--data.source=x.txt", *OPTIM_FLAGS]
    else:
        (tmp_path / "c.yaml").write_text(OPTIM_YAML)
        args = [f"--config={tmp_path / 'c.yaml'}"]
    model = build_cli(args, run=False).model
    hp = model.hparams
    assert (hp.lr_schedule, hp.lr_schedule_kwargs, hp.warmup, hp.total_steps) == ("polynomial", {"power": 2.0}, 10, 200)
    assert (hp.weight_decay_strategy, hp.no_decay_patterns, hp.quantizer_lr) == ("custom", ["bias$", "wte"], 0.001)
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = model.optimizer_factory([p])
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["lr"] == 0.05 and optimizer.defaults["momentum"] == 0.9
    scheduler = model.scheduler_factory(optimizer)
    assert type(scheduler) is torch.optim.lr_scheduler.CosineAnnealingLR and scheduler.T_max == 50


@pytest.mark.parametrize("cls", ["AdamW8bit", "AdamW4bit", "AdamWFp8"])
def test_low_bit_optimizer_by_class_path(cls):
    model = build_cli(["--data=lit_qft.data.LanguageModelingDataModule", "--data.source=x.txt",
                       f"--model.optimizer=torchao.optim.{cls}", "--model.optimizer.lr=0.002"], run=False).model
    optimizer = model.optimizer_factory([torch.nn.Parameter(torch.zeros(64, 64))])
    assert type(optimizer).__name__ == cls and float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.002)


# ------------------------------------------------------------------ optimizers train
def _batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (8, 4)).repeat(1, 8)  # each row repeats a 4-token motif: learnable
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("make", [
    lambda g: torch.optim.AdamW(g, lr=3e-3, weight_decay=0.01),
    lambda g: torch.optim.SGD(g, lr=0.3, momentum=0.9, weight_decay=0.01),
], ids=["AdamW", "SGD"])
def test_optimizer_lowers_the_loss(tiny_gpt2, make):
    model = tiny_gpt2.train()
    Q.prepare(model, Q.NoQuantization())
    optimizer = make(parameter_groups(model))
    scheduler = build_schedule(optimizer, "cosine", 1, 8)
    batch = _batch()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_optimizer_state_bytes_adamw(tiny_gpt2):
    params = [p for p in tiny_gpt2.parameters()]
    optimizer = torch.optim.AdamW(params)
    tiny_gpt2(**_batch()).loss.backward()
    optimizer.step()
    n = sum(p.numel() for p in {id(p): p for p in params}.values())
    # two fp32 moments per parameter + one scalar step counter per tensor
    assert optimizer_state_bytes(optimizer) == 8 * n + 4 * len(optimizer.state)


# ------------------------------------------------------------------ Lightning end to end
def _fit(tmp_path, text_file, extra, steps=10):
    args = [
        "fit", "--data=lit_qft.data.LanguageModelingDataModule", f"--data.source={text_file}",
        "--data.block_size=32", "--data.batch_size=4", TINY,
        f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.name=log",
        "--trainer.callbacks=LearningRateMonitor", "--trainer.callbacks.logging_interval=step",
        f"--trainer.default_root_dir={tmp_path}", f"--export.output_dir={tmp_path / 'q'}", *extra,
    ]
    cli = build_cli(args)
    rows = list(csv.DictReader(next(Path(tmp_path, "log").rglob("metrics.csv")).open()))
    return cli, rows


def test_logged_lr_follows_warmup_cosine_every_step(tmp_path, text_file):
    cli, rows = _fit(tmp_path, text_file, [
        "--model.optimizer=AdamW", "--model.optimizer.lr=0.01", "--model.lr_schedule=cosine", "--model.warmup=3",
        "--model.total_steps=10",
    ])
    logged = {int(r["step"]): float(r["lr-AdamW/decay"]) for r in rows if r.get("lr-AdamW/decay")}
    assert sorted(logged) == list(range(10))  # every optimizer step
    for step, lr in logged.items():
        assert lr == pytest.approx(expected_lr("cosine", step, 3, 10, lr=0.01), abs=1e-9), step
    no_decay = {int(r["step"]): float(r["lr-AdamW/no_decay"]) for r in rows if r.get("lr-AdamW/no_decay")}
    assert no_decay == logged
    assert cli.trainer.lr_scheduler_configs[0].interval == "step"


def test_torch_scheduler_stepped_every_step_with_accumulation(tmp_path, text_file):
    # OneCycleLR without total_steps: filled from the run = max_steps (optimizer steps, not batches)
    cli, rows = _fit(tmp_path, text_file, [
        "--model.optimizer=SGD", "--model.optimizer.lr=0.01", "--model.scheduler=OneCycleLR",
        "--model.scheduler.max_lr=0.01", "--model.scheduler.cycle_momentum=false",
        "--trainer.accumulate_grad_batches=2",
    ], steps=6)
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and scheduler.total_steps == 6
    p = torch.nn.Parameter(torch.zeros(1))
    reference_opt = torch.optim.SGD([p], lr=0.01)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_opt, max_lr=0.01, total_steps=6, cycle_momentum=False)
    expected = []
    for _ in range(6):
        expected.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        reference.step()
    logged = {}
    for r in rows:
        if r.get("lr-SGD/decay"):
            logged[int(r["step"])] = float(r["lr-SGD/decay"])
    assert [logged[s] for s in range(6)] == pytest.approx(expected)
    assert cli.trainer.global_step == 6


# ------------------------------------------------------------------ torchao low-bit optimizers (compile: slow)
@pytest.mark.slow
@pytest.mark.parametrize("cls,max_ratio", [("AdamW8bit", 0.30), ("AdamW4bit", 0.17), ("AdamWFp8", 0.30)])
def test_low_bit_optimizer_trains_with_schedule_and_saves_state_memory(tmp_path, text_file, cls, max_ratio):
    # n_embd 256: torchao keeps a tensor in fp32 unless its size is a multiple of the block size
    # (256 for 8-bit/FP8, 128 for 4-bit); 50257 x 64 is not, 50257 x 256 is.
    cli, rows = _fit(tmp_path, text_file, [
        "--model.config_overrides={n_layer: 2, n_embd: 256, n_head: 4, n_positions: 64}",
        f"--model.optimizer=torchao.optim.{cls}", "--model.optimizer.lr=0.003", "--model.warmup=2",
        "--model.lr_schedule=cosine",
    ], steps=12)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    lrs = {int(r["step"]): float(r[f"lr-{cls}/decay"]) for r in rows if r.get(f"lr-{cls}/decay")}
    assert lrs[1] == pytest.approx(0.0015) and lrs[11] == pytest.approx(expected_lr("cosine", 11, 2, 12, lr=0.003))
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == cls
    model = cli.model.model
    for p in (model.transformer.wte.weight, model.transformer.h[0].mlp.c_fc.weight):
        assert type(optimizer.state[p]["exp_avg"]).__name__.startswith("OptimState")
    assert type(optimizer.state[model.transformer.h[0].ln_1.weight]["exp_avg"]) is torch.Tensor  # < 4096 values
    params = {id(p): p for p in cli.model.model.parameters()}.values()
    fp32_adamw = 8 * sum(p.numel() for p in params) + 4 * len(params)  # as measured in the AdamW test above
    low = optimizer_state_bytes(optimizer)
    print(f"\n{cls}: optimizer state {low / 2**20:.2f} MiB vs AdamW fp32 {fp32_adamw / 2**20:.2f} MiB "
          f"({low / fp32_adamw:.3f}x)")
    assert low < max_ratio * fp32_adamw
