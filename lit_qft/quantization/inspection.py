"""Read-only views of a (fake-)quantized model: which layers, how many bytes, how close to float."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchao.quantization import NF4Tensor
from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
from torchao.quantization.qat.linear import FakeQuantizedLinear
from torchao.utils import TorchAOBaseTensor


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


#: Tensor attributes that say where or in which float dtype a weight lives, not how it is quantized.
_PLACEMENT_ATTRIBUTES = ("dtype", "device", "tensor_meta", "requires_grad")


def weight_format(tensor: torch.Tensor) -> str:
    """How a weight is stored, as a short string: ``plain tensor`` or the torchao tensor type with
    the attributes that define its format (bits, block size, activation quantization...).

    Two weights with the same format load into each other; the float dtype and the device are left
    out (a bf16 export loads into a model built in fp32).
    """
    if not is_quantized_weight(tensor):
        return "plain tensor"
    _, attributes = tensor.__tensor_flatten__()
    if not isinstance(attributes, dict):  # some torchao tensors flatten their attributes to a list
        attributes = dict(zip(getattr(type(tensor), "tensor_attribute_names", ()), attributes))
    parts = [f"{k}={_plain(v)}" for k, v in sorted(attributes.items()) if k not in _PLACEMENT_ATTRIBUTES]
    return f"{type(tensor).__name__}({', '.join(parts)})"


def _plain(value) -> str:
    """Tuples and lists print alike (a block size may come back from pickling as either)."""
    if isinstance(value, (tuple, list, torch.Size)):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    return str(value).removeprefix("torch.")
