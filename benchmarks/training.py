"""Training throughput and memory: every recipe against float in one process, and lit-qft vs the HF Trainer.

Three kinds of measurement, all on the same model, data, batch and precision:

* :func:`recipe_throughput` fits each recipe with :class:`~lit_qft.LitCausalLM` in *this* process,
  interleaved with the float run round after round, so recipe/float ratios share the machine's state.
* :func:`cli_fit` runs the real ``lit-qft fit`` command in a fresh process (allocator tuned by its
  entry point, as users get it); :func:`hf_fit` runs ``hf_trainer_baseline.py`` the same way. Each
  child is alone in its process, so its peak RSS (``wait4``) is that run's peak training memory.
* Low-bit optimizers and QAT recipes get their own ``lit-qft fit`` children for peak memory.
"""

from __future__ import annotations

import functools
import importlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
import torch

from benchmarks.measure import (
    allocator_peak, emit, flops_per_token, median, recipe_args, recipe_class_path, recipe_name, release, reset_peak,
    run_child, sync,
)


@dataclass
class TrainSpec:
    """One training workload: model, data, batch and step counts (shared by lit-qft and HF runs)."""

    architecture: str = "gpt2"
    config_overrides: dict[str, Any] | None = None
    pretrained: str | None = None
    tokenizer: str = "gpt2"
    source: str = "web-english"
    max_documents: int = 4000
    block_size: int = 128
    batch_size: int = 8
    warmup_steps: int = 2
    steps: int = 5
    lr: float = 3e-4
    weight_decay: float = 0.01
    seed: int = 0
    #: More ``lit-qft fit`` flags for the CLI children (``{"trainer.val_check_interval": 10}``).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.block_size * self.batch_size


class StepTimer(L.Callback):
    """Wall time of every optimizer step, loop included (data loading, logging, clipping).

    Time is taken between consecutive ``on_train_batch_end`` calls, with the device synchronized,
    the same points the HF Trainer's ``on_step_end`` marks in the baseline.

    Args:
        warmup: Steps excluded from the statistics (first-step allocation, optimizer compile).
        emit: Print the result line at the end of training (used when ``lit-qft fit`` runs as a child).
        with_export: Print it again once fit is over, with ``lit_qft.QuantizedExport``'s end-of-fit
            report (losses of the float / quantized / adapter / merged models) under ``export``;
            ``peak_rss_bytes`` stays the training peak.
    """

    def __init__(self, warmup: int = 2, emit: bool = False, with_export: bool = False) -> None:
        self.warmup = warmup
        self.emit = emit
        self.with_export = with_export
        self.stamps: list[float] = []
        self.tokens = 0
        self.flops_per_token = 0.0
        self.trainable_params = 0
        self._train_line: dict[str, Any] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.trainable_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        reset_peak(pl_module.device)
        sync(pl_module.device)
        self.stamps = [time.perf_counter()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(pl_module.device)
        self.stamps.append(time.perf_counter())
        if not self.tokens:
            self.tokens = int(batch["input_ids"].numel())
            self.flops_per_token = flops_per_token(pl_module.model, int(batch["input_ids"].shape[1]))

    def result(self, device) -> dict[str, Any]:
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        measured = steps[self.warmup:] or steps
        step = median(measured)
        return {
            "step_seconds": step,
            "step_seconds_all": [round(s, 4) for s in steps],
            "tokens_per_step": self.tokens,
            "tokens_per_second": self.tokens / step,
            "flops_per_token": self.flops_per_token,
            "trainable_params": self.trainable_params,
            "allocator_peak_bytes": allocator_peak(device),
        }

    def on_train_end(self, trainer, pl_module) -> None:
        if self.emit:
            self._train_line = emit(self.result(pl_module.device))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # teardown runs after every callback's on_fit_end, so the export report is complete here
        if self.with_export and stage == "fit" and self._train_line is not None:
            export = next((cb for cb in trainer.callbacks if hasattr(cb, "report") and "recipe" in cb.report), None)
            emit({**self._train_line, "export": dict(export.report) if export else {}}, peak_rss=False)


def _optimizer_factory(class_path: str, lr: float, weight_decay: float):
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return functools.partial(cls, lr=lr, weight_decay=weight_decay)


def lit_fit(spec: TrainSpec, recipe, datamodule, device: torch.device, precision: str,
            optimizer: str = "torch.optim.AdamW", **trainer_kwargs) -> tuple[Any, dict[str, Any]]:
    """Fit one :class:`LitCausalLM` for ``warmup_steps + steps`` steps; return ``(module, timings)``."""
    from lit_qft import LitCausalLM

    L.seed_everything(spec.seed, verbose=False)
    module = LitCausalLM(
        pretrained=spec.pretrained, architecture=spec.architecture, config_overrides=spec.config_overrides,
        tokenizer=spec.tokenizer, quantization=recipe, warmup=0.05,
        optimizer=_optimizer_factory(optimizer, spec.lr, spec.weight_decay),
    )
    timer = StepTimer(warmup=spec.warmup_steps)
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision=precision, max_steps=spec.warmup_steps + spec.steps,
        gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], **trainer_kwargs,
    )
    trainer.fit(module, datamodule=datamodule)
    return module, timer.result(device)


