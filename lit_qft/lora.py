"""LoRA adapters over a frozen quantized base (QLoRA-style), and QAT + LoRA, built on ``peft``.

The model's quantization recipe says what the frozen base is; ``--model.lora`` adds the adapters::

    model:
      pretrained: smollm2-135m
      quantization: lit_qft.PTQInt8WeightOnly     # base: torchao int8 weight-only, frozen
      lora: {rank: 8, alpha: 16, dropout: 0.05}   # trained: low-rank adapters on every linear layer

* PTQ recipes (``PTQInt8WeightOnly``, ``PTQNF4WeightOnly``, ``PTQIntxWeightOnly``...): the base is
  quantized *before* training, frozen, and stays bit-identical; only the adapters learn. At the
  end the pretrained float weights are reloaded and the adapters merged into them before
  re-quantizing (:func:`float_base_weights`): merged onto the dequantized grid, most small updates
  would round away.
* QAT recipes: the base is fake-quantized and frozen; at the end the adapters are merged into the
  float weights and the result is converted (merge, then quantize).
* ``NoQuantization``: plain LoRA on a float base.

At the end of fit the adapters alone are saved (peft format, reloadable onto a freshly quantized base
with :func:`load_adapters`), and with ``merge: true`` they are merged into the base, re-quantized and
saved as a normal lit-qft quantized folder (:func:`lit_qft.load_quantized`), both evaluated.

Why peft: it trains LoRA over torchao tensors as they are (``TorchaoLoraLinear`` for int8/intx
weights, its plain ``Linear`` LoRA for NF4 and fake-quantized layers) and saves/loads adapters in the
standard format. Merging is done here, per layer, because peft cannot merge into NF4 weights
(``aten.add_`` is not implemented for ``NF4Tensor``) and merges into torchao weights only when the
model was loaded through ``transformers.TorchAoConfig`` (which quantizes nothing in GPT-2's blocks).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from lit_qft import quantization as Q
from lit_qft.assets.cache import atomic_dir
from lit_qft.export import RECIPE_FILE, folder_size_bytes, recipe_from_dict, recipe_to_dict, save_quantized
from lit_qft.models import build_model

LORA_FILE = "lit_qft_lora.json"
ADAPTER_CONFIG = "adapter_config.json"

# peft warns that TorchaoLoraLinear cannot merge without transformers' TorchAoConfig; we merge ourselves.
_PEFT_MERGE_WARNING = ".*without `get_apply_tensor_subclass`.*"


@dataclass
class LoraSettings:
    """Low-rank adapters trained over the frozen base (``--model.lora.rank=16`` etc.).

    Args:
        rank: Rank ``r`` of each adapter (``W + B @ A`` with ``A: r x in``, ``B: out x r``).
        alpha: Scale numerator: the adapter output is multiplied by ``alpha / rank``.
        dropout: Dropout on the adapter input during training (0 disables it).
        target_modules: Layers that get adapters: ``all-linear`` (every linear layer but the output
            head), a list of name suffixes (``[q_proj, v_proj]``; GPT-2: ``c_attn``, ``c_proj``,
            ``c_fc``), or a regular expression matched against full module names.
        modules_to_save: Modules trained in full next to the adapters (a classification ``score``
            head is added automatically).
        merge: At the end of fit also merge the adapters into the base, re-quantize it with the
            recipe and save it to ``--export.output_dir`` (loads with ``lit_qft.load_quantized``).
        adapter_dir: Where the adapters alone are saved; default: ``adapter`` next to ``--export.output_dir``.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    merge: bool = True
    adapter_dir: str | None = None

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"--model.lora.rank={self.rank} must be a positive integer")
        if self.alpha <= 0:
            raise ValueError(f"--model.lora.alpha={self.alpha} must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--model.lora.dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("--model.lora.target_modules is empty; use all-linear or a list of layer names")

    def peft_config(self, model: nn.Module) -> LoraConfig:
        """The ``peft.LoraConfig`` for ``model`` (adds a classification ``score`` head to ``modules_to_save``)."""
        to_save = list(self.modules_to_save or [])
        if isinstance(getattr(model, "score", None), nn.Linear) and "score" not in to_save:
            to_save.append("score")
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=self.target_modules, modules_to_save=to_save or None, bias="none",
        )


