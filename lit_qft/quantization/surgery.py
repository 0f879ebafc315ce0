"""Model surgery: Conv1D -> Linear, the head policy, prepare / convert / load structure, fake-quant switch.

Everything that changes a model's modules or weights for a recipe lives here; the recipes only
describe what to do (:mod:`lit_qft.quantization.recipes`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchao.quantization import NF4Tensor, quantize_, to_nf4
from torchao.quantization.qat import QATConfig, initialize_fake_quantizers
from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs
from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase
from torchao.quantization.qat.linear import FakeQuantizedLinear
from torchao.utils import TorchAOBaseTensor
from transformers.pytorch_utils import Conv1D

from lit_qft.checks import check_group_size
from lit_qft.quantization.recipes import Recipe, _embedding_config
from lit_qft.quantization.targets import (
    _head_is_tied,
    _input_embedding,
    _is_module,
    _output_head,
    _target_filter,
)


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


def untie_output_head(model: nn.Module) -> bool:
    """Give ``lm_head`` its own copy of the tied embedding weight; return True if it was tied."""
    if not _head_is_tied(model):
        return False
    head, emb = _output_head(model), _input_embedding(model)
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        # transformers 5 re-ties from this mapping in post_init()/tie_weights()
        if hasattr(model, "_tied_weights_keys") and isinstance(model._tied_weights_keys, dict):
            model._tied_weights_keys = {}
    return True


def _retie_head(model: nn.Module) -> None:
    """Point a (formerly fake-quantized) tied head back at the embedding's (now quantized) weight."""
    head, emb = _output_head(model), _input_embedding(model)
    if isinstance(head, FakeQuantizedLinear):
        head = head.to_linear()
        model.set_output_embeddings(head)
    head.weight = emb.weight


def prepare(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Make ``model`` ready to train under ``recipe``: swap Conv1D, apply the head policy, fake-quantize (QAT).

    Safe to call once per model; PTQ and float recipes only do the Conv1D swap and head policy here.
    Raises ``ValueError`` here (before any training) when the recipe cannot run on this machine.
    """
    recipe.check_supported()
    swap_conv1d(model)
    if recipe.quantizes and recipe.embedding_policy == "untie_head":
        untie_output_head(model)
    if recipe.quantizes:  # up front, also for PTQ (converted only after the whole run)
        check_group_size(model, recipe, _target_filter(model, recipe))
        recipe.check_model(model)
    if not recipe.qat:
        return model
    act_config, weight_config = _infer_fake_quantize_configs(recipe.base_config())
    if recipe.range_learning:
        weight_config = dataclasses.replace(weight_config, is_dynamic=False, range_learning=True)
    targets = _target_filter(model, recipe)
    shared = recipe.embedding_policy == "quantize_embedding"
    tied = _head_is_tied(model)
    quantize_(model, QATConfig(activation_config=act_config, weight_config=weight_config, step="prepare"), filter_fn=targets)
    if shared:
        emb_weight_config = _infer_fake_quantize_configs(_embedding_config())[1]
        quantize_(model, QATConfig(weight_config=emb_weight_config, step="prepare"), filter_fn=_is_module(_input_embedding(model)))
        if tied:  # the head sees exactly what the converted model will compute with the shared int8 table
            quantize_(model, QATConfig(weight_config=emb_weight_config, step="prepare"), filter_fn=_is_module(_output_head(model)))
    if recipe.range_learning:
        # Scales become nn.Parameters now (from the initial weights), before any optimizer or checkpoint sees them.
        ids = torch.zeros(1, 2, dtype=torch.long, device=_input_embedding(model).weight.device)
        initialize_fake_quantizers(model, (ids,))
    return model


def convert(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Turn a prepared (QAT) or fine-tuned float (PTQ) model into a really quantized model, in place."""
    if not recipe.quantizes:
        return model
    recipe.check_supported()
    shared = recipe.embedding_policy == "quantize_embedding"
    tied = _head_is_tied(model)
    head = _output_head(model)
    if recipe.qat:
        set_fake_quant(model, True)
        quantize_(
            model, QATConfig(recipe.base_config(), step="convert"),
            filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear) and not (shared and tied and m is head),
        )
        if shared:
            quantize_(model, QATConfig(_embedding_config(), step="convert"),
                      filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedEmbedding))
    else:
        recipe.check_model(model)  # a one-line error, also for a model that skipped prepare
        quantize_(model, recipe.base_config(), filter_fn=_target_filter(model, recipe))
        if shared:
            quantize_(model, _embedding_config(), filter_fn=_is_module(_input_embedding(model)))
    if shared and tied:
        _retie_head(model)
    return model


def quantize_for_loading(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Give a freshly built float model the structure of a converted one, so its state_dict loads.

    The values are overwritten by ``load_state_dict(..., assign=True)`` afterwards, so QAT recipes
    can use their base (PTQ) config directly: convert produces the same tensor types.
    """
    swap_conv1d(model)
    if recipe.quantizes:
        if recipe.embedding_policy == "untie_head":
            untie_output_head(model)
        recipe.check_supported()
        quantize_(model, recipe.base_config(), filter_fn=_target_filter(model, recipe))
        if recipe.embedding_policy == "quantize_embedding":
            tied = _head_is_tied(model)
            quantize_(model, _embedding_config(), filter_fn=_is_module(_input_embedding(model)))
            if tied:
                _retie_head(model)
    return model


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization of every QAT linear and embedding on or off (weights are untouched)."""
    for m in model.modules():
        if isinstance(m, FakeQuantizerBase):
            m.enabled = enabled


def fake_quant_enabled(model: nn.Module) -> bool | None:
    """True/False when every fake quantizer in ``model`` is on/off; None when there are none (or mixed)."""
    states = {m.enabled for m in model.modules() if isinstance(m, FakeQuantizerBase)}
    return states.pop() if len(states) == 1 else None


def requantize_linear(linear: nn.Module, weight: torch.Tensor, recipe: Recipe) -> None:
    """Give ``linear`` the float ``weight`` and quantize it again with ``recipe``'s final format (frozen).

    For NF4 the layer's own block sizes are kept; other formats come from ``recipe.base_config()``.
    """
    old = linear.weight
    # a quantized tensor's dtype is its logical (float) dtype, so this keeps the model's precision
    linear.weight = nn.Parameter(weight.detach().to(old.dtype), requires_grad=False)
    if isinstance(old, NF4Tensor):
        linear.weight = nn.Parameter(to_nf4(linear.weight.detach(), old.block_size, old.scaler_block_size),
                                     requires_grad=False)
    elif isinstance(old, TorchAOBaseTensor):
        quantize_(linear, recipe.base_config(), filter_fn=lambda m, fqn: m is linear)
        linear.weight.requires_grad_(False)
