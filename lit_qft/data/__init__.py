"""LightningDataModules for the fine-tuning tasks lit-qft serves."""

from lit_qft.data.language_modeling import LanguageModelingDataModule

__all__ = ["LanguageModelingDataModule"]