# --------------------------------------------------------------------------------------------
# Building: frozen (quantized) base + adapters
# --------------------------------------------------------------------------------------------
def prepare_base(model: nn.Module, recipe: Q.Recipe, prepared: bool = False) -> nn.Module:
    """Make ``model`` the frozen base for adapters: prepare for ``recipe``, quantize now (PTQ), freeze.

    Args:
        model: A freshly built Hugging Face model.
        recipe: PTQ recipes quantize the base here; QAT recipes fake-quantize it; ``NoQuantization``
            leaves it in float.
        prepared: ``model`` already went through :func:`lit_qft.quantization.prepare`.
    """
    if not prepared:  # prepare (and convert) check that every target layer fits the recipe (NF4 blocks)
        Q.prepare(model, recipe)
    if recipe.quantizes and not recipe.qat:
        Q.convert(model, recipe)  # the base is quantized before training, not after it
    model.requires_grad_(False)
    return model


def add_lora(model: nn.Module, recipe: Q.Recipe, settings: LoraSettings, prepared: bool = True) -> PeftModel:
    """Quantize and freeze ``model``'s base as ``recipe`` says, then wrap it with trainable LoRA adapters.

    Only the adapter weights (and ``modules_to_save``) require gradients afterwards.
    """
    prepare_base(model, recipe, prepared=prepared)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_MERGE_WARNING)
        try:
            return get_peft_model(model, settings.peft_config(model))
        except (ValueError, TypeError) as e:
            raise ValueError(f"--model.lora: peft cannot add adapters to this model: {e}") from None


def load_adapters(folder: str | Path, model: nn.Module | None = None, trainable: bool = False) -> PeftModel:
    """Load adapters saved at the end of fit onto a freshly prepared (quantized, frozen) base.

    Args:
        folder: The adapter folder (``adapter_config.json``, ``adapter_model.safetensors``, ``lit_qft_*.json``).
        model: A fresh float base model. Optional when the adapters were trained on a built-in or
            hub model (``--model.pretrained``): it is rebuilt from the name saved in the folder.
        trainable: Keep training the adapters (``False`` loads them for inference).
    """
    folder = Path(folder)
    for name in (ADAPTER_CONFIG, RECIPE_FILE, LORA_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a lit-qft adapter folder: {name} is missing")
    recipe = recipe_from_dict(json.loads((folder / RECIPE_FILE).read_text()))
    if model is None:
        base = json.loads((folder / LORA_FILE).read_text())["base"]
        if not base.get("pretrained"):
            raise ValueError(
                f"{folder}: the adapters were trained on a model built from scratch; pass that model as model=..."
            )
        model = build_model(base["pretrained"], trust_remote_code=base.get("trust_remote_code", False))
    prepare_base(model, recipe)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_MERGE_WARNING)
        return PeftModel.from_pretrained(model, folder, is_trainable=trainable)


# --------------------------------------------------------------------------------------------
# End of training: save adapters, merge then (re-)quantize
# --------------------------------------------------------------------------------------------
def save_adapters(model: PeftModel, folder: str | Path, recipe: Q.Recipe, base: dict[str, Any] | None = None) -> Path:
    """Write the adapters alone (peft ``save_pretrained``: safetensors + config) atomically.

    ``base`` (e.g. ``{"pretrained": "smollm2-135m"}``) and the recipe are stored next to them so
    :func:`load_adapters` can rebuild and quantize the same base.
    """
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe_to_dict(recipe), indent=2))
        (tmp / LORA_FILE).write_text(json.dumps({"base": base or {}}, indent=2))
    return folder


#: peft's prefix in front of the wrapped model's module names
_PEFT_PREFIX = "base_model.model."


@torch.no_grad()
def float_base_weights(model: PeftModel, reference: nn.Module, max_rel_error: float = 0.5) -> dict[str, torch.Tensor]:
    """The float weights a PTQ base was quantized from, for each adapted quantized layer of ``model``.

    ``reference`` is the base rebuilt in float (the same pretrained weights, through the same
    ``prepare``, so the same module names and layout). A layer's float weight is taken only when the
    quantized base dequantizes to within ``max_rel_error`` (relative Frobenius norm; int8 is ~0.005,
    4-bit ~0.1, unrelated weights ~1.4) of it: a layer whose base came from elsewhere (e.g.
    re-initialized) is left out and merges through its dequantized weight.
    """
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not Q.is_quantized_weight(module.get_base_layer().weight):
            continue
        try:
            ref = reference.get_submodule(name.removeprefix(_PEFT_PREFIX)).weight
        except AttributeError:
            continue
        deq = Q.dequantize_weight(module.get_base_layer().weight)
        if ref.shape == deq.shape and (deq - ref.to(deq)).norm() <= max_rel_error * ref.norm():
            out[name] = ref.detach().to(torch.float32)
    return out


