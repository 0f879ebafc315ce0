"""Quantization recipes, and the only module of lit-qft that talks to torchao.

A recipe is a small config object selected by ``class_path`` in YAML (like torchao's own configs),
turned into torchao configs here and nowhere else::

    model:
      quantization:
        class_path: lit_qft.QAT8da4w
        init_args: {group_size: 32}

Two facts shape this module (see the README's "Quantization" section):

* GPT-2 is built from ``transformers.pytorch_utils.Conv1D`` (weight stored ``[in, out]``), which
  torchao's ``quantize_`` and QAT ``prepare`` silently skip. :func:`swap_conv1d` replaces every
  Conv1D by an exactly equivalent ``nn.Linear`` holding ``weight.T`` before anything else.
* ``lm_head`` is tied to the token embedding. Quantizing the head alone unties it and *adds* a
  quantized copy next to the float embedding, so the default policy keeps both in float.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import torch
from torch import nn
from torchao.quantization import (
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    PerAxis,
    PerGroup,
    quantize_,
)
from torchao.quantization.qat import QATConfig
from torchao.quantization.qat.linear import FakeQuantizedLinear, enable_linear_fake_quant
from torchao.utils import TorchAOBaseTensor
from transformers.pytorch_utils import Conv1D

EmbeddingPolicy = Literal["float", "untie_head"]


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """Base of all quantization recipes.

    Args:
        skip: Regular expressions on module names (``re.search``) kept in float, e.g.
            ``["h\\.0\\.", "h\\.11\\."]`` keeps the first and last GPT-2 block in float.
        embedding_policy: What happens to the tied ``lm_head``/token embedding. ``float`` keeps both
            in float and tied (smallest file when the head is tied); ``untie_head`` gives ``lm_head``
            its own copy and quantizes it (faster decode, larger file).
    """

    skip: list[str] = field(default_factory=list)
    embedding_policy: EmbeddingPolicy = "float"

    #: True for recipes that fake-quantize during training and convert at the end.
    qat: ClassVar[bool] = False

    def base_config(self):
        """The torchao config that produces the final quantized model (PTQ config / QAT convert target)."""
        raise NotImplementedError

    @property
    def quantizes(self) -> bool:
        return True

    def __post_init__(self) -> None:
        if self.embedding_policy not in ("float", "untie_head"):
            raise ValueError(
                f"embedding_policy={self.embedding_policy!r} is not valid; use 'float' or 'untie_head'"
            )
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"skip pattern {pattern!r} is not a valid regular expression: {e}") from None


@dataclass
class NoQuantization(Recipe):
    """Float baseline: no quantization at any point."""

    @property
    def quantizes(self) -> bool:
        return False

    def base_config(self):
        return None


@dataclass
class QAT8da4w(Recipe):
    """QAT with int8 dynamic per-token activations and int4 grouped symmetric weights (torchao's 8da4w).

    Args:
        group_size: Number of input features sharing one weight scale; must divide every quantized
            layer's input width (768 and 3072 for GPT-2 small: 32, 64, 128, 256 all work).
    """

    group_size: int = 32
    qat: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be a positive integer")

    def base_config(self):
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(self.group_size)
        )


@dataclass
class QATInt8WeightOnly(Recipe):
    """QAT toward int8 per-channel weight-only quantization (activations stay float).

    torchao's QAT rejects ``Int8WeightOnlyConfig``; ``IntxWeightOnlyConfig(int8, PerAxis(0))`` is
    the equivalent target that QAT accepts (prepare and convert agree exactly).
    """

    qat: ClassVar[bool] = True

    def base_config(self):
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


@dataclass
class PTQInt8WeightOnly(Recipe):
    """Post-training int8 weight-only quantization (``Int8WeightOnlyConfig``) of the fine-tuned model."""

    def base_config(self):
        return Int8WeightOnlyConfig()


@dataclass
class PTQInt8DynamicActivationInt8Weight(Recipe):
    """Post-training int8 dynamic activation + int8 weight quantization."""

    def base_config(self):
        return Int8DynamicActivationInt8WeightConfig()


# --------------------------------------------------------------------------------------------
# Model surgery
# --------------------------------------------------------------------------------------------
def swap_conv1d(model: nn.Module) -> int:
    """Replace every HF ``Conv1D`` by an exactly equivalent ``nn.Linear``; return how many were swapped.

    ``Conv1D`` computes ``x @ W + b`` with ``W`` of shape ``[in, out]``; ``nn.Linear`` computes
    ``x @ W.T + b`` with ``W`` of shape ``[out, in]``, so the new weight is ``W.T`` (made contiguous).
    Idempotent: a model without Conv1D is left untouched.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                in_features, out_features = child.weight.shape
                linear = nn.Linear(
                    in_features, out_features, bias=child.bias is not None,
                    device=child.weight.device, dtype=child.weight.dtype,
                )
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                linear.weight.requires_grad_(child.weight.requires_grad)
                setattr(parent, name, linear)
                swapped += 1
    return swapped


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def untie_output_head(model: nn.Module) -> bool:
    """Give ``lm_head`` its own copy of the tied embedding weight; return True if it was tied."""
    head = _output_head(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or emb is None or head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        # transformers 5 re-ties from this mapping in post_init()/tie_weights()
        if hasattr(model, "_tied_weights_keys") and isinstance(model._tied_weights_keys, dict):
            model._tied_weights_keys = {}
    return True


def _target_filter(model: nn.Module, recipe: Recipe) -> Callable[[nn.Module, str], bool]:
    """The ``filter_fn`` for ``quantize_``: linear layers, minus skipped names, minus a tied head."""
    head = _output_head(model)
    patterns = [re.compile(p) for p in recipe.skip]

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if module is head and recipe.embedding_policy == "float":
            return False
        return not any(p.search(fqn) for p in patterns)

    return keep


def prepare(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Make ``model`` ready to train under ``recipe``: swap Conv1D, apply the head policy, fake-quantize (QAT).

    Safe to call once per model; PTQ and float recipes only do the Conv1D swap and head policy here.
    """
    swap_conv1d(model)
    if recipe.quantizes and recipe.embedding_policy == "untie_head":
        untie_output_head(model)
    if recipe.qat:
        quantize_(model, QATConfig(recipe.base_config(), step="prepare"), filter_fn=_target_filter(model, recipe))
    return model


def convert(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Turn a prepared (QAT) or fine-tuned float (PTQ) model into a really quantized model, in place."""
    if not recipe.quantizes:
        return model
    if recipe.qat:
        set_fake_quant(model, True)
        quantize_(
            model, QATConfig(recipe.base_config(), step="convert"),
            filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear),
        )
    else:
        quantize_(model, recipe.base_config(), filter_fn=_target_filter(model, recipe))
    return model


def quantize_for_loading(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Give a freshly built float model the structure of a converted one, so its state_dict loads.

    The values are overwritten by ``load_state_dict(..., assign=True)`` afterwards, so QAT recipes
    can use their base (PTQ) config directly: convert produces the same tensor types.
    """
    swap_conv1d(model)
    if recipe.quantizes:
        quantize_(model, recipe.base_config(), filter_fn=_target_filter(model, recipe))
    return model


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization of every QAT linear on or off (weights are untouched)."""
    for m in model.modules():
        enable_linear_fake_quant(m, enabled)


# --------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------
def fake_quantized_modules(model: nn.Module) -> list[str]:
    """Names of the modules that fake-quantize their weights during training."""
    return [
        n for n, m in model.named_modules()
        if isinstance(m, FakeQuantizedLinear) and m.weight_fake_quantizer is not None
    ]


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is a torchao quantized tensor."""
    return [
        n for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), TorchAOBaseTensor)
    ]


def _inner_tensors(t: torch.Tensor):
    if isinstance(t, TorchAOBaseTensor) or hasattr(t, "__tensor_flatten__"):
        for attr in t.__tensor_flatten__()[0]:
            yield from _inner_tensors(getattr(t, attr))
    else:
        yield t


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers in memory, counting shared storage (tied weights) once.

    ``torchao.utils.get_model_size_in_bytes`` counts a tied embedding twice; here each underlying
    storage is counted once, looking inside torchao tensor subclasses (int data + scales + zeros).
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        for inner in _inner_tensors(t):
            key = (inner.untyped_storage().data_ptr(), inner.untyped_storage().nbytes())
            if key in seen:
                continue
            seen.add(key)
            total += inner.untyped_storage().nbytes()
    return total
