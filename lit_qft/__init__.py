"""lit-qft: Lightning modules for fine-tuning quantized Hugging Face causal LMs with torchao."""

import logging as _logging

# torchao warns at import about GPU-only kernels (mxfp8, cutlass) it cannot load on CPU builds;
# they are irrelevant here and alarm users, so keep only errors from its package logger.
_logging.getLogger("torchao").setLevel(_logging.ERROR)

from lit_qft.callbacks import QuantizedExport
from lit_qft.data import LanguageModelingDataModule, SentimentDataModule, TranslationDataModule
from lit_qft.convert import convert_checkpoint
from lit_qft.export import load_quantized, save_quantized
from lit_qft.lora import LoraSettings, load_adapters
from lit_qft.generate import generate
from lit_qft.module import LitCausalLM
from lit_qft.quantization import (
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
)

__all__ = [
    "LanguageModelingDataModule",
    "SentimentDataModule",
    "TranslationDataModule",
    "LitCausalLM",
    "LoraSettings",
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
    "QuantizedExport",
    "Recipe",
    "convert_checkpoint",
    "generate",
    "load_adapters",
    "load_quantized",
    "save_quantized",
]
__version__ = "0.1.0"
