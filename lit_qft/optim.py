"""Optimizer parameter groups (weight-decay strategies) and per-step learning-rate schedules.

The optimizer itself is any ``torch.optim.Optimizer`` subclass chosen by class path
(``--model.optimizer=AdamW``, or ``torchao.optim.AdamW8bit`` for 8-bit states); this module decides
*which parameters go into which group* and *how the learning rate moves every optimizer step*.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn
from transformers import get_scheduler

DecayStrategy = Literal["no_decay_bias_norm_embedding", "decay_all", "custom"]

#: ``transformers.get_scheduler`` names that need nothing beyond warmup and total steps (extra
#: arguments such as ``power``/``lr_end`` go through ``lr_schedule_kwargs``).
LR_SCHEDULES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
)

#: Learned quantization ranges (torchao QAT range learning turns ``scale``/``zero_point`` of a
#: ``weight_fake_quantizer`` / ``activation_fake_quantizer`` into parameters).
QUANTIZER_PARAM = re.compile(r"fake_quantizer\.")


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm, RMSNorm, GroupNorm, and HF's own classes (LlamaRMSNorm, T5LayerNorm...).
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "Norm" in type(module).__name__


def _named_parameters_once(model: nn.Module) -> Iterable[tuple[str, nn.Module, str, nn.Parameter]]:
    """(full name, owning module, local name, parameter) for each trainable parameter, tied ones once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{module_name}.{local}" if module_name else local), module, local, p


