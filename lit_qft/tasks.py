"""Tasks: how a model is built, what loss it trains on and which metrics it reports, per task.

:class:`~lit_qft.module.LitCausalLM` calls into a task object; the task comes from the
DataModule (``datamodule.task``) unless one is passed to the module. Tasks know nothing of
torchao: quantization stays in :mod:`lit_qft.quantization`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.text import CHRFScore, SacreBLEUScore
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from lit_qft.models import build_config, build_model, resolve_pretrained

__all__ = [
    "LabelWordClassification", "LanguageModeling", "SequenceClassification", "Task", "Translation",
    "check_compatible", "position_ids",
]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the same positions as unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def context_length(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def check_compatible(model: PreTrainedModel, tokenizer, datamodule: Any | None) -> None:
    """One-line errors when the data cannot feed the model: vocabulary or sequence length."""
    vocab = model.get_input_embeddings().num_embeddings
    data_tok = getattr(datamodule, "tokenizer", None)
    if data_tok is not None:
        if len(data_tok) > vocab:
            raise ValueError(
                f"--data.tokenizer has {len(data_tok)} tokens but the model's vocabulary has {vocab}; "
                "use the model's own tokenizer"
            )
        if tokenizer is not None and (len(data_tok) != len(tokenizer) or data_tok.get_vocab() != tokenizer.get_vocab()):
            raise ValueError(
                "--data.tokenizer and --model.tokenizer have different vocabularies; use the same tokenizer for both"
            )
    length, ctx = getattr(datamodule, "max_length", None), context_length(model.config)
    if length is not None and ctx is not None and length > ctx:
        flag = getattr(datamodule, "length_flag", "max_length")
        raise ValueError(
            f"--data.{flag}={length} is longer than the model's context ({ctx} positions); "
            f"lower --data.{flag} or use a model with a longer context"
        )


class Task:
    """Causal LM forward on ``input_ids``/``attention_mask``/``labels`` (-100 ignored); base of all tasks."""

    #: Whether ``val/ppl`` (exp of the token-weighted loss) means something for this task.
    perplexity: bool = True

    def build_model(
        self, pretrained: str | None, architecture: str, config_overrides: dict | None, *,
        vocab_size: int, pad_token_id: int | None = None, trust_remote_code: bool = False,
    ) -> PreTrainedModel:
        return build_model(pretrained, architecture, config_overrides, vocab_size=vocab_size,
                           trust_remote_code=trust_remote_code)

    def adapt_recipe(self, recipe):
        """The recipe to use for this task's model (unchanged unless a head must stay float)."""
        return recipe

    def forward(self, model: nn.Module, batch: dict[str, Any]):
        mask = batch["attention_mask"]
        return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids(mask),
                     labels=batch["labels"])

    def loss_weight(self, batch: dict[str, Any]) -> int:
        """Number of predicted tokens behind the mean loss (to average across batches correctly)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict()

    def update_metrics(self, metrics: nn.ModuleDict, model: nn.Module, batch: dict[str, Any], outputs, tokenizer) -> None:
        """Add one validation batch to ``metrics`` (``outputs`` is this batch's :meth:`forward`)."""

    @torch.no_grad()
    def predict_texts(self, model: nn.Module, batch: dict[str, Any], tokenizer) -> list[str]:
        """What ``lit-qft predict`` returns for one batch, one string per example: here the greedy
        continuation (32 new tokens) of the first 32 tokens of each sequence, decoded."""
        prompt = batch["input_ids"][:, :32]
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        return tokenizer.batch_decode(out[:, prompt.shape[1]:], skip_special_tokens=True)


class LanguageModeling(Task):
    """Next-token prediction on every real token (padding masked); reports loss and perplexity."""


class SequenceClassification(Task):
    """A ``*ForSequenceClassification`` model: a linear ``score`` head on the last real token.

    The head reads the rightmost token that is not padding (``config.pad_token_id``), so left and
    right padding give the same prediction; positions skip left padding. The head stays in float
    under every quantization recipe (it is tiny and sets the decision boundary).

    Args:
        num_labels: Number of classes.
    """

    perplexity = False

    def __init__(self, num_labels: int = 2) -> None:
        self.num_labels = num_labels

    def build_model(self, pretrained, architecture, config_overrides, *, vocab_size, pad_token_id=None,
                    trust_remote_code=False):
        kwargs = dict(num_labels=self.num_labels, pad_token_id=pad_token_id, trust_remote_code=trust_remote_code)
        if pretrained:
            if config_overrides:
                raise ValueError("--model.config_overrides only applies when training from scratch; "
                                 "remove it or unset --model.pretrained")
            return AutoModelForSequenceClassification.from_pretrained(resolve_pretrained(pretrained), **kwargs)
        config = build_config(architecture, vocab_size, config_overrides)
        config.num_labels, config.pad_token_id = self.num_labels, pad_token_id
        return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)

    def adapt_recipe(self, recipe):
        pattern = r"(^|\.)score$"
        if pattern in recipe.skip:
            return recipe
        return dataclasses.replace(recipe, skip=[*recipe.skip, pattern])

    def loss_weight(self, batch) -> int:
        return int(batch["labels"].numel())

    def metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({
            "acc": MulticlassAccuracy(self.num_labels, average="micro"),
            "f1": MulticlassF1Score(self.num_labels, average="macro"),
        })

    def update_metrics(self, metrics, model, batch, outputs, tokenizer) -> None:
        preds = outputs.logits.argmax(-1)
        for m in metrics.values():
            m.update(preds, batch["labels"])


