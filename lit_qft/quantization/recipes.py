"""Quantization recipes: small config objects selected by ``class_path`` in YAML, and their torchao configs.

Each recipe validates its fields on construction (one-line ``ValueError`` naming the field) and
turns itself into the torchao config that produces the final quantized model
(:meth:`Recipe.base_config`); :mod:`lit_qft.quantization.surgery` applies it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn
from torchao.quantization import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    PerAxis,
    PerGroup,
)
# NF4 (QLoRA's 4-bit NormalFloat): its quantize_ config (prototype location in 0.18).
from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig

from lit_qft.quantization.targets import _output_head, _target_filter

EmbeddingPolicy = Literal["float", "untie_head", "quantize_embedding"]
_POLICIES = ("float", "untie_head", "quantize_embedding")


def _int_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits == 8 else getattr(torch, f"int{bits}")


def _granularity(group_size: int | None):
    return PerAxis(0) if group_size is None else PerGroup(group_size)


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
            in float and tied; ``untie_head`` gives ``lm_head`` its own copy and quantizes it (faster
            decode, larger file); ``quantize_embedding`` quantizes the embedding table once (int8 per
            row) and shares it with a tied ``lm_head`` (smallest file).
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

    def check_supported(self) -> None:
        """Raise ``ValueError`` (naming the hardware or field to change) if this recipe cannot run here."""

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` (naming the layer, its shape and what to change) if a layer this recipe
        targets cannot take its format; ``prepare`` calls it after the Conv1D swap and head policy."""

    def __post_init__(self) -> None:
        if self.embedding_policy not in _POLICIES:
            raise ValueError(
                f"embedding_policy={self.embedding_policy!r} is not valid; use one of {', '.join(_POLICIES)}"
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
class QATRecipe(Recipe):
    """Base of the QAT recipes (fake quantization while training, real quantization at convert).

    Args:
        fake_quant_after_steps: Train in float first and switch fake quantization on at this optimizer
            step (>= 1), or after this fraction of the run (< 1); 0 fake-quantizes from the start.
            The switch is derived from the global step, so it is right after resuming a checkpoint.
        range_learning: Learn the weight scales (and zero points) by gradient descent instead of
            recomputing them from the weights each step. They appear as parameters named
            ``...weight_fake_quantizer.scale`` and are used by convert.
    """

    fake_quant_after_steps: float = 0
    range_learning: bool = False
    qat: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fake_quant_after_steps < 0 or (
            self.fake_quant_after_steps >= 1 and self.fake_quant_after_steps != int(self.fake_quant_after_steps)
        ):
            raise ValueError(
                f"fake_quant_after_steps={self.fake_quant_after_steps} must be a step count (integer >= 1), "
                "a fraction of the run (0 <= x < 1), or 0"
            )

    def fake_quant_start_step(self, total_steps: int | float) -> int:
        """The first optimizer step trained with fake quantization, for a run of ``total_steps``."""
        after = self.fake_quant_after_steps
        if after >= 1:
            return int(after)
        if after > 0 and not math.isfinite(total_steps):
            raise ValueError(
                "fake_quant_after_steps as a fraction needs a known run length; set --trainer.max_steps "
                "or give a step count (>= 1)"
            )
        return int(round(after * total_steps))


def _check_group_size(group_size: int | None) -> None:
    if group_size is not None and group_size <= 0:
        raise ValueError(f"group_size={group_size} must be a positive integer (or null for per-channel)")


@dataclass
class QAT8da4w(QATRecipe):
    """QAT with int8 dynamic per-token activations and int4 grouped symmetric weights (torchao's 8da4w).

    Args:
        group_size: Number of input features sharing one weight scale; must divide every quantized
            layer's input width (768 and 3072 for GPT-2 small: 32, 64, 128, 256 all work).
    """

    group_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_group_size(self.group_size)

    def base_config(self):
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(self.group_size)
        )


@dataclass
class QATInt4WeightOnly(QATRecipe):
    """QAT toward int4 grouped symmetric weight-only quantization (activations stay float).

    Converts with ``IntxWeightOnlyConfig(int4, PerGroup)``, which runs on CPU and GPU. torchao's
    ``Int4WeightOnlyConfig`` (packed int4 kernels) needs a CUDA GPU with the ``mslk`` package and
    cannot convert on CPU. Note: torchao 0.18 stores these int4 values one per int8 byte.

    Args:
        group_size: Input features sharing one weight scale (must divide every layer's input width).
    """

    group_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_group_size(self.group_size)

    def base_config(self):
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(self.group_size))


@dataclass
class QATInt8WeightOnly(QATRecipe):
    """QAT toward int8 per-channel weight-only quantization (activations stay float).

    torchao's QAT rejects ``Int8WeightOnlyConfig``; ``IntxWeightOnlyConfig(int8, PerAxis(0))`` is
    the equivalent target that QAT accepts (prepare and convert agree exactly).
    """

    def base_config(self):
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


