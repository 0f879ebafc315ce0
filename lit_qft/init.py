"""Initialization schemes applied to a freshly built model, before quantization ``prepare``.

* ``pretrained``: keep the loaded checkpoint (the default when ``--model.pretrained`` is given).
* ``scratch``: the model's own random init (HF ``_init_weights``), also for a pretrained
  architecture: same shapes and config, none of the learned weights.
* ``reinit_top_k``: keep the pretrained weights except the top ``k`` transformer blocks, which get
  the model's own random init; a known trick when fine-tuning on little data (Zhang et al. 2021,
  "Revisiting Few-sample BERT Fine-tuning"): the top blocks are the most specific to pre-training.

A classification head (``score`` / ``classifier``) can be re-initialized small
(:func:`init_classification_head`) so that the first updates do not wash out the pretrained body.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

InitScheme = Literal["pretrained", "scratch", "reinit_top_k"]
INIT_SCHEMES = ("pretrained", "scratch", "reinit_top_k")

#: Where the stack of transformer blocks lives, per model family (first match wins).
_BLOCK_PATHS = ("transformer.h", "model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.blocks")


def resolve_scheme(init: str | None, pretrained: str | None, reinit_top_k: int = 0) -> str:
    """Validate the choice; ``None`` means ``pretrained`` when a checkpoint is given, else ``scratch``."""
    if init is None:
        init = "pretrained" if pretrained else "scratch"
    if init not in INIT_SCHEMES:
        raise ValueError(f"--model.init={init!r} is unknown; use one of {', '.join(INIT_SCHEMES)}")
    if init in ("pretrained", "reinit_top_k") and not pretrained:
        raise ValueError(f"--model.init={init} needs pretrained weights; set --model.pretrained or use init=scratch")
    if init == "reinit_top_k" and reinit_top_k <= 0:
        raise ValueError("--model.init=reinit_top_k needs --model.reinit_top_k >= 1 (blocks to re-initialize)")
    if init != "reinit_top_k" and reinit_top_k:
        raise ValueError(f"--model.reinit_top_k={reinit_top_k} only applies with --model.init=reinit_top_k")
    return init


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and ``ModuleList`` of the model's transformer blocks (GPT-2 ``transformer.h``,
    Llama ``model.layers``...), also under a task wrapper such as ``*ForSequenceClassification``."""
    modules = dict(model.named_modules())
    for path in _BLOCK_PATHS:
        if isinstance(modules.get(path), nn.ModuleList):
            return path, modules[path]
    raise ValueError(
        f"--model.init=reinit_top_k: cannot find the transformer blocks of {type(model).__name__} "
        f"(looked for {', '.join(_BLOCK_PATHS)})"
    )


@torch.no_grad()
def reinitialize(model: nn.Module, module: nn.Module) -> None:
    """Re-run ``model``'s own HF initialization on every submodule of ``module``, children first.

    Children first (as ``PreTrainedModel.initialize_weights`` does) so that a parent's special rule
    (GPT-2 scales ``c_proj`` by 1/sqrt(2 n_layer)) wins over the child's generic one. A loaded
    checkpoint marks its tensors ``_is_hf_initialized``, which makes HF's init functions skip them,
    so the marks are cleared first.
    """
    init_fn = getattr(model, "_init_weights", None)
    if init_fn is None:
        raise ValueError(f"{type(model).__name__} has no HF _init_weights; cannot re-initialize it")

    def visit(m: nn.Module) -> None:
        for child in m.children():
            visit(child)
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if getattr(t, "_is_hf_initialized", False):
                t._is_hf_initialized = False
        m._is_hf_initialized = False
        init_fn(m)
        m._is_hf_initialized = True

    visit(module)


def reinit_top_blocks(model: nn.Module, k: int) -> list[str]:
    """Re-initialize the last ``k`` transformer blocks; return their names (``transformer.h.11``...)."""
    path, blocks = transformer_blocks(model)
    if not 1 <= k <= len(blocks):
        raise ValueError(f"--model.reinit_top_k={k} must be between 1 and the number of blocks ({len(blocks)})")
    names = []
    for i in range(len(blocks) - k, len(blocks)):
        reinitialize(model, blocks[i])
        names.append(f"{path}.{i}")
    return names


def classification_head(model: nn.Module) -> nn.Linear | None:
    """The classification head of a ``*ForSequenceClassification`` model (``score`` or ``classifier``)."""
    for attr in ("score", "classifier"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            return head
    return None


@torch.no_grad()
def init_classification_head(head: nn.Linear, std: float) -> None:
    """Weights from N(0, ``std``), bias 0: a small head starts near uniform class probabilities."""
    if std <= 0:
        raise ValueError(f"--model.classifier_init_std={std} must be > 0")
    head.weight.normal_(0.0, std)
    if head.bias is not None:
        head.bias.zero_()


def apply_init(
    model: nn.Module,
    init: str | None,
    pretrained: str | None,
    reinit_top_k: int = 0,
    classifier_init_std: float | None = None,
) -> str:
    """Apply the initialization scheme to a just-built ``model`` in place; return the scheme used.

    Call before quantization ``prepare`` (it needs the model's own module types, e.g. GPT-2 Conv1D).
    Randomness comes from torch's global generator, so ``seed_everything`` makes it reproducible.
    """
    scheme = resolve_scheme(init, pretrained, reinit_top_k)
    if scheme == "scratch" and pretrained:
        # Loaded weights are discarded: the whole model gets its own init again (tied weights stay tied).
        reinitialize(model, model)
    elif scheme == "reinit_top_k":
        reinit_top_blocks(model, reinit_top_k)
    if classifier_init_std is not None:
        head = classification_head(model)
        if head is None:
            raise ValueError(
                f"--model.classifier_init_std applies to a classification head, and {type(model).__name__} "
                "has none; remove it or use a sequence-classification task"
            )
        init_classification_head(head, classifier_init_std)
    return scheme
