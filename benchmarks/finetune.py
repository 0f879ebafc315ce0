"""Fine-tuning toward a quantized model: full fine-tuning, full QAT, and LoRA over quantized bases.

The variants are :func:`lit_qft.lora.fine_tuning_variants` (the same ``LitCausalLM`` arguments a
user puts in YAML): ``full-ft`` (every weight trained in float, int8 weight-only after), ``full-qat``
(every weight trained under 8da4w fake quantization, converted after), ``int8-lora`` / ``nf4-lora``
(rank-8 adapters over a frozen int8 / NF4 base) and ``qat-lora`` (adapters over a frozen
fake-quantized 8da4w base, merged and converted after). Each runs as a fresh ``lit-qft fit`` process
from the same pretrained weights, on the same batches, so its peak RSS is that variant's training
memory; the end-of-fit report gives the accuracy of what each variant produces:

* before: the starting model (pretrained float, or the quantized base the adapters train over);
* trained: the model as trained (float / fake-quantized / base + adapters);
* final: the deployable quantized model (PTQ of the float fine-tune / QAT convert / adapters merged
  into the base and re-quantized).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from benchmarks.training import TrainSpec, cli_fit
from lit_qft.module import perplexity


def _ppl(loss: float | None) -> float | None:
    return perplexity(loss) if loss is not None else None


def _losses(export: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """(before, trained, final) losses from a QuantizedExport report, for any variant."""
    if "adapter_loss" in export:  # LoRA
        return export.get("base_loss"), export["adapter_loss"], export.get("merged_loss")
    trained = export.get("qat_loss", export.get("float_loss"))
    return None, trained, export.get("quantized_loss")


def finetune_benchmark(spec: TrainSpec, device: torch.device, precision: str, val_batches: int,
                       rank: int = 8, log=print, progress=None, only: list[str] | None = None,
                       earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit every fine-tuning variant in its own process; memory, speed and before/trained/final accuracy.

    ``only`` names the variants to (re)run; the other rows are kept from ``earlier`` (the section of
    the result file being resumed), in suite order. ``progress(out)`` is called after every variant
    with the results so far (the runner saves them).
    """
    from lit_qft.lora import fine_tuning_variants

    progress = progress or (lambda out: None)
    variants = fine_tuning_variants(rank=rank)
    unknown = sorted(set(only or []) - set(variants))
    if unknown:
        raise ValueError(f"--finetune-variants: unknown {unknown}; choose from {','.join(variants)}")
    kept = {r["variant"]: r for r in (earlier or {}).get("rows", []) if only and r.get("variant") not in only}

    out: dict[str, Any] = {"model": spec.pretrained or f"{spec.architecture} {spec.config_overrides}",
                           "steps": spec.warmup_steps + spec.steps, "tokens_per_step": spec.tokens_per_step,
                           "val_tokens": val_batches * spec.tokens_per_step, "precision": precision,
                           "lora_rank": rank, "rows": []}
    if spec.pretrained:  # "before" of the full fine-tunes: the pretrained float model, same validation blocks
        from benchmarks.accuracy import _evaluate
        from benchmarks.training import _datamodule
        from lit_qft.models import build_model

        base = build_model(spec.pretrained, vocab_size=None).to(device)
        out["pretrained_loss"] = _evaluate(base, _datamodule(spec).val_dataloader(), device, val_batches)
        out["pretrained_ppl"] = _ppl(out["pretrained_loss"])
        del base
    for name, v in variants.items():
        if name in kept:  # not rerun: the earlier measurement stays
            out["rows"].append(kept[name])
            continue
        res = cli_fit(dataclasses.replace(spec, lr=v["lr"]), device, precision, recipe=v["quantization"],
                      lora=v["lora"], export_val_batches=val_batches, timeout=3600)
        row: dict[str, Any] = {"variant": name, "recipe": type(v["quantization"]).__name__, "lora": v["lora"] is not None,
                               "lr": v["lr"]}
        if "error" in res:
            row.update(error=res["error"], log_tail=res.get("log_tail", "")[-1500:])
            log(f"  finetune {name}: {res['error']}\n{res.get('log_tail', '')[-800:]}")
            out["rows"].append(row)
            progress(out)
            continue
        export = res.get("export", {})
        before, trained, final = _losses(export)
        before = out.get("pretrained_loss") if before is None and v["lora"] is None else before
        row.update({
            "trainable_params": res.get("trainable_params"), "peak_rss_bytes": res.get("peak_rss_bytes"),
            "allocator_peak_bytes": res.get("allocator_peak_bytes"), "step_seconds": res.get("step_seconds"),
            "tokens_per_second": res.get("tokens_per_second"),
            "before_loss": before, "trained_loss": trained, "final_loss": final,
            "before_ppl": _ppl(before), "trained_ppl": _ppl(trained), "final_ppl": _ppl(final),
            "final_bytes": export.get("merged_bytes", export.get("quantized_bytes")),
            "merged_through_float_layers": export.get("merged_through_float_layers"),
            "adapter_bytes": export.get("adapter_disk_bytes"), "export": export,
        })
        out["rows"].append(row)
        log(f"  finetune {name}: trainable {row['trainable_params']:,}, peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB, "
            f"{row['tokens_per_second']:.0f} tok/s, ppl trained {row['trained_ppl']:.3f} -> final {row['final_ppl']:.3f}")
        progress(out)
    return out
