"""Accuracy: validation perplexity of float, PTQ and QAT-converted models, and how much of PTQ's loss QAT recovers.

All fine-tunes start from the same weights (pretrained SmolLM2-135M in full mode), see the same
batches in the same order for the same number of steps, and are evaluated on the same held-out
blocks. For every QAT recipe the matching PTQ model is the float fine-tune quantized to the QAT
recipe's own target config, so the recovered share compares like with like::

    recovered = (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_float)

(torchao/torchtune report 68 % on wikitext perplexity for Llama3-8B with int8 dyn act + int4 weights).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from benchmarks.inference import disk_bytes
from benchmarks.measure import recipe_name, release
from benchmarks.training import TrainSpec, _datamodule, lit_fit, trains_like_float
from lit_qft.module import perplexity as _ppl


def _evaluate(model, val_loader, device, max_batches: int) -> float:
    """Token-weighted mean loss, the same computation as ``LitCausalLM.evaluate_loss``, on any model."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(val_loader):
            if i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / max(count, 1)


def accuracy_benchmark(spec: TrainSpec, recipes: list, device: torch.device, precision: str,
                       val_batches: int, log=print, progress=None) -> dict[str, Any]:
    """Fine-tune float and every QAT recipe, quantize the float model with every PTQ target, compare perplexity.

    ``progress(out)`` is called after every row with the results so far (the runner saves them).
    """
    progress = progress or (lambda out: None)
    from lit_qft import quantization as Q
    from lit_qft.models import build_model

    dm = _datamodule(spec)
    val = dm.val_dataloader()
    evaluate = lambda m: _evaluate(m, val, device, val_batches)  # noqa: E731
    out: dict[str, Any] = {"model": spec.pretrained or f"{spec.architecture} {spec.config_overrides}",
                           "steps": spec.steps, "val_tokens": min(val_batches, len(val)) * spec.tokens_per_step,
                           "precision": precision, "rows": []}
    if spec.pretrained:
        base = build_model(spec.pretrained, vocab_size=None).to(device)
        out["pretrained_ppl"] = _ppl(evaluate(base))
        del base
    float_module, _ = lit_fit(spec, Q.NoQuantization(), dm, device, precision)
    float_model = float_module.model
    float_ppl = _ppl(evaluate(float_model))
    out["rows"].append({"recipe": "float (fine-tuned)", "kind": "float", "ppl": float_ppl})
    log(f"  accuracy float fine-tuned: ppl {float_ppl:.3f}")
    out["rows"][0].update(memory_bytes=Q.model_size_bytes(float_model), disk_bytes=disk_bytes(float_model, dm.tokenizer, None))
    progress(out)

    def ptq(recipe) -> tuple[float, dict[str, int]]:
        model = copy.deepcopy(float_model)
        if recipe.embedding_policy == "untie_head":
            Q.untie_output_head(model)
        Q.quantize_for_loading(model, recipe)  # the recipe's target config applied after training
        sizes = {"memory_bytes": Q.model_size_bytes(model), "disk_bytes": disk_bytes(model, dm.tokenizer, recipe)}
        return _ppl(evaluate(model)), sizes

    for recipe in recipes:
        name = recipe_name(recipe)
        if not recipe.quantizes:
            continue
        try:
            if trains_like_float(recipe):
                p, sizes = ptq(recipe)
                out["rows"].append({"recipe": name, "kind": "PTQ", "ppl": p, "degradation": p - float_ppl, **sizes})
                log(f"  accuracy {name}: ppl {p:.3f}")
                progress(out)
                continue
            ptq_ppl, _ = ptq(recipe)
            module, _ = lit_fit(spec, recipe, dm, device, precision)
            fake_ppl = _ppl(evaluate(module.model))
            module.convert()
            qat_ppl = _ppl(evaluate(module.model))
            gap = ptq_ppl - float_ppl
            row = {"recipe": name, "kind": "QAT", "ppl": qat_ppl, "fake_quant_ppl": fake_ppl,
                   "ptq_same_target_ppl": ptq_ppl, "degradation": qat_ppl - float_ppl,
                   "ptq_degradation": gap, "recovered": (ptq_ppl - qat_ppl) / gap if gap > 0 else None,
                   "memory_bytes": Q.model_size_bytes(module.model),
                   "disk_bytes": disk_bytes(module.model, dm.tokenizer, recipe)}
            out["rows"].append(row)
            log(f"  accuracy {name}: PTQ ppl {ptq_ppl:.3f} -> QAT ppl {qat_ppl:.3f} (fake-quant {fake_ppl:.3f}), "
                f"recovered {row['recovered'] if row['recovered'] is None else format(row['recovered'], '.0%')}")
            del module
        except Exception as e:  # one recipe failing must not sink the suite
            out["rows"].append({"recipe": name, "error": f"{type(e).__name__}: {e}"[:300]})
            log(f"  accuracy {name}: {type(e).__name__}: {e}")
        progress(out)
        release(device)
    return out