@torch.no_grad()
def merge_and_quantize(model: PeftModel, recipe: Q.Recipe,
                       float_weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Merge the active adapters into the base and return the plain (re-)quantized model.

    Per adapted layer: ``W' = W + (alpha / r) * B @ A``, then ``W'`` is quantized again in the layer's
    format (int8, intx, NF4; float and fake-quantized layers are just updated). ``W`` is the layer's
    float weight from ``float_weights`` (:func:`float_base_weights`) when given, else its
    dequantized base. The float weight matters: a dequantized PTQ weight sits exactly on the
    quantization grid, so every update smaller than half a step rounds back to the same value
    (merging SmolLM2-135M's int8 adapters that way kept 34 % of their gain, NF4's 4 %); float
    weights sit between grid points, so updates move values across rounding boundaries in
    proportion to their size, as when a QAT base merges. For QAT recipes the merged float model is
    then converted, so the result is what ``convert`` would give for a fully fine-tuned model.
    """
    float_weights = float_weights or {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if not adapters:
            continue
        base = module.get_base_layer()
        delta = sum(module.get_delta_weight(a) for a in adapters)
        if name in float_weights:
            start = float_weights[name].to(device=delta.device, dtype=delta.dtype)
        else:
            start = Q.dequantize_weight(base.weight, delta.dtype)
        merged = start + delta
        if Q.is_quantized_weight(base.weight):
            Q.requantize_linear(base, merged, recipe)
        else:
            base.weight.copy_(merged.to(base.weight.dtype))
    plain = model.unload()  # drops the LoRA wrappers and keeps the (now merged) base layers
    if recipe.qat:
        Q.convert(plain, recipe)
    return plain


def adapter_bytes(model: nn.Module) -> int:
    """Bytes of the trainable adapter weights."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def default_adapter_dir(settings: LoraSettings, output_dir: str | Path) -> Path:
    return Path(settings.adapter_dir) if settings.adapter_dir else Path(output_dir).parent / "adapter"


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def finish_fit(trainer, pl_module, output_dir: str | Path, max_val_batches: int | None, started: float,
               base_loss: float | None = None) -> dict:
    """The end-of-fit LoRA report (called by :class:`lit_qft.QuantizedExport`): save and evaluate.

    Evaluates the adapters on the (fake-)quantized base as trained, saves the adapters, and with
    ``merge`` merges + re-quantizes, evaluates and saves the merged model. ``base_loss`` is the
    base's loss before training (measured at fit start), reported next to both. Returns the report.
    """
    with trainer.strategy.precision_plugin.forward_context():  # evaluate in the training precision
        return _finish_fit(trainer, pl_module, output_dir, max_val_batches, started, base_loss)


def _finish_fit(trainer, pl_module, output_dir, max_val_batches, started, base_loss=None) -> dict:
    settings, recipe = pl_module.lora, pl_module.recipe
    val = trainer.datamodule.val_dataloader() if trainer.datamodule else trainer.val_dataloaders
    pl_module.model._compiled_call_impl = None  # evaluate eagerly (merging replaces layers anyway)
    trainable = sum(p.numel() for p in pl_module.model.parameters() if p.requires_grad)
    report: dict[str, Any] = {
        "recipe": type(recipe).__name__, "qat": recipe.qat, "lora_rank": settings.rank, "trainable_params": trainable,
        "adapter_loss": pl_module.evaluate_loss(val, max_val_batches),
        **({"base_loss": base_loss} if base_loss is not None else {}),
        "adapter_bytes": adapter_bytes(pl_module.model),
    }
    hp = pl_module.hparams
    base = {"pretrained": hp.get("pretrained"), "architecture": hp.get("architecture"),
            "config_overrides": hp.get("config_overrides"), "trust_remote_code": hp.get("trust_remote_code", False),
            "lora": asdict(settings)}
    adapter_dir = default_adapter_dir(settings, output_dir)
    if trainer.is_global_zero:
        save_adapters(pl_module.model, adapter_dir, recipe, base)
        report["adapter_dir"] = str(adapter_dir.resolve())
        report["adapter_disk_bytes"] = folder_size_bytes(adapter_dir)
    if settings.merge:
        pl_module.convert()
        report["merged_loss"] = pl_module.evaluate_loss(val, max_val_batches)
        report["merged_through_float_layers"] = getattr(pl_module, "merged_through_float", 0)
        report["merged_bytes"] = Q.model_size_bytes(pl_module.model)
        report["quantized_modules"] = len(Q.quantized_modules(pl_module.model))
        if recipe.quantizes and trainer.is_global_zero:
            path = save_quantized(pl_module.model, pl_module.tokenizer, recipe, output_dir)
            report["saved_to"] = str(Path(path).resolve())
            report["disk_bytes"] = folder_size_bytes(path)
    report["fit_seconds"] = time.perf_counter() - started
    for logger in trainer.loggers:
        logger.log_metrics({f"final/{k}": v for k, v in report.items() if isinstance(v, (int, float))})
    if trainer.is_global_zero:
        print(summary(report), flush=True)
    return report


def summary(r: dict) -> str:
    """Human-readable lines for a :func:`finish_fit` report."""
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    base = "fake-quantized" if r.get("qat") else "frozen"
    lines = [f"lit-qft LoRA summary ({r['recipe']} base, rank {r['lora_rank']}, fit {r['fit_seconds']:.0f} s)"]
    lines.append(f"  trainable parameters {r['trainable_params']:,} ({mib(r['adapter_bytes'])})")

    def loss_line(label: str, loss: float) -> str:
        return f"  {label:<32}val loss {loss:.4f}  ppl {_ppl(loss):.2f}"

    if "base_loss" in r:
        lines.append(loss_line(f"{base} base before training", r["base_loss"]))
    lines.append(loss_line(f"adapters on the {base} base", r["adapter_loss"]))
    if "adapter_dir" in r:
        lines.append(f"    adapters saved to {r['adapter_dir']} ({mib(r['adapter_disk_bytes'])}); lit_qft.load_adapters(PATH)")
    if "merged_loss" in r:
        size = f"  size {mib(r['merged_bytes'])}, {r['quantized_modules']} layers quantized"
        lines.append(loss_line("merged + re-quantized model", r["merged_loss"]) + size)
        if r.get("merged_through_float_layers"):
            lines.append(f"    merged into the pretrained float weights ({r['merged_through_float_layers']} layers), "
                         "then quantized")
    if "saved_to" in r:
        lines.append(f"    saved to {r['saved_to']} ({mib(r['disk_bytes'])}); lit_qft.load_quantized(PATH)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The comparison the benchmark runs
# --------------------------------------------------------------------------------------------
def fine_tuning_variants(rank: int = 8, group_size: int = 32) -> dict[str, dict[str, Any]]:
    """The four ways of fine-tuning toward a quantized model that benchmarks compare side by side.

    Each value holds ``LitCausalLM`` keyword arguments (``quantization``, ``lora``) and a typical
    learning rate (``lr``: adapters take a larger one than full fine-tuning)::

        for name, v in fine_tuning_variants().items():
            module = LitCausalLM(pretrained="smollm2-135m", tokenizer="smollm2",
                                 quantization=v["quantization"], lora=v["lora"],
                                 optimizer=lambda p, lr=v["lr"]: torch.optim.AdamW(p, lr=lr))

    ``full-ft`` trains every weight in float and quantizes after (int8 weight-only); ``full-qat``
    fake-quantizes every weight toward 8da4w while training all of them; ``int8-lora`` /
    ``nf4-lora`` train adapters over a frozen int8 / NF4 base; ``qat-lora`` trains adapters over a
    frozen fake-quantized 8da4w base. Peak memory and trainable parameters are in
    :class:`lit_qft.memory.TrainingMemory`'s ``report``.
    """
    lora = LoraSettings(rank=rank, alpha=2.0 * rank, dropout=0.05)
    return {
        "full-ft": {"quantization": Q.PTQInt8WeightOnly(), "lora": None, "lr": 2e-5},
        "full-qat": {"quantization": Q.QAT8da4w(group_size=group_size), "lora": None, "lr": 2e-5},
        "int8-lora": {"quantization": Q.PTQInt8WeightOnly(), "lora": lora, "lr": 5e-4},
        "nf4-lora": {"quantization": Q.PTQNF4WeightOnly(), "lora": lora, "lr": 5e-4},
        "qat-lora": {"quantization": Q.QAT8da4w(group_size=group_size), "lora": lora, "lr": 5e-4},
    }