def trains_like_float(recipe) -> bool:
    """PTQ recipes train exactly as float does (they quantize after training): no separate training row."""
    return recipe.quantizes and not recipe.qat and recipe_name(recipe).startswith("PTQ")


def recipe_throughput(spec: TrainSpec, recipes: list, device: torch.device, precisions: list[str],
                      rounds: int, log=print) -> list[dict[str, Any]]:
    """Tokens/s and step time of every training recipe, interleaved with float in this process.

    Each round runs every (precision, recipe) once; the ratio to float is taken within a round and
    the median over rounds is reported, so slow drifts of a shared machine cancel out.
    """
    from lit_qft.quantization import NoQuantization

    dm = _datamodule(spec)
    trained = [r for r in recipes if not trains_like_float(r)]
    if not any(not r.quantizes for r in trained):
        trained.insert(0, NoQuantization())
    runs: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(rounds):
        for precision in precisions:
            for recipe in trained:
                key = (recipe_name(recipe), precision)
                try:
                    _, res = lit_fit(spec, recipe, dm, device, precision)
                except Exception as e:  # one failing recipe must not sink the suite
                    res = {"error": f"{type(e).__name__}: {e}"[:300]}
                release(device)  # the fitted module before the next one is built
                runs.setdefault(key, []).append(res)
                log(f"  train {key[0]:<36} {precision:<10} round {rnd + 1}/{rounds}: "
                    + (f"{res['tokens_per_second']:.0f} tok/s" if "error" not in res else res["error"]))
    rows = []
    float_name = recipe_name(NoQuantization())
    for (name, precision), results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            rows.append({"recipe": name, "precision": precision, "error": results[0]["error"]})
            continue
        base = runs.get((float_name, precision), [])
        ratios = [b["step_seconds"] / r["step_seconds"] for r, b in zip(results, base)
                  if "error" not in r and "error" not in b]
        fp32_base = runs.get((float_name, "32-true"), [])
        ratios_fp32 = [b["step_seconds"] / r["step_seconds"] for r, b in zip(results, fp32_base)
                       if "error" not in r and "error" not in b]
        step = median([r["step_seconds"] for r in ok])
        rows.append({
            "recipe": name, "precision": precision, "step_seconds": step,
            "tokens_per_second": ok[0]["tokens_per_step"] / step,
            "speed_vs_float": median(ratios), "speed_vs_float_fp32": median(ratios_fp32),
            "step_time_vs_float": 1 / median(ratios) if ratios else None,
            "flops_per_token": ok[0]["flops_per_token"], "allocator_peak_bytes": ok[0]["allocator_peak_bytes"],
            "rounds": [round(r["step_seconds"], 4) for r in ok],
        })
    return rows


