"""Quantization recipes, and the only package of lit-qft that talks to torchao.

A recipe is a small config object selected by ``class_path`` in YAML (like torchao's own configs),
turned into torchao configs here and nowhere else::

    model:
      quantization:
        class_path: lit_qft.QAT8da4w
        init_args: {group_size: 32, fake_quant_after_steps: 0.5}

Two facts shape this package (see docs/quantization.md):

* GPT-2 is built from ``transformers.pytorch_utils.Conv1D`` (weight stored ``[in, out]``), which
  torchao's ``quantize_`` and QAT ``prepare`` silently skip. :func:`swap_conv1d` replaces every
  Conv1D by an exactly equivalent ``nn.Linear`` holding ``weight.T`` before anything else.
* ``lm_head`` is tied to the token embedding. Quantizing the head alone unties it and *adds* a
  quantized copy next to the float embedding, so the policy is explicit: keep both in float, untie
  and quantize the head, or quantize the embedding once (int8 per row) and share it with the head.

Modules: :mod:`~lit_qft.quantization.recipes` (the recipe dataclasses, their validation and torchao
configs), :mod:`~lit_qft.quantization.targets` (which layers a recipe quantizes),
:mod:`~lit_qft.quantization.surgery` (Conv1D swap, head policy, prepare / convert / load, fake-quant
switch, re-quantization) and :mod:`~lit_qft.quantization.inspection` (quantized layers, sizes,
SQNR). Every name is re-exported here: ``lit_qft.quantization.X`` is the stable path (saved
``lit_qft_quantization.json`` files and YAML ``class_path`` values use it).
"""

from __future__ import annotations

from lit_qft.quantization.inspection import (
    _inner_tensors,
    dequantize_weight,
    fake_quantized_modules,
    is_quantized_weight,
    logits_sqnr_db,
    model_size_bytes,
    quantized_modules,
    sqnr_db,
    weight_format,
)
from lit_qft.quantization.recipes import (
    _POLICIES,
    EmbeddingPolicy,
    NoQuantization,
    PTQInt4WeightOnly,
    PTQInt8DynamicActivationInt8Weight,
    PTQInt8WeightOnly,
    PTQIntxWeightOnly,
    PTQNF4WeightOnly,
    QAT8da4w,
    QATInt4WeightOnly,
    QATInt8WeightOnly,
    QATIntxWeightOnly,
    QATRecipe,
    Recipe,
    _check_group_size,
    _check_intx_weight_only,
    _embedding_config,
    _granularity,
    _int_dtype,
    _intx_weight_only_config,
)
from lit_qft.quantization.surgery import (
    _retie_head,
    convert,
    fake_quant_enabled,
    prepare,
    quantize_for_loading,
    requantize_linear,
    set_fake_quant,
    swap_conv1d,
    untie_output_head,
)
from lit_qft.quantization.targets import (
    _head_is_tied,
    _input_embedding,
    _is_module,
    _output_head,
    _target_filter,
)

__all__ = [
    "EmbeddingPolicy",
    "NoQuantization",
    "PTQInt4WeightOnly",
    "PTQInt8DynamicActivationInt8Weight",
    "PTQInt8WeightOnly",
    "PTQIntxWeightOnly",
    "PTQNF4WeightOnly",
    "QAT8da4w",
    "QATInt4WeightOnly",
    "QATInt8WeightOnly",
    "QATIntxWeightOnly",
    "QATRecipe",
    "Recipe",
    "convert",
    "dequantize_weight",
    "fake_quant_enabled",
    "fake_quantized_modules",
    "is_quantized_weight",
    "logits_sqnr_db",
    "model_size_bytes",
    "prepare",
    "quantize_for_loading",
    "quantized_modules",
    "requantize_linear",
    "set_fake_quant",
    "sqnr_db",
    "swap_conv1d",
    "untie_output_head",
    "weight_format",
]
