"""lit-qft: Lightning modules for fine-tuning quantized Hugging Face causal LMs with torchao."""

import logging as _logging

# torchao warns at import about GPU-only kernels (mxfp8, cutlass) it cannot load on CPU builds;
# they are irrelevant here and alarm users, so keep only errors from its package logger.
_logging.getLogger("torchao").setLevel(_logging.ERROR)

from lit_qft.callbacks import QuantizedExport
from lit_qft.data import LanguageModelingDataModule, SentimentDataModule, TranslationDataModule
from lit_qft.export import load_quantized, save_quantized
from lit_qft.module import LitCausalLM
from lit_qft.quantization import (
    NoQuantization,
    PTQInt8DynamicActivationInt8Weight,
    PTQInt8WeightOnly,
    QAT8da4w,
    QATInt8WeightOnly,
    Recipe,
)

__all__ = [
    "LanguageModelingDataModule",
    "SentimentDataModule",
    "TranslationDataModule",
    "LitCausalLM",
    "NoQuantization",
    "PTQInt8DynamicActivationInt8Weight",
    "PTQInt8WeightOnly",
    "QAT8da4w",
    "QATInt8WeightOnly",
    "QuantizedExport",
    "Recipe",
    "load_quantized",
    "save_quantized",
]
__version__ = "0.1.0"
