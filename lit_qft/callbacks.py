"""Callbacks: convert and save the quantized model at the end of fit, with a float-vs-quantized report."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from lit_qft import quantization as Q
from lit_qft.export import folder_size_bytes, save_quantized
from lit_qft.lora import finish_fit as finish_lora_fit
from lit_qft.module import perplexity


def _resuming(trainer: L.Trainer) -> bool:
    """True when fit continues from a checkpoint: the adapters are no longer at their zero start."""
    return bool(getattr(trainer, "ckpt_path", None))


class QuantizedExport(L.Callback):
    """At the end of ``fit``: evaluate float, convert to the recipe's quantized model, evaluate, save.

    The quantized folder loads back with :func:`lit_qft.export.load_quantized`.

    Args:
        output_dir: Where the converted model is written (atomically; an older one is replaced).
        max_val_batches: Validation batches used for the float-vs-quantized report (null: all).
    """

    def __init__(self, output_dir: str = "outputs/quantized", max_val_batches: int | None = None) -> None:
        self.output_dir = output_dir
        self.max_val_batches = max_val_batches
        self.report: dict[str, float | str] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._base_loss = None
        if getattr(pl_module, "lora", None) is not None and not trainer.interrupted:
            # LoRA's B starts at zero, so the model now *is* the (fake-)quantized base: its loss is the
            # "before" of the report, what the adapters (and the merged model) are measured against.
            val = trainer.datamodule.val_dataloader() if trainer.datamodule else trainer.val_dataloaders
            if val is not None and not _resuming(trainer):
                with trainer.strategy.precision_plugin.forward_context():
                    self._base_loss = pl_module.evaluate_loss(val, self.max_val_batches)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.interrupted:
            return
        if getattr(pl_module, "lora", None) is not None:  # save adapters; merge + re-quantize (lit_qft.lora)
            t0 = getattr(self, "_t0", time.perf_counter())
            self.report = finish_lora_fit(trainer, pl_module, self.output_dir, self.max_val_batches, t0,
                                          base_loss=getattr(self, "_base_loss", None))
            return
        recipe = pl_module.recipe
        val = trainer.datamodule.val_dataloader() if trainer.datamodule else trainer.val_dataloaders
        report: dict[str, float | str] = {"recipe": type(recipe).__name__}
        # Perplexity means nothing for a classification loss: the summary shows it only where it applies.
        report["perplexity"] = bool(getattr(getattr(pl_module, "task", None), "perplexity", True))
        # Evaluate under the training precision (bf16-mixed autocasts here too): that is where
        # fake-quantized and converted models disagree most (see docs/quantization.md).
        precision = trainer.strategy.precision_plugin
        pl_module.model._compiled_call_impl = None  # evaluate eagerly: each model variant would recompile
        report["precision"] = str(trainer.precision)
        with precision.forward_context():
            if recipe.qat:
                Q.set_fake_quant(pl_module.model, True)  # also when the run ended inside the delay window
                report["qat_loss"] = pl_module.evaluate_loss(val, self.max_val_batches)
                reference = copy.deepcopy(pl_module.model)
                Q.set_fake_quant(pl_module.model, False)
            report["float_loss"] = pl_module.evaluate_loss(val, self.max_val_batches)
            report["float_bytes"] = Q.model_size_bytes(pl_module.model)
            if recipe.quantizes and not recipe.qat:
                reference = copy.deepcopy(pl_module.model)
            if recipe.quantizes:
                pl_module.convert()
                report["quantized_loss"] = pl_module.evaluate_loss(val, self.max_val_batches)
                report["sqnr_reference"] = "fake-quantized" if recipe.qat else "float"
                report["sqnr_db"] = self._logits_sqnr(pl_module, reference, val)
                report["loss_diff"] = report["quantized_loss"] - report["qat_loss" if recipe.qat else "float_loss"]
                del reference
        if recipe.quantizes:
            report["quantized_bytes"] = Q.model_size_bytes(pl_module.model)
            report["quantized_modules"] = len(Q.quantized_modules(pl_module.model))
            self._save(trainer, pl_module, report)
        report["fit_seconds"] = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        self.report = report
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"final/{k}": v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            )
        self._print(report)

    @torch.no_grad()
    def _logits_sqnr(self, pl_module, reference, dataloader) -> float:
        """SQNR (dB) of the converted model's logits against ``reference`` over the validation batches."""
        model = pl_module.model
        was_training = model.training
        model.eval()
        reference.eval()
        signal = noise = 0.0
        for i, batch in enumerate(dataloader):
            if self.max_val_batches is not None and i >= self.max_val_batches:
                break
            batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            s, n = Q.logits_sqnr_db(
                pl_module.task.forward(reference, batch).logits, pl_module.task.forward(model, batch).logits
            )
            signal, noise = signal + s, noise + n
        model.train(was_training)
        return Q.sqnr_db(signal, noise)

    @rank_zero_only
    def _save(self, trainer, pl_module, report) -> None:
        path = save_quantized(pl_module.model, pl_module.tokenizer, pl_module.recipe, self.output_dir)
        report["saved_to"] = str(Path(path).resolve())
        report["disk_bytes"] = folder_size_bytes(path)

    @rank_zero_only
    def _print(self, r: dict) -> None:
        mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731

        def ppl(loss: float) -> str:
            return f"  ppl {perplexity(loss):.2f}" if r.get("perplexity", True) else ""

        lines = [f"lit-qft summary ({r['recipe']}, fit {r['fit_seconds']:.0f} s)"]
        lines.append(f"  float model      val loss {r['float_loss']:.4f}{ppl(r['float_loss'])}  size {mib(r['float_bytes'])}")
        if "qat_loss" in r:
            lines.append(f"  fake-quantized   val loss {r['qat_loss']:.4f}{ppl(r['qat_loss'])}")
        if "quantized_loss" in r:
            lines.append(
                f"  quantized model  val loss {r['quantized_loss']:.4f}{ppl(r['quantized_loss'])}"
                f"  size {mib(r['quantized_bytes'])} ({r['quantized_bytes'] / r['float_bytes']:.0%} of float),"
                f" {r['quantized_modules']} layers quantized"
            )
            lines.append(
                f"  converted vs {r['sqnr_reference']}: logits SQNR {r['sqnr_db']:.1f} dB, "
                f"loss difference {r['loss_diff']:+.5f} ({r['precision']})"
            )
        if "saved_to" in r:
            lines.append(f"  saved to {r['saved_to']} ({mib(r['disk_bytes'])} on disk)")
            lines.append("  load it: from lit_qft import load_quantized; model, tok, _ = load_quantized(PATH)")
        print("\n".join(lines), flush=True)
