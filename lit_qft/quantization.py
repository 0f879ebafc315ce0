"""Quantization recipes, and the only module of lit-qft that talks to torchao.

A recipe is a small config object selected by ``class_path`` in YAML (like torchao's own configs),
turned into torchao configs here and nowhere else::

    model:
      quantization:
        class_path: lit_qft.QAT8da4w
        init_args: {group_size: 32, fake_quant_after_steps: 0.5}

Two facts shape this module (see docs/quantization.md):

* GPT-2 is built from ``transformers.pytorch_utils.Conv1D`` (weight stored ``[in, out]``), which
  torchao's ``quantize_`` and QAT ``prepare`` silently skip. :func:`swap_conv1d` replaces every
  Conv1D by an exactly equivalent ``nn.Linear`` holding ``weight.T`` before anything else.
* ``lm_head`` is tied to the token embedding. Quantizing the head alone unties it and *adds* a
  quantized copy next to the float embedding, so the policy is explicit: keep both in float, untie
  and quantize the head, or quantize the embedding once (int8 per row) and share it with the head.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

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
    quantize_,
)
from torchao.quantization.qat import QATConfig, initialize_fake_quantizers
from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
from torchao.quantization.qat.fake_quantize_config import IntxFakeQuantizeConfig, _infer_fake_quantize_configs
from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase
from torchao.quantization.qat.linear import FakeQuantizedLinear
from torchao.utils import TorchAOBaseTensor
# NF4 (QLoRA's 4-bit NormalFloat): torchao's tensor, and its quantize_ config (prototype location in 0.18).
from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig
from torchao.quantization import NF4Tensor, to_nf4
from transformers.pytorch_utils import Conv1D

from lit_qft.checks import check_group_size

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


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def _head_is_tied(model: nn.Module) -> bool:
    head, emb = _output_head(model), _input_embedding(model)
    return head is not None and emb is not None and head.weight is emb.weight


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


def _target_filter(model: nn.Module, recipe: Recipe) -> Callable[[nn.Module, str], bool]:
    """The ``filter_fn`` for ``quantize_``: linear layers, minus skipped names, minus a float or shared head."""
    head = _output_head(model)
    tied = _head_is_tied(model)
    patterns = [re.compile(p) for p in recipe.skip]

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if module is head and (recipe.embedding_policy == "float" or (tied and recipe.embedding_policy == "quantize_embedding")):
            return False
        return not any(p.search(fqn) for p in patterns)

    return keep


def _is_module(target: nn.Module | None) -> Callable[[nn.Module, str], bool]:
    return lambda m, fqn: m is target


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


# --------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------
def fake_quantized_modules(model: nn.Module) -> list[str]:
    """Names of the modules that fake-quantize their weights during training."""
    return [
        n for n, m in model.named_modules()
        if isinstance(m, (FakeQuantizedLinear, FakeQuantizedEmbedding)) and m.weight_fake_quantizer is not None
    ]


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is a torchao quantized tensor."""
    return [
        n for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), (TorchAOBaseTensor, NF4Tensor))
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


def logits_sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """Signal and noise power sums ``(sum ref^2, sum (ref-approx)^2)``; accumulate, then use :func:`sqnr_db`."""
    ref = reference.detach().float()
    return float(ref.pow(2).sum()), float((ref - approx.detach().float()).pow(2).sum())


def sqnr_db(signal: float, noise: float) -> float:
    """Signal-to-quantization-noise ratio in dB (``inf`` when the two agree exactly)."""
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


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

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the layer and field when a layer's shape does not fit the blocks."""
        targets = _target_filter(model, self)
        for name, module in model.named_modules():
            if not targets(module, name):
                continue
            numel = module.weight.numel()
            if numel % self.block_size or (numel // self.block_size) % self.scaler_block_size:
                raise ValueError(
                    f"PTQNF4WeightOnly: layer {name} has {numel} weights ({numel // max(self.block_size, 1)} "
                    f"blocks of {self.block_size}); choose block_size dividing the weight count and "
                    f"scaler_block_size dividing the block count (e.g. scaler_block_size: 16)"
                )


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """True for torchao quantized tensors (int8, intx, NF4), False for float weights."""
    return isinstance(weight, (TorchAOBaseTensor, NF4Tensor))


def dequantize_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A float copy of a (possibly quantized) weight: what the layer computes with."""
    if isinstance(weight, NF4Tensor):
        return weight.get_original_weight().to(dtype)
    if isinstance(weight, TorchAOBaseTensor):
        return weight.dequantize().to(dtype)
    return weight.detach().to(dtype).clone()


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