def _datamodule(spec: TrainSpec):
    from lit_qft import LanguageModelingDataModule

    dm = LanguageModelingDataModule(
        source=spec.source, tokenizer=spec.tokenizer, block_size=spec.block_size, batch_size=spec.batch_size,
        max_documents=spec.max_documents, seed=42,
    )
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------ children: lit-qft CLI and HF Trainer
def cli_fit(spec: TrainSpec, device: torch.device, precision: str, recipe=None,
            optimizer: str = "torch.optim.AdamW", timeout: float = 1800, lora: Any = None,
            export_val_batches: int = 1) -> dict[str, Any]:
    """Run ``lit-qft fit`` (``python -m lit_qft.cli``, allocator tuned by its entry point) as a child.

    ``recipe`` goes on the command line with its arguments, ``lora`` (a ``LoraSettings``) as
    ``--model.lora``. With ``export_val_batches`` > 1 the end-of-fit export report (evaluated on
    that many validation batches) comes back under ``export``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        args = ["-m", "lit_qft.cli", "fit",
                "--data=lit_qft.data.LanguageModelingDataModule", f"--data.source={spec.source}",
                f"--data.tokenizer={spec.tokenizer}", f"--data.block_size={spec.block_size}",
                f"--data.batch_size={spec.batch_size}", f"--data.max_documents={spec.max_documents}",
                f"--model.architecture={spec.architecture}",
                f"--model.optimizer={optimizer}", f"--model.optimizer.lr={spec.lr}",
                f"--model.optimizer.weight_decay={spec.weight_decay}",
                f"--trainer.accelerator={device.type}", "--trainer.devices=1", f"--trainer.precision={precision}",
                f"--trainer.max_steps={spec.warmup_steps + spec.steps}", "--trainer.gradient_clip_val=1.0",
                "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
                "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp}",
                f"--seed_everything={spec.seed}",
                "--trainer.callbacks=" + json.dumps([{"class_path": "benchmarks.training.StepTimer",
                                                      "init_args": {"warmup": spec.warmup_steps, "emit": True,
                                                                    "with_export": export_val_batches > 1}}]),
                f"--export.output_dir={tmp}/quantized", f"--export.max_val_batches={export_val_batches}"]
        if spec.pretrained:
            args.append(f"--model.pretrained={spec.pretrained}")
        if spec.config_overrides:
            args.append("--model.config_overrides=" + json.dumps(spec.config_overrides))
        if recipe is not None:
            args.append("--model.quantization=" + json.dumps({"class_path": recipe_class_path(recipe),
                                                              "init_args": recipe_args(recipe)}))
        if lora is not None:
            args.append("--model.lora=" + json.dumps(asdict(lora)))
        if spec.extra:
            args += [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in spec.extra.items()]
        return run_child(args, timeout=timeout)


def hf_fit(spec: TrainSpec, device: torch.device, bf16: bool, timeout: float = 1800) -> dict[str, Any]:
    """Run ``benchmarks/hf_trainer_baseline.py`` (plain HF Trainer, default allocator) as a child."""
    args = ["benchmarks/hf_trainer_baseline.py", "--architecture", spec.architecture,
            "--tokenizer", spec.tokenizer, "--source", spec.source, "--max-documents", str(spec.max_documents),
            "--block-size", str(spec.block_size), "--batch-size", str(spec.batch_size),
            "--max-steps", str(spec.warmup_steps + spec.steps), "--timing-warmup", str(spec.warmup_steps),
            "--learning-rate", str(spec.lr), "--weight-decay", str(spec.weight_decay), "--seed", str(spec.seed),
            "--device", device.type]
    if spec.config_overrides:
        args += ["--config-overrides", json.dumps(spec.config_overrides)]
    if spec.pretrained:
        args += ["--pretrained", spec.pretrained]
    if bf16:
        args.append("--bf16")
    return run_child(args, timeout=timeout)


def framework_comparison(spec: TrainSpec, device: torch.device, rounds: int, precisions=("fp32", "bf16"),
                         log=print) -> list[dict[str, Any]]:
    """lit-qft fit vs the HF Trainer script at each precision, each in a fresh process, interleaved by round."""
    configs = [(tool, p) for p in precisions for tool in ("HF Trainer", "lit-qft fit")]
    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in configs}
    for rnd in range(rounds):
        for tool, precision in configs:
            if tool == "HF Trainer":
                res = hf_fit(spec, device, bf16=precision == "bf16")
            else:
                res = cli_fit(spec, device, "bf16-mixed" if precision == "bf16" else "32-true")
            runs[(tool, precision)].append(res)
            log(f"  {tool:<12} {precision}: round {rnd + 1}/{rounds}: "
                + (f"{res['tokens_per_second']:.0f} tok/s, peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB"
                   if "error" not in res else res["error"] + "\n" + res.get("log_tail", "")[-800:]))
    rows = []
    for (tool, precision), results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            rows.append({"tool": tool, "precision": precision, "error": results[0]["error"],
                         "log_tail": results[0].get("log_tail", "")[-1500:]})
            continue
        step = median([r["step_seconds"] for r in ok])
        rows.append({"tool": tool, "precision": precision, "step_seconds": step,
                     "tokens_per_second": ok[0]["tokens_per_step"] / step, "flops_per_token": ok[0]["flops_per_token"],
                     "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ok),
                     "allocator_peak_bytes": ok[0].get("allocator_peak_bytes"),
                     "rounds": [round(r["step_seconds"], 4) for r in ok]})
    return rows


def low_bit_optimizers() -> list[str]:
    """Optimizer class paths measured for memory: torch AdamW plus torchao's low-bit AdamW, when importable."""
    found = ["torch.optim.AdamW"]
    for path in ("torchao.optim.AdamW8bit", "torchao.optim.AdamW4bit"):
        module, _, name = path.rpartition(".")
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        found.append(path)
    return found


def memory_probes(spec: TrainSpec, recipes: list, device: torch.device, precision: str,
                  log=print) -> list[dict[str, Any]]:
    """Peak training memory of each training recipe (AdamW) and of float with each low-bit optimizer."""
    from lit_qft.quantization import NoQuantization

    cases = [(NoQuantization(), opt) for opt in low_bit_optimizers()]
    cases += [(r, "torch.optim.AdamW") for r in recipes if r.quantizes and not trains_like_float(r)]
    rows = []
    for recipe, opt in cases:
        res = cli_fit(spec, device, precision, recipe=recipe, optimizer=opt)
        row = {"recipe": recipe_name(recipe), "optimizer": opt.rsplit(".", 1)[-1], "precision": precision}
        if "error" in res:
            row.update(error=res["error"], log_tail=res.get("log_tail", "")[-1500:])
            log(f"  memory {row['recipe']} + {row['optimizer']}: {res['error']}\n{res.get('log_tail', '')[-800:]}")
        else:
            row.update({k: res.get(k) for k in ("peak_rss_bytes", "allocator_peak_bytes", "tokens_per_second",
                                                  "step_seconds")})
            log(f"  memory {row['recipe']} + {row['optimizer']}: peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB")
        rows.append(row)
    return rows


def spec_dict(spec: TrainSpec) -> dict[str, Any]:
    return asdict(spec)
