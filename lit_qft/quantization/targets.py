"""Which layers a recipe quantizes: the tied head / embedding pair and the ``quantize_`` filter.

No torchao here: plain module selection shared by the recipes (shape checks) and the surgery.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

from torch import nn

if TYPE_CHECKING:
    from lit_qft.quantization.recipes import Recipe


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def _head_is_tied(model: nn.Module) -> bool:
    head, emb = _output_head(model), _input_embedding(model)
    return head is not None and emb is not None and head.weight is emb.weight


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
