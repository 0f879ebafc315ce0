"""Optimizer parameter groups (weight-decay strategies) and per-step learning-rate schedules."""

from __future__ import annotations

import re
from typing import Iterable, Literal

import torch
from torch import nn
from transformers import get_scheduler

DecayStrategy = Literal["no_decay_bias_norm_embedding", "decay_all"]

#: Names of parameters that are not decayed by the default strategy.
_NO_DECAY_PATTERNS = (r"\.bias$", r"(^|\.)(ln_\w*|\w*norm\w*|layernorm\w*)\.weight$")


def parameter_groups(
    model: nn.Module, strategy: DecayStrategy = "no_decay_bias_norm_embedding"
) -> list[dict]:
    """Split trainable parameters into a decayed group and a group with ``weight_decay=0``.

    ``no_decay_bias_norm_embedding`` (the usual choice for transformers) exempts biases, LayerNorm /
    RMSNorm weights and embedding tables; ``decay_all`` decays everything. The decayed group takes
    the optimizer's own ``weight_decay``.
    """
    if strategy not in ("no_decay_bias_norm_embedding", "decay_all"):
        raise ValueError(
            f"--model.weight_decay_strategy={strategy!r} is unknown; use no_decay_bias_norm_embedding or decay_all"
        )
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    patterns = [re.compile(p, re.IGNORECASE) for p in _NO_DECAY_PATTERNS]
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        exempt = id(p) in embedding_params or any(pat.search(name) for pat in patterns)
        (no_decay if exempt and strategy != "decay_all" else decay).append(p)
    groups = [{"params": decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` >= 1 is a number of steps; 0 <= ``warmup`` < 1 is a fraction of ``total_steps``."""
    if warmup < 0:
        raise ValueError(f"--model.warmup={warmup} must be >= 0 (steps, or a fraction of the run below 1)")
    return int(warmup) if warmup >= 1 else int(round(warmup * total_steps))


def build_schedule(
    optimizer: torch.optim.Optimizer, name: str, warmup: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """``transformers.get_scheduler`` (linear, cosine, constant_with_warmup, polynomial, ...), stepped per step."""
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps(warmup, total_steps), num_training_steps=total_steps
    )


def trainable_parameters(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params if p.requires_grad)
