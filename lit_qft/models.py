"""Build Hugging Face causal LMs: pretrained (hub id, local folder, built-in offline name) or from config."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

#: Offline names resolved to folders prepared from package registries (see ``lit_qft.assets``).
BUILTIN_MODELS = ("smollm2-135m",)


def resolve_pretrained(name_or_path: str) -> str:
    """Map a built-in offline model name to its prepared folder; pass hub ids and folders through."""
    if name_or_path == "smollm2-135m":
        from lit_qft.assets.smollm2 import smollm2_dir

        return str(smollm2_dir())
    return name_or_path


def build_config(architecture: str, vocab_size: int | None, overrides: dict[str, Any] | None):
    """A config for ``architecture`` (e.g. ``gpt2``, ``llama``) with ``overrides`` applied.

    Unknown override keys are refused, so a typo like ``n_layers`` fails loudly instead of being ignored.
    """
    config = AutoConfig.for_model(architecture)
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(
                f"--model.config_overrides: {architecture} config has no field {key!r}"
            )
        setattr(config, key, value)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    return config


def build_model(
    pretrained: str | None,
    architecture: str = "gpt2",
    config_overrides: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Load pretrained weights when ``pretrained`` is given, else build ``architecture`` with random init.

    Args:
        pretrained: Hub id (``gpt2``), local folder, or built-in offline name (``smollm2-135m``).
        architecture: Model type used when training from scratch (any ``AutoConfig.for_model`` name).
        config_overrides: Config fields to change when building from scratch (``n_layer``, ``n_embd``...).
        vocab_size: Vocabulary size for a model built from scratch (the tokenizer's length).
        trust_remote_code: Allow code shipped with a hub model to run (off unless you turn it on).
        dtype: Weight dtype; training keeps fp32 master weights (use ``precision: bf16-mixed``).
    """
    if pretrained:
        path = resolve_pretrained(pretrained)
        if config_overrides:
            raise ValueError(
                "--model.config_overrides only applies when training from scratch; "
                "remove it or unset --model.pretrained"
            )
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code,
            local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1",
        )
    config = build_config(architecture, vocab_size, config_overrides)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