def _check_intx_weight_only(bits: int, group_size: int | None) -> None:
    """Validation shared by the QAT and PTQ n-bit weight-only recipes."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported; use 2 to 8")
    _check_group_size(group_size)


def _intx_weight_only_config(bits: int, group_size: int | None):
    """The torchao target of both n-bit weight-only recipes (QAT converts to exactly what PTQ applies)."""
    return IntxWeightOnlyConfig(weight_dtype=_int_dtype(bits), granularity=_granularity(group_size))


@dataclass
class QATIntxWeightOnly(QATRecipe):
    """QAT toward n-bit (2..8) symmetric weight-only quantization, per channel or per group.

    Args:
        bits: Weight bit width, 2 to 8.
        group_size: Input features sharing one scale; null means one scale per output channel.
    """

    bits: int = 4
    group_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_intx_weight_only(self.bits, self.group_size)

    def base_config(self):
        return _intx_weight_only_config(self.bits, self.group_size)


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


@dataclass
class PTQInt4WeightOnly(Recipe):
    """Post-training int4 grouped weight-only quantization.

    Args:
        group_size: Input features sharing one weight scale (must divide every layer's input width).
        int4_format: ``intx`` (default) runs everywhere, CPU included (torchao ``IntxWeightOnlyConfig``;
            int4 values stored one per int8 byte in torchao 0.18). ``tile_packed_to_4d`` is torchao's
            packed ``Int4WeightOnlyConfig`` for the tinygemm kernel: CUDA GPU and a bf16 model only.
    """

    group_size: int = 32
    int4_format: Literal["intx", "tile_packed_to_4d"] = "intx"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_group_size(self.group_size)
        if self.int4_format not in ("intx", "tile_packed_to_4d"):
            raise ValueError(f"int4_format={self.int4_format!r} is not valid; use 'intx' or 'tile_packed_to_4d'")

    def check_supported(self) -> None:
        if self.int4_format == "tile_packed_to_4d" and not torch.cuda.is_available():
            raise ValueError(
                "PTQInt4WeightOnly(int4_format='tile_packed_to_4d') needs a CUDA GPU (torchao tinygemm kernel); "
                "on CPU use int4_format='intx'"
            )

    def base_config(self):
        if self.int4_format == "tile_packed_to_4d":
            return Int4WeightOnlyConfig(group_size=self.group_size, int4_packing_format="tile_packed_to_4d")
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(self.group_size))


@dataclass
class PTQIntxWeightOnly(Recipe):
    """Post-training n-bit (2..8) symmetric weight-only quantization, per channel or per group.

    Args:
        bits: Weight bit width, 2 to 8.
        group_size: Input features sharing one scale; null means one scale per output channel.
    """

    bits: int = 4
    group_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_intx_weight_only(self.bits, self.group_size)

    def base_config(self):
        return _intx_weight_only_config(self.bits, self.group_size)


#: The embedding table (and a tied head sharing it) is quantized int8 with one scale per row,
#: which for ``lm_head`` is one scale per output channel: the same tensor serves both.
def _embedding_config():
    return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


# --------------------------------------------------------------------------------------------
# NF4 and LoRA bases (used by lit_qft.lora: quantize a frozen base, merge adapters, re-quantize)
# --------------------------------------------------------------------------------------------
@dataclass
class PTQNF4WeightOnly(Recipe):
    """4-bit NormalFloat weight-only quantization (QLoRA's NF4, torchao ``NF4Tensor``); runs on CPU.

    Mostly a frozen base for LoRA (``--model.lora``); the weights are dequantized to the activation
    dtype in every matmul (no packed int4 kernel), so it saves memory, not time.

    Args:
        block_size: Weights sharing one absmax scale (64 in QLoRA); must divide each layer's size.
        scaler_block_size: Scales sharing one second-level (double-quantization) scale; must divide
            the number of blocks of each layer (64 fits GPT-2 and SmolLM2; tiny test models need 16).
    """

    block_size: int = 64
    scaler_block_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("block_size", "scaler_block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")

    def base_config(self):
        config = NF4WeightOnlyConfig()  # a plain class in torchao 0.18: set the fields after construction
        config.block_size, config.scaler_block_size = self.block_size, self.scaler_block_size
        return config

    def fits(self, numel: int) -> bool:
        """Whether torchao's ``NF4Tensor`` can store a weight of ``numel`` values with these block sizes.

        It needs an even count that ``block_size`` divides, and a number of blocks that
        ``scaler_block_size`` divides; otherwise it fails with a bare ``AssertionError``.
        """
        return numel % 2 == 0 and numel % self.block_size == 0 and (numel // self.block_size) % self.scaler_block_size == 0

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the first layer NF4 cannot store, its shape, the divisibility it
        lacks and what to change: checked in ``prepare``, before training (a PTQ run would otherwise
        fail at convert, after the whole run). GPT-2's 50,257-row head is the usual case under
        ``embedding_policy: untie_head``: 50,257 x 768 weights are 603,084 blocks of 64, not a multiple
        of 64. (``quantize_embedding`` stores the table int8 per row, which any vocabulary fits.)
        """
        targets = _target_filter(model, self)
        bad = [(name, m) for name, m in model.named_modules() if targets(m, name) and not self.fits(m.weight.numel())]
        if not bad:
            return
        name, module = bad[0]
        numel = module.weight.numel()
        if numel % self.block_size or numel % 2:
            need = f"its {numel} weights must be an even multiple of block_size={self.block_size}"
        else:
            need = (f"its {numel // self.block_size} blocks of {self.block_size} weights must be a multiple of "
                    f"scaler_block_size={self.scaler_block_size}")
        head = _output_head(model)
        fixes = []
        if any(m is head for _, m in bad):
            fixes.append("keep the output head in float with embedding_policy: float (or quantize_embedding, "
                         "an int8 table shared with the head)")
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in bad if m is not head})
        if leaves:
            fixes.append(f"keep such layers in float with skip: ['(^|\\.)({'|'.join(leaves)})$']")
        fixes.append("choose block_size / scaler_block_size that divide them")
        others = f" ({len(bad) - 1} more layer(s) too)" if len(bad) > 1 else ""
        raise ValueError(
            f"PTQNF4WeightOnly cannot store layer {name} (weight {list(module.weight.shape)}) in NF4: {need}"
            f"{others}; {', or '.join(fixes)}"
        )
