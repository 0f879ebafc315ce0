"""Save and load converted (quantized) models as self-contained folders.

A folder holds ``config.json`` (the HF config), the tokenizer files, ``lit_qft_quantization.json``
(the recipe) and ``model.pt`` (the quantized state_dict). Loading rebuilds the model from the
config, gives it the recipe's quantized structure and loads the tensors with
``torch.load(weights_only=True)``: no code from the folder ever runs, and no training config is needed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from lit_qft import quantization as Q
from lit_qft.assets.cache import atomic_dir

RECIPE_FILE = "lit_qft_quantization.json"
WEIGHTS_FILE = "model.pt"


def recipe_to_dict(recipe: Q.Recipe) -> dict:
    return {"class_path": f"lit_qft.quantization.{type(recipe).__name__}", "init_args": dataclasses.asdict(recipe)}


def recipe_from_dict(spec: dict) -> Q.Recipe:
    """Rebuild a recipe; only classes defined in ``lit_qft.quantization`` are accepted."""
    name = spec["class_path"].rsplit(".", 1)[-1]
    cls = getattr(Q, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Q.Recipe)):
        raise ValueError(f"{RECIPE_FILE}: unknown recipe {spec['class_path']!r}")
    return cls(**spec.get("init_args", {}))


def save_quantized(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, recipe: Q.Recipe, folder: str | Path
) -> Path:
    """Write ``model`` (already converted) to ``folder`` atomically and return the folder."""
    folder = Path(folder)
    # Record the model class so load_quantized rebuilds a classifier as a classifier.
    model.config.architectures = [type(model).__name__]
    with atomic_dir(folder) as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe_to_dict(recipe), indent=2))
        torch.save(model.state_dict(), tmp / WEIGHTS_FILE)
    return folder


def load_quantized(folder: str | Path, device: str | torch.device = "cpu"):
    """Load a folder written by :func:`save_quantized`; returns ``(model, tokenizer, recipe)``.

    Example::

        model, tokenizer, _ = load_quantized("outputs/quickstart/quantized")
        ids = tokenizer("In the beginning", return_tensors="pt").input_ids
        print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))
    """
    folder = Path(folder)
    for name in ("config.json", RECIPE_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a lit-qft quantized model folder: {name} is missing")
    try:
        recipe = recipe_from_dict(json.loads((folder / RECIPE_FILE).read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / RECIPE_FILE} is corrupted ({type(e).__name__}: {e}); re-export the model") from None
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder / 'config.json'} is corrupted ({' '.join(str(e).split())[:200]}); re-export the model") from None
    model = _auto_class(config).from_config(config)
    Q.quantize_for_loading(model, recipe)
    try:
        state = torch.load(folder / WEIGHTS_FILE, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{folder / WEIGHTS_FILE} cannot be loaded safely ({type(e).__name__}); re-export it") from None
    check_weights_match_recipe(folder, recipe, model, state)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # A tied lm_head is saved under both names; anything else missing means a mismatched folder.
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, recipe


def check_weights_match_recipe(folder: Path, recipe: Q.Recipe, model: nn.Module, state) -> None:
    """Raise a one-line ``ValueError`` if ``state`` (``model.pt``) was not written under ``recipe``.

    ``model`` already has the recipe's structure (:func:`~lit_qft.quantization.quantize_for_loading`),
    so each of its tensors shows the format the recipe produces. ``load_state_dict(assign=True)``
    would otherwise take float weights under a quantized recipe, or the reverse, without a word.
    """
    if not isinstance(state, dict):
        raise ValueError(f"{folder / WEIGHTS_FILE} holds a {type(state).__name__}, not a state_dict; re-export the model")
    expected = model.state_dict()
    wrong = [(key, Q.weight_format(value), Q.weight_format(expected[key])) for key, value in state.items()
             if key in expected and Q.weight_format(value) != Q.weight_format(expected[key])]
    if wrong:
        key, found, wanted = wrong[0]
        raise ValueError(
            f"{folder}: {RECIPE_FILE} names {recipe!r} but {WEIGHTS_FILE} was not written with it ({len(wrong)} "
            f"tensor(s) differ, e.g. {key} is {found} where the recipe makes {wanted}); put back the "
            f"{RECIPE_FILE} saved with these weights, or re-export the folder with "
            f"`lit-qft convert --ckpt_path <checkpoint> --output_dir {folder}`"
        )


def _auto_class(config):
    """Sequence classifiers (``...ForSequenceClassification``) load as such; everything else as a causal LM."""
    if any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM


def folder_size_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