def parameter_groups(
    model: nn.Module,
    strategy: DecayStrategy = "no_decay_bias_norm_embedding",
    no_decay_patterns: list[str] | None = None,
    quantizer_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into optimizer groups ``decay``, ``no_decay`` and ``quantizer``.

    Each group holds ``(name, parameter)`` pairs (torch keeps the names as ``param_names``) and a
    ``name`` that :class:`~lightning.pytorch.callbacks.LearningRateMonitor` uses (``lr-AdamW/decay``).
    A parameter shared by two modules (tied embedding and head) appears once. Empty groups are left out.

    Args:
        model: The model (after quantization ``prepare``, so learned quantizer ranges exist).
        strategy: ``no_decay_bias_norm_embedding``: biases, LayerNorm/RMSNorm weights and embedding
            tables get ``weight_decay=0``, the rest takes the optimizer's ``weight_decay``.
            ``decay_all``: every parameter is decayed. ``custom``: parameters whose name matches one of
            ``no_decay_patterns`` are not decayed, all others are.
        no_decay_patterns: Regular expressions (``re.search`` on the full parameter name), only with
            ``strategy=custom``.
        quantizer_lr: Learning rate of the learned quantization ranges (``*fake_quantizer.scale``,
            ``*fake_quantizer.zero_point``); ``None`` keeps the optimizer's. They are never decayed.
    """
    if strategy not in ("no_decay_bias_norm_embedding", "decay_all", "custom"):
        raise ValueError(
            f"--model.weight_decay_strategy={strategy!r} is unknown; "
            "use no_decay_bias_norm_embedding, decay_all or custom"
        )
    if (strategy == "custom") != bool(no_decay_patterns):
        raise ValueError(
            "--model.no_decay_patterns is used exactly when --model.weight_decay_strategy=custom; "
            "set both or neither"
        )
    patterns = []
    for pattern in no_decay_patterns or []:
        try:
            patterns.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"--model.no_decay_patterns: {pattern!r} is not a valid regular expression: {e}") from None
    if quantizer_lr is not None and quantizer_lr < 0:
        raise ValueError(f"--model.quantizer_lr={quantizer_lr} must be >= 0")

    decay, no_decay, quantizer = [], [], []
    for name, module, local, p in _named_parameters_once(model):
        if QUANTIZER_PARAM.search(name):
            quantizer.append((name, p))
        elif strategy == "decay_all":
            decay.append((name, p))
        elif strategy == "custom":
            (no_decay if any(pat.search(name) for pat in patterns) else decay).append((name, p))
        elif local == "bias" or _is_norm(module) or isinstance(module, nn.Embedding):
            no_decay.append((name, p))
        else:
            decay.append((name, p))

    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    if quantizer:
        group = {"params": quantizer, "weight_decay": 0.0, "name": "quantizer"}
        if quantizer_lr is not None:
            group["lr"] = quantizer_lr
        groups.append(group)
    if not groups:
        raise ValueError("the model has no trainable parameters; check the quantization/LoRA settings")
    return groups


def group_names(optimizer: torch.optim.Optimizer) -> dict[str, list[str]]:
    """``{group name: [parameter names]}`` of an optimizer built from :func:`parameter_groups`."""
    return {g.get("name", f"pg{i}"): list(g.get("param_names", [])) for i, g in enumerate(optimizer.param_groups)}


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` >= 1 is a number of steps; 0 <= ``warmup`` < 1 is a fraction of ``total_steps``."""
    if warmup < 0:
        raise ValueError(f"--model.warmup={warmup} must be >= 0 (steps, or a fraction of the run below 1)")
    if warmup >= 1 and warmup != int(warmup):
        raise ValueError(f"--model.warmup={warmup}: give a whole number of steps, or a fraction below 1")
    return int(warmup) if warmup >= 1 else int(round(warmup * total_steps))


def build_schedule(
    optimizer: torch.optim.Optimizer,
    name: str,
    warmup: float,
    total_steps: int,
    schedule_kwargs: dict[str, Any] | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup then ``name`` decay, from ``transformers.get_scheduler``; step it every optimizer step.

    ``constant`` with a warmup means warmup then constant (``constant_with_warmup``): transformers'
    own ``constant`` would silently drop the warmup. ``schedule_kwargs`` go to the schedule
    (``{power: 2.0, lr_end: 1.0e-6}`` for ``polynomial``, ``{num_cycles: 2}`` for ``cosine_with_restarts``).
    """
    if name not in LR_SCHEDULES:
        raise ValueError(f"--model.lr_schedule={name!r} is unknown; use one of {', '.join(LR_SCHEDULES)}")
    if total_steps <= 0:
        raise ValueError(f"total steps is {total_steps}; set --model.total_steps or --trainer.max_steps")
    n_warmup = warmup_steps(warmup, total_steps)
    if n_warmup > total_steps:
        raise ValueError(f"--model.warmup={warmup} is {n_warmup} steps, longer than the run ({total_steps} steps)")
    if name == "constant" and n_warmup:
        name = "constant_with_warmup"
    try:
        return get_scheduler(
            name, optimizer, num_warmup_steps=n_warmup, num_training_steps=total_steps,
            scheduler_specific_kwargs=dict(schedule_kwargs or {}),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"--model.lr_schedule_kwargs {schedule_kwargs} for {name!r}: {e}") from None


def total_steps_of(trainer, override: int | None) -> int:
    """The run's optimizer steps: ``override`` if given, else ``trainer.estimated_stepping_batches``
    (which accounts for ``max_steps``/``max_epochs``, the data length and gradient accumulation)."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"--model.total_steps={override} must be a positive number of optimizer steps")
        return int(override)
    estimated = trainer.estimated_stepping_batches
    if estimated == float("inf"):
        raise ValueError("the run has no fixed length; set --trainer.max_steps or --model.total_steps")
    return int(estimated)


def call_scheduler_factory(
    factory: Callable[..., torch.optim.lr_scheduler.LRScheduler],
    optimizer: torch.optim.Optimizer,
    total_steps: Callable[[], int],
) -> torch.optim.lr_scheduler.LRScheduler:
    """Build a torch scheduler chosen by class path, filling ``total_steps`` (``OneCycleLR``) from the
    run (``total_steps()``) when the config leaves it and ``epochs`` unset: it is stepped every step."""
    kwargs = getattr(factory, "keywords", None) or {}
    if isinstance(factory, functools.partial) and "total_steps" in kwargs and kwargs["total_steps"] is None \
            and kwargs.get("epochs") is None:
        return factory(optimizer, total_steps=total_steps())
    return factory(optimizer)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state (moments etc.), looking inside torchao's low-bit state
    tensors (codes + block scales); call it after at least one ``step``."""

    def tensor_bytes(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):
            return sum(tensor_bytes(getattr(t, attr)) for attr in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    return sum(
        tensor_bytes(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )


def trainable_parameters(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params if p.requires_grad)
