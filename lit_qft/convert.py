"""Convert a saved Lightning checkpoint into a quantized model folder, without retraining.

From the command line::

    lit-qft convert --ckpt_path outputs/run/checkpoints/last.ckpt --output_dir outputs/run/quantized

From Python::

    from lit_qft import convert_checkpoint
    convert_checkpoint("last.ckpt", "quantized")

The checkpoint holds the model's hyperparameters and (since lit-qft writes it there) the recipe, so
no training config is needed. Checkpoints taken during QAT hold the fake-quantized model: converting
one gives exactly the model that ``fit`` would have exported at that step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lit_qft import quantization as Q
from lit_qft.export import folder_size_bytes, recipe_from_dict, save_quantized

RECIPE_KEY = "lit_qft_recipe"


def load_checkpoint_module(ckpt_path: str | Path, recipe: Q.Recipe | None = None, **overrides: Any):
    """Rebuild the ``LitCausalLM`` of a Lightning checkpoint (prepared for its recipe, weights loaded).

    Args:
        ckpt_path: A ``.ckpt`` file written by Lightning while training a ``LitCausalLM``.
        recipe: Override the recipe stored in the checkpoint (it must build the same structure).
        overrides: Other ``LitCausalLM`` arguments to override, e.g. ``task=...`` for non-LM tasks.
    """
    from lit_qft.module import LitCausalLM

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--ckpt_path: checkpoint {ckpt_path} does not exist")
    # A Lightning checkpoint holds tensors, numbers, strings and dicts: no code needs to run.
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"--ckpt_path: {ckpt_path} is not a Lightning checkpoint of a LitCausalLM")
    if recipe is None:
        if RECIPE_KEY not in checkpoint:
            raise ValueError(f"--ckpt_path: {ckpt_path} records no recipe; pass one with --recipe")
        recipe = recipe_from_dict(checkpoint[RECIPE_KEY])
    hparams = {**checkpoint["hyper_parameters"], **overrides, "quantization": recipe}
    hparams.pop("_instantiator", None)
    hparams["compile"] = False
    module = LitCausalLM(**hparams)
    module.configure_model()
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    return module


def convert_checkpoint(
    ckpt_path: str | Path, output_dir: str | Path, recipe: Q.Recipe | None = None, **overrides: Any
) -> Path:
    """Convert a Lightning checkpoint to a quantized folder loadable with :func:`lit_qft.load_quantized`.

    Args:
        ckpt_path: A ``.ckpt`` file written by Lightning while training a ``LitCausalLM``.
        output_dir: Folder to write (atomically; an older one is replaced).
        recipe: Override the recipe stored in the checkpoint, e.g. a PTQ recipe for a float checkpoint.
        overrides: Other ``LitCausalLM`` arguments, e.g. ``task=...`` for non-LM tasks.
    """
    module = load_checkpoint_module(ckpt_path, recipe, **overrides)
    if not module.recipe.quantizes:
        raise ValueError(
            f"--ckpt_path: {ckpt_path} was trained without quantization; pass a recipe, e.g. --recipe=PTQInt8WeightOnly"
        )
    module.convert()
    return save_quantized(module.model, module.tokenizer, module.recipe, output_dir)


def convert_command(ckpt_path: str, output_dir: str, recipe: Q.Recipe | None = None) -> None:
    """Convert a Lightning checkpoint of a lit-qft run into a quantized model folder (no retraining).

    Args:
        ckpt_path: The ``.ckpt`` file (e.g. ``<run>/checkpoints/last.ckpt``).
        output_dir: Folder to write; load it with ``lit_qft.load_quantized`` or ``lit-qft generate``.
        recipe: Recipe to convert with; default: the one recorded in the checkpoint.
    """
    folder = convert_checkpoint(ckpt_path, output_dir, recipe)
    print(f"lit-qft: converted {ckpt_path} -> {folder} ({folder_size_bytes(folder) / 2**20:.2f} MiB on disk)")
