"""``lit-qft``: the LightningCLI entry point (fit, validate, test, predict)."""

from __future__ import annotations

import os
import sys

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from lit_qft.callbacks import QuantizedExport
from lit_qft.module import LitCausalLM
from lit_qft.quantization import Recipe
from lit_qft.runtime import tune_glibc_allocator

# Errors a user can fix from the command line or YAML; shown as one line instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, FloatingPointError, PermissionError)


class LitQFTCLI(LightningCLI):
    """LightningCLI with the quantized export callback and the tokenizer shared by data and model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(QuantizedExport, "export")
        parser.link_arguments("data.init_args.tokenizer", "model.tokenizer")


# Recipes are dataclasses; jsonargparse treats dataclasses as plain groups unless told that
# subclasses are choices (``--model.quantization=QAT8da4w`` / ``class_path:`` in YAML).
set_parsing_settings(subclasses_enabled=[Recipe])


def build_cli(args: list[str] | None = None, run: bool = True) -> LitQFTCLI:
    """Build (and by default run) the CLI; tests call this with ``args=[...]``."""
    return LitQFTCLI(
        LitCausalLM,
        L.LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    tune_glibc_allocator()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        build_cli(args)
    except USER_ERRORS as e:
        if os.environ.get("LIT_QFT_DEBUG") == "1":
            raise
        print(f"lit-qft: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
