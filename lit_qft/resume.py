"""Resume any run where it stopped, with the same result as a run that never stopped.

Lightning restores the weights, optimizer, LR schedule and loop counters from ``last.ckpt``
(``lit-qft fit ... --ckpt_path last``). What it does not do by itself is added here:

* :func:`resumable_loader`: the training DataLoader is a torchdata ``StatefulDataLoader`` over a
  seeded ``DistributedSampler``, so the order of examples depends only on (seed, epoch, number of
  processes) and a checkpoint taken mid-epoch resumes on the next batch, not at the epoch start.
  The same global batches are seen with 1 or N processes.
* :class:`ResumeState`: random numbers (dropout) are re-seeded from (seed, epoch, batch) before
  every training batch, so they do not depend on what ran before (validation, a restart); the seed
  travels in the checkpoint. Checkpoints are written to a temporary sibling file and renamed.
* :func:`check_checkpoint`: a checkpoint written for another model or recipe is refused with a
  one-line error before any tensor is loaded.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

#: How often ``last.ckpt`` is written when the run configures no ModelCheckpoint of its own.
DEFAULT_EVERY_N_STEPS = 50


def resumable_loader(
    dataset: Dataset, *, batch_size: int, seed: int, collate_fn=None, num_workers: int = 0,
    trainer: L.Trainer | None = None, drop_last: bool = False,
) -> StatefulDataLoader:
    """A shuffled training DataLoader whose order depends only on ``seed``, the epoch and the world size.

    It is a ``DistributedSampler`` over all processes even for one process: rank ``r`` of ``N``
    takes every ``N``-th example of the same permutation, so a global batch of ``N x batch_size``
    holds the same examples as one process with ``N x batch_size``. Lightning calls
    ``set_epoch`` each epoch and saves the loader's position in every checkpoint.
    """
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
    return StatefulDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
        persistent_workers=num_workers > 0, drop_last=drop_last,
    )


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic saves and one-line load errors for Lightning checkpoints.

    Saving: ``torch.save`` to a temporary file next to the target, fsync, then rename over it, so a
    process killed while saving leaves the previous checkpoint intact (Lightning's own save goes
    through the system temp folder, which is not atomic across file systems).

    Loading: ``weights_only=True`` unless the caller asks otherwise; a file holding pickled code, a
    truncated file or a missing one becomes a ``ValueError`` / ``FileNotFoundError`` naming ``--ckpt_path``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        path = Path(path)
        if "://" in str(path):  # remote storage: keep Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is None:
            weights_only = True
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"--ckpt_path {path} does not exist")
        try:
            return pl_load(path, map_location=map_location, weights_only=weights_only)
        except Exception as e:
            raise checkpoint_load_error(path, e, weights_only) from None


def checkpoint_load_error(path: Any, error: Exception, weights_only: bool = True) -> Exception:
    """A one-line error for a checkpoint that cannot be loaded: code inside, truncated, corrupted."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, pickle.UnpicklingError) and weights_only:
        return ValueError(
            f"--ckpt_path {path} was refused: it holds Python objects that could run code when loaded "
            f"({first[:200]}); pass --weights_only=false only for a checkpoint you trust"
        )
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(f"--ckpt_path {path} does not exist")
    if isinstance(error, (RuntimeError, EOFError, OSError, pickle.UnpicklingError)):
        return ValueError(f"--ckpt_path {path} is not a readable checkpoint (truncated or corrupted: {first[:200]})")
    return error


def _batch_seed(base: int, epoch: int, batch_idx: int) -> int:
    return (((base % 2**31) * 1_000_003 + epoch) * 1_000_003 + batch_idx) % 2**63


class ResumeState(L.Callback):
    """Makes a resumed ``fit`` continue exactly as if it had never stopped (added by ``lit-qft fit``).

    * Re-seeds torch's RNG from (seed, epoch, batch index) before every training batch: dropout
      masks then do not depend on anything that ran before, such as a validation pass or a restart.
      The seed is ``seed_everything``'s (or torch's initial seed) and is saved in the checkpoint.
    * Writes checkpoints atomically and loads them safely (:class:`SafeCheckpointIO`).
    """

    def __init__(self) -> None:
        self.seed: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(_batch_seed(self.seed, trainer.current_epoch, batch_idx))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict.get("seed", self.seed)


def default_checkpoint(root_dir: str | os.PathLike | None, every_n_train_steps: int) -> ModelCheckpoint:
    """``<root_dir>/checkpoints/last.ckpt`` every ``every_n_train_steps`` steps (only the last is kept).

    The folder is fixed (not under a logger's ``version_N``), so ``--ckpt_path last`` in a new
    run finds the checkpoint of the previous one.
    """
    dirpath = Path(root_dir or os.getcwd()) / "checkpoints"
    return ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps)


def resume_callbacks(
    callbacks: Any, enable_checkpointing: bool | None, root_dir: Any, every_n_train_steps: int, fitting: bool = True
) -> list:
    """The user's callbacks plus :class:`ResumeState` and, for ``fit`` when none is configured, :func:`default_checkpoint`."""
    if callbacks is None:
        callbacks = []
    elif not isinstance(callbacks, list):
        callbacks = [callbacks]
    callbacks = list(callbacks)
    if not any(isinstance(c, ResumeState) for c in callbacks):
        callbacks.append(ResumeState())
    wants_checkpoints = fitting and enable_checkpointing is not False and every_n_train_steps > 0
    if wants_checkpoints and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        callbacks.append(default_checkpoint(root_dir, every_n_train_steps))
    return callbacks


# ------------------------------------------------------------------------------------------
# Refusing a checkpoint from another model or recipe
# ------------------------------------------------------------------------------------------
_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def model_signature(model: torch.nn.Module) -> dict[str, Any]:
    """The architecture facts a checkpoint must share with the model it is loaded into."""
    config = getattr(model, "config", None)
    sig: dict[str, Any] = {"class": type(model).__name__}
    for field in _SHAPE_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, (int, str)):
            sig[field] = value
    return sig


def _describe_difference(saved: dict, current: dict) -> str:
    keys = sorted(set(saved) | set(current), key=str)
    diffs = [f"{k}={saved.get(k)!r} (this run: {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]
    return ", ".join(diffs[:4])


def check_checkpoint(checkpoint: dict[str, Any], model: torch.nn.Module, recipe_dict: dict[str, Any], path: Any = None) -> None:
    """Raise a one-line ``ValueError`` if ``checkpoint`` was written for another model or recipe."""
    where = f"--ckpt_path {path}" if path else "the checkpoint"
    saved_model = checkpoint.get("lit_qft_model")
    if saved_model is not None and model is not None:
        current = model_signature(model)
        if saved_model != current:
            raise ValueError(
                f"{where} was written for another model ({_describe_difference(saved_model, current)}); "
                "use the same --model settings as the run that wrote it, or start without --ckpt_path"
            )
    saved_recipe = checkpoint.get("lit_qft_recipe")
    if saved_recipe is not None and saved_recipe != recipe_dict:
        name = lambda d: d.get("class_path", "?").rsplit(".", 1)[-1]  # noqa: E731
        if name(saved_recipe) != name(recipe_dict):
            detail = f"--model.quantization={name(saved_recipe)} (this run: {name(recipe_dict)})"
        else:
            detail = _describe_difference(saved_recipe.get("init_args", {}), recipe_dict.get("init_args", {}))
            detail = f"--model.quantization={name(saved_recipe)} with {detail}"
        raise ValueError(
            f"{where} was written with {detail}; resume with the same recipe, or start without --ckpt_path"
        )