class LabelWordClassification(Task):
    """Classification by the LM itself: trained on the label word after a prompt, predicts the label
    whose word's first token gets the highest logit at the end of the prompt.

    Args:
        label_token_ids: First token of each label's word, in class order.
    """

    perplexity = False

    def __init__(self, label_token_ids: list[int]) -> None:
        self.label_token_ids = list(label_token_ids)

    def loss_weight(self, batch) -> int:
        return int((batch["labels"] != -100).sum())

    def metrics(self) -> nn.ModuleDict:
        n = len(self.label_token_ids)
        return nn.ModuleDict({"acc": MulticlassAccuracy(n, average="micro"), "f1": MulticlassF1Score(n, average="macro")})

    def predict(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Class index per row from teacher-forced ``logits`` (the label word's first position in ``labels``)."""
        first = (labels != -100).int().argmax(-1)  # first label-word token
        rows = torch.arange(labels.shape[0], device=labels.device)
        scores = logits[rows, first - 1][:, self.label_token_ids]  # logits that predict that token
        return scores.argmax(-1)

    def update_metrics(self, metrics, model, batch, outputs, tokenizer) -> None:
        preds = self.predict(outputs.logits, batch["labels"])
        for m in metrics.values():
            m.update(preds, batch["class_labels"])


class Translation(Task):
    """Loss on target tokens only (the batch's labels); greedy generation from the prompts on validation.

    Args:
        max_new_tokens: Tokens generated per example on validation.
    """

    def __init__(self, max_new_tokens: int = 64) -> None:
        self.max_new_tokens = max_new_tokens

    def metrics(self) -> nn.ModuleDict:
        # n_word_order=0: chrF as sacrebleu reports it (torchmetrics defaults to chrF++).
        return nn.ModuleDict({"bleu": SacreBLEUScore(), "chrf": CHRFScore(n_word_order=0)})

    @torch.no_grad()
    def generate(self, model, batch, tokenizer) -> list[str]:
        """Greedy translations of the batch's left-padded prompts (decoded, EOS and padding removed)."""
        prompt, mask = batch["prompt_ids"], batch["prompt_attention_mask"]
        out = model.generate(
            input_ids=prompt, attention_mask=mask, max_new_tokens=self.max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        return [t.strip() for t in tokenizer.batch_decode(out[:, prompt.shape[1]:], skip_special_tokens=True)]

    def predict_texts(self, model, batch, tokenizer) -> list[str]:
        """The greedy translation of each example's prompt (the source only, never its reference)."""
        return self.generate(model, batch, tokenizer)

    def update_metrics(self, metrics, model, batch, outputs, tokenizer) -> None:
        hyps = self.generate(model, batch, tokenizer)
        refs = [[r] for r in batch["references"]]
        for m in metrics.values():
            m.update(hyps, refs)
