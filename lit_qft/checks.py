"""Up-front checks and one-line error messages for input a user can fix.

Everything here turns a problem that would otherwise surface deep inside torch, torchao or
jsonargparse (a shape assert mid-training, a 70-line usage dump) into one line that names the flag
to change. ``lit-qft`` prints it as ``lit-qft: error: <message>`` and exits with status 2.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn


def check_group_size(model: nn.Module, recipe, is_target: Callable[[nn.Module, str], bool]) -> None:
    """Raise ``ValueError`` if the recipe's ``group_size`` does not divide a quantized layer's input width.

    Checked before training starts (torchao would otherwise fail at prepare or, for PTQ, only at
    the conversion after the whole run).
    """
    group_size = getattr(recipe, "group_size", None)
    if not isinstance(group_size, int) or group_size <= 0:
        return
    widths: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and is_target(module, name):
            widths.setdefault(module.in_features, name)
    bad = {w: n for w, n in widths.items() if w % group_size}
    if bad:
        width, layer = next(iter(bad.items()))
        divisors = [g for g in (256, 128, 64, 32, 16) if all(w % g == 0 for w in widths)]
        hint = f"e.g. {divisors[0]}" if divisors else "a divisor of every layer width"
        raise ValueError(
            f"--model.quantization.group_size={group_size} does not divide the input width {width} of layer "
            f"{layer} (widths: {sorted(widths)}); choose a group size that divides them all ({hint})"
        )


# ------------------------------------------------------------------------------------------
# jsonargparse errors as one line
# ------------------------------------------------------------------------------------------
_CLASS_HINTS = {
    "quantization": "a recipe: {recipes}",
    "optimizer": "a torch.optim optimizer such as AdamW or SGD, or a full class path",
    "scheduler": "a torch LR scheduler such as OneCycleLR, or a full class path",
    "data": "a DataModule such as lit_qft.data.LanguageModelingDataModule",
}


def _recipe_names() -> str:
    from lit_qft import quantization as Q

    names = sorted(
        name for name, obj in vars(Q).items()
        if isinstance(obj, type) and issubclass(obj, Q.Recipe) and not name.endswith("Recipe") and not name.startswith("_")
    )
    return ", ".join(names)


def argument_error_line(message: str) -> str:
    """Condense a jsonargparse error (often a nested, multi-line report) into one line naming the flag."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    details = [re.sub(r'Parser key "[^"]+":?', "", line).strip(" -\t") for line in message.splitlines()]
    details = [d for d in details if d and not d.startswith("Problem with given class_path")]
    flag = "--" + ".".join(keys) if keys else ""
    bad_class = re.search(r"Expected a dot import path string: (\S+)", message)
    if bad_class and keys:
        kind = next((hint for k, hint in _CLASS_HINTS.items() if keys[-1].endswith(k)), "a class name or import path")
        if "{recipes}" in kind:
            kind = kind.format(recipes=_recipe_names())
        return f"{flag}: unknown name {bad_class.group(1)!r}; expected {kind}"
    if not keys:
        first = message.strip().splitlines()[0] if message.strip() else "invalid arguments"
        return first + " (see --help)"
    return f"{flag}: {details[-1] if details else 'invalid value'}"


def check_strategy(trainer) -> None:
    """Refuse sharded strategies (FSDP, DeepSpeed, model parallel) with one line naming ``--trainer.strategy``.

    lit-qft converts and saves the whole model in one process at the end of ``fit``, and torchao's
    QAT layers and quantized tensor subclasses (0.18) are used unsharded; DDP (a full copy per
    process) is the supported way to run on several processes or nodes.
    """
    name = type(trainer.strategy).__name__
    if any(s in name for s in ("FSDP", "DeepSpeed", "ModelParallel")):
        raise ValueError(
            f"--trainer.strategy: {name} (sharded weights) is not supported by lit-qft: the conversion to "
            "the quantized model needs the full model in one process; use --trainer.strategy=ddp"
        )
