"""LightningDataModules for the fine-tuning tasks lit-qft serves: language modelling, sentiment, translation."""

from lit_qft.data.base import TextDataModule
from lit_qft.data.language_modeling import LanguageModelingDataModule, pack_blocks
from lit_qft.data.sentiment import SentimentDataModule
from lit_qft.data.sources import load_source
from lit_qft.data.translation import TranslationDataModule

__all__ = [
    "LanguageModelingDataModule",
    "SentimentDataModule",
    "TextDataModule",
    "TranslationDataModule",
    "load_source",
    "pack_blocks",
]
