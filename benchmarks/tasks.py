"""Task metrics: sentiment accuracy / F1 and translation BLEU / chrF of float, PTQ and QAT-converted models.

For each task one float fine-tune and one QAT fine-tune (the same weights, batches and steps), then:

* float: the float fine-tune;
* PTQ: the float fine-tune quantized after training with each PTQ recipe, and with the QAT recipe's
  own target (``ptq_same_target``: what QAT is compared against);
* QAT: the QAT fine-tune while fake-quantized (``trained``) and after convert (the deployable model).

Metrics come from ``LitCausalLM``'s own validation (``trainer.validate``: the ``val/acc``,
``val/f1``, ``val/bleu``, ``val/chrf`` a user sees), on the same validation batches for every model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from benchmarks.measure import recipe_name, release
from benchmarks.training import _optimizer_factory

#: Which logged metrics each task reports (higher is better for all of them).
TASK_METRICS = {"sentiment": ("acc", "f1"), "translation": ("bleu", "chrf")}


@dataclass
class TaskSpec:
    """One task workload: model, data module arguments, steps and validation size."""

    task: str  # "sentiment" or "translation"
    data: dict[str, Any]
    pretrained: str | None = None
    architecture: str = "gpt2"
    config_overrides: dict[str, Any] | None = None
    steps: int = 30
    lr: float = 5e-5
    val_batches: int = 8
    seed: int = 0
    extra_model: dict[str, Any] = field(default_factory=dict)


def _datamodule(spec: TaskSpec):
    from lit_qft.data import SentimentDataModule, TranslationDataModule

    cls = {"sentiment": SentimentDataModule, "translation": TranslationDataModule}[spec.task]
    dm = cls(**spec.data)
    dm.setup("fit")
    return dm


def _module(spec: TaskSpec, recipe, dm):
    from lit_qft import LitCausalLM

    return LitCausalLM(
        pretrained=spec.pretrained, architecture=spec.architecture, config_overrides=spec.config_overrides,
        tokenizer=spec.data["tokenizer"], quantization=recipe, warmup=0.1, task=dm.task,
        optimizer=_optimizer_factory("torch.optim.AdamW", spec.lr, 0.0), **spec.extra_model,
    )


def _trainer(device: torch.device, precision: str, **kw) -> L.Trainer:
    return L.Trainer(accelerator=device.type, devices=1, precision=precision, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def _fit(spec: TaskSpec, recipe, dm, device, precision):
    L.seed_everything(spec.seed, verbose=False)
    module = _module(spec, recipe, dm)
    _trainer(device, precision, max_steps=spec.steps, limit_val_batches=0, gradient_clip_val=1.0).fit(module, datamodule=dm)
    return module


def _validate(module, dm, spec: TaskSpec, device, precision) -> dict[str, float]:
    module.task_metrics = module.task.metrics()  # fresh metric state for every model
    out = _trainer(device, precision, limit_val_batches=spec.val_batches).validate(module, datamodule=dm, verbose=False)[0]
    names = ("loss", *TASK_METRICS[spec.task])
    return {k: float(out[f"val/{k}"]) for k in names if f"val/{k}" in out}


def _quantized_copy(float_module, spec: TaskSpec, recipe, dm):
    """The float fine-tune quantized after training with ``recipe``'s target (the export's own ``convert``)."""
    from lit_qft import quantization as Q

    module = _module(spec, recipe, dm)
    module.model = copy.deepcopy(float_module.model)
    module.recipe = module.task.adapt_recipe(recipe)  # e.g. a classification head stays float
    if module.recipe.embedding_policy == "untie_head":
        Q.untie_output_head(module.model)
    Q.quantize_for_loading(module.model, module.recipe)
    module.converted = True
    return module


def task_benchmark(specs: list[TaskSpec], qat_recipe, ptq_recipes: list, device: torch.device, precision: str,
                   log=print, progress=None) -> list[dict[str, Any]]:
    """Float, PTQ and QAT task metrics for every task in ``specs``.

    ``progress(out)`` is called after every row with the results so far (the runner saves them).
    """
    from lit_qft import quantization as Q

    out: list[dict[str, Any]] = []
    progress = progress or (lambda out: None)
    for spec in specs:
        dm = _datamodule(spec)
        res: dict[str, Any] = {"task": spec.task, "model": spec.pretrained or f"{spec.architecture} {spec.config_overrides}",
                               "steps": spec.steps, "val_examples": spec.val_batches * spec.data.get("batch_size", 16),
                               "metrics": list(TASK_METRICS[spec.task]), "rows": []}
        out.append(res)

        def row(name: str, kind: str, module) -> None:
            try:
                m = _validate(module, dm, spec, device, precision)
                res["rows"].append({"model": name, "kind": kind, **m, "memory_bytes": Q.model_size_bytes(module.model)})
                log(f"  task {spec.task} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
            except Exception as e:  # one model failing must not sink the suite
                res["rows"].append({"model": name, "kind": kind, "error": f"{type(e).__name__}: {e}"[:300]})
                log(f"  task {spec.task} {name}: {type(e).__name__}: {e}")
            progress(out)

        if spec.pretrained:
            row("pretrained (no fine-tuning)", "pretrained", _pretrained(spec, dm))
        float_module = _fit(spec, Q.NoQuantization(), dm, device, precision)
        row("float (fine-tuned)", "float", float_module)
        for recipe in ptq_recipes:
            row(recipe_name(recipe), "PTQ", _quantized_copy(float_module, spec, recipe, dm))
            release(device)
        row(f"PTQ with {recipe_name(qat_recipe)}'s target", "PTQ same target",
            _quantized_copy(float_module, spec, qat_recipe, dm))
        del float_module
        release(device)
        qat_module = _fit(spec, qat_recipe, dm, device, precision)
        row(f"{recipe_name(qat_recipe)} fake-quantized", "QAT trained", qat_module)
        qat_module.convert()
        row(f"{recipe_name(qat_recipe)} converted", "QAT", qat_module)
        del qat_module
        release(device)
    return out


def _pretrained(spec: TaskSpec, dm):
    """The pretrained model as the task builds it (a new classification head is random), not fine-tuned."""
    from lit_qft import quantization as Q

    L.seed_everything(spec.seed, verbose=False)
    module = _module(spec, Q.NoQuantization(), dm)
    module.configure_model()
    return module
