"""``lit-qft``: the LightningCLI entry point (fit, validate, test, predict) plus ``convert`` and ``generate``."""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_qft.callbacks import QuantizedExport
from lit_qft.checks import argument_error_line, check_strategy
from lit_qft.module import LitCausalLM
from lit_qft.quantization import Recipe
from lit_qft.resume import DEFAULT_EVERY_N_STEPS, checkpoint_load_error, resume_callbacks
from lit_qft.runtime import default_precision, tune_glibc_allocator

# Errors a user can fix from the command line or YAML; shown as one line instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, FloatingPointError, PermissionError)


class LitQFTCLI(LightningCLI):
    """LightningCLI with the quantized export callback and the tokenizer shared by data and model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(QuantizedExport, "export")
        parser.link_arguments("data.init_args.tokenizer", "model.tokenizer")
        parser.add_argument(
            "--checkpoint_every_n_steps", type=int, default=DEFAULT_EVERY_N_STEPS,
            help="Write <default_root_dir>/checkpoints/last.ckpt every N steps when no ModelCheckpoint is "
            "configured, so `--ckpt_path last` resumes a killed run (0: off).",
        )

    def instantiate_trainer(self, **kwargs):
        # Resumable by default (docs/reliability.md): per-batch seeds, atomic saves, a step-level last.ckpt.
        if "callbacks" not in kwargs:
            config = self._get(self.config_init, "trainer", default={})
            every = self._get(self.config_init, "checkpoint_every_n_steps", default=DEFAULT_EVERY_N_STEPS)
            kwargs["callbacks"] = resume_callbacks(
                config.get("callbacks"), config.get("enable_checkpointing"), config.get("default_root_dir"), every,
                fitting=self.subcommand == "fit",
            )
        trainer = super().instantiate_trainer(**kwargs)
        check_strategy(trainer)
        return trainer

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here (weights_only=True), before any
        # of our code runs: a corrupted or code-carrying file becomes one line naming --ckpt_path.
        try:
            super()._parse_ckpt_path()
        except Exception as e:
            raise checkpoint_load_error(self.config[self.config.subcommand].get("ckpt_path"), e) from None

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        # Safe by default: a checkpoint never runs code (torch.load(weights_only=True)) unless
        # the user passes --weights_only=false for a checkpoint they trust.
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand] and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = True
        return kwargs


# Recipes are dataclasses; jsonargparse treats dataclasses as plain groups unless told that
# subclasses are choices (``--model.quantization=QAT8da4w`` / ``class_path:`` in YAML).
set_parsing_settings(subclasses_enabled=[Recipe])


def build_cli(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> LitQFTCLI:
    """Build (and by default run) the CLI; tests call this with ``args=[...]``.

    ``exit_on_error=False`` raises jsonargparse's ``ArgumentError`` instead of printing the usage.
    """
    return LitQFTCLI(
        LitCausalLM,
        L.LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        # bf16-mixed where the hardware has native bf16, fp32 elsewhere; shown in --help, saved in config.yaml
        trainer_defaults={"precision": default_precision()},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        parser_kwargs={"exit_on_error": exit_on_error},
    )


def run_tool(name: str, args: list[str]) -> None:
    """``lit-qft convert`` / ``lit-qft generate``: plain functions whose docstrings feed ``--help``."""
    from jsonargparse import auto_cli

    if name == "convert":
        from lit_qft.convert import convert_command as command
    else:
        from lit_qft.generate import generate_command as command
    auto_cli(command, args=args, as_positional=False)


#: Subcommands beside LightningCLI's fit/validate/test/predict, dispatched before it.
TOOLS = ("convert", "generate")


def main(args: list[str] | None = None) -> None:
    tune_glibc_allocator()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] in TOOLS:
            run_tool(argv[0], argv[1:])
        else:
            build_cli(args, exit_on_error=False)
    except SIGTERMException:
        # Lightning stops after the current step; its SystemExit would otherwise exit with status 0.
        print("lit-qft: stopped by SIGTERM; continue with the same command plus --ckpt_path last", file=sys.stderr)
        sys.exit(143)
    except (*USER_ERRORS, ArgumentError) as e:
        if os.environ.get("LIT_QFT_DEBUG") == "1":
            raise
        message = argument_error_line(str(e)) if isinstance(e, ArgumentError) else " ".join(str(e).split())
        print(f"lit-qft: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
