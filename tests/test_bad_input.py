"""Every kind of bad input: one ``lit-qft: error:`` line naming what to change, exit 2, no partial output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lit_qft.cli import main

TINY = "--model.config_overrides={n_layer: 1, n_embd: 64, n_head: 4, n_positions: 64}"


def lm_args(root: Path, source, *extra: str) -> list[str]:
    return [
        "fit", "--data=lit_qft.data.LanguageModelingDataModule", f"--data.source={source}",
        "--data.block_size=32", "--data.batch_size=4", "--data.max_documents=40", TINY,
        "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={root}", "--checkpoint_every_n_steps=1",
        f"--export.output_dir={root / 'quantized'}", "--export.max_val_batches=1", *extra,
    ]


def sentiment_args(root: Path, source, *extra: str) -> list[str]:
    return [
        "fit", "--data=lit_qft.data.SentimentDataModule", f"--data.source={source}",
        "--data.max_length=32", "--data.batch_size=4", TINY, "--trainer.max_steps=1", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
        f"--export.output_dir={root / 'quantized'}", *extra,
    ]


def outputs(root: Path) -> dict[Path, int]:
    """Every file under ``root`` but the run's config.yaml (LightningCLI saves it at setup), with its mtime."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != "config.yaml"}


def fails_cleanly(args: list[str], capsys, *expected: str) -> str:
    """Run ``lit-qft`` in-process; assert exit 2, one error line containing ``expected``, no artefacts."""
    root = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.default_root_dir=")))
    before = outputs(root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("lit-qft: error:")]
    assert len(errors) == 1, err[-3000:]
    assert "Traceback" not in err and "usage:" not in err
    for text in expected:
        assert text in errors[0], errors[0]
    assert outputs(root) == before, "a failed run must not write or change a checkpoint or model"
    return errors[0]


# ---------------------------------------------------------------- names
def test_unknown_recipe(tmp_path, text_file, capsys):
    line = fails_cleanly(lm_args(tmp_path, text_file, "--model.quantization=QAT9000"), capsys,
                         "--model.quantization", "'QAT9000'")
    assert "QAT8da4w" in line and "PTQInt8WeightOnly" in line  # the valid choices are listed


def test_unknown_optimizer(tmp_path, text_file, capsys):
    fails_cleanly(lm_args(tmp_path, text_file, "--model.optimizer=Adamz"), capsys, "--model.optimizer", "'Adamz'", "AdamW")


def test_wrong_type_names_the_nested_flag(tmp_path, text_file, capsys):
    fails_cleanly(lm_args(tmp_path, text_file, "--model.quantization=QAT8da4w", "--model.quantization.group_size=abc"),
                  capsys, "--model.quantization.group_size", "abc")


def test_unknown_flag(tmp_path, text_file, capsys):
    fails_cleanly(lm_args(tmp_path, text_file, "--trainer.max_stepz=3"), capsys, "max_stepz")


# ---------------------------------------------------------------- recipe vs model
@pytest.mark.parametrize("recipe", ["QAT8da4w", "PTQInt4WeightOnly"])
def test_group_size_that_does_not_divide_a_layer(tmp_path, text_file, capsys, recipe):
    fails_cleanly(lm_args(tmp_path, text_file, f"--model.quantization={recipe}", "--model.quantization.group_size=48"),
                  capsys, "--model.quantization.group_size=48", "64")


# ---------------------------------------------------------------- data
def test_missing_data_file(tmp_path, capsys):
    fails_cleanly(lm_args(tmp_path, tmp_path / "missing.txt"), capsys, "--data.source", "missing.txt")


def test_unreadable_data_file(tmp_path, capsys):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "cut off\n')
    fails_cleanly(lm_args(tmp_path, bad), capsys, "--data.source")


def test_empty_dataset(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    fails_cleanly(lm_args(tmp_path, empty), capsys, "--data.source")


def test_missing_column(tmp_path, capsys):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,label\ngood film,positive\nbad film,negative\n" * 5)
    fails_cleanly(sentiment_args(tmp_path, csv), capsys, "--data.text_column", "'text'", "review")


def test_wrong_label_values(tmp_path, capsys):
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\ngood film,positive\nbad film,negative\nodd film,maybe\n" * 5)
    fails_cleanly(sentiment_args(tmp_path, csv), capsys, "maybe")


def test_sequence_longer_than_the_context(tmp_path, text_file, capsys):
    args = lm_args(tmp_path, text_file, "--data.block_size=128", "--data.max_documents=300")
    fails_cleanly(args, capsys, "--data.block_size=128", "64")


def test_tokenizer_that_does_not_match_the_model(tmp_path, text_file, capsys, tiny_gpt2):
    folder = tmp_path / "tiny-model"  # a pretrained model with a 512-token vocabulary ...
    tiny_gpt2.save_pretrained(folder)
    args = [a for a in lm_args(tmp_path, text_file, f"--model.pretrained={folder}") if a != TINY]
    fails_cleanly(args, capsys, "tokenizer", "512")  # ... fed the 50,257-token GPT-2 tokenizer


# ---------------------------------------------------------------- checkpoints and saved models
@pytest.fixture
def qat_run(tmp_path, text_file):
    """A finished QAT8da4w run (group size 32) in ``tmp_path / 'first'``, with its last.ckpt."""
    from lit_qft.cli import build_cli

    root = tmp_path / "first"
    build_cli(lm_args(root, text_file, "--model.quantization=QAT8da4w", "--model.quantization.group_size=32"))
    assert (root / "checkpoints" / "last.ckpt").is_file()
    return root


def test_checkpoint_from_another_recipe_or_model(tmp_path, text_file, capsys, qat_run):
    # Resuming the same folder (--ckpt_path last) under another recipe, group size or model width.
    other_recipe = lm_args(qat_run, text_file, "--model.quantization=QATInt8WeightOnly", "--ckpt_path=last")
    fails_cleanly(other_recipe, capsys, "--ckpt_path", "QAT8da4w", "QATInt8WeightOnly")
    other_group = lm_args(qat_run, text_file, "--model.quantization=QAT8da4w", "--model.quantization.group_size=16",
                          "--ckpt_path=last")
    fails_cleanly(other_group, capsys, "--ckpt_path", "group_size=32")
    wider = [a if a != TINY else TINY.replace("n_embd: 64", "n_embd: 128") for a in
             lm_args(qat_run, text_file, "--model.quantization=QAT8da4w", "--ckpt_path=last")]
    fails_cleanly(wider, capsys, "--ckpt_path", "another model", "hidden_size=64")
    # An explicit path under another recipe (the recipe is not a hyperparameter LightningCLI restores).
    explicit = lm_args(tmp_path / "x", text_file, "--model.quantization=PTQInt8WeightOnly",
                       f"--ckpt_path={qat_run / 'checkpoints' / 'last.ckpt'}")
    fails_cleanly(explicit, capsys, "--ckpt_path", "QAT8da4w", "PTQInt8WeightOnly")


def test_corrupted_checkpoint(tmp_path, text_file, capsys):
    from lit_qft.cli import build_cli

    build_cli(lm_args(tmp_path / "first", text_file, "--model.quantization=QAT8da4w", "--trainer.max_steps=1"))
    good = tmp_path / "first" / "checkpoints" / "last.ckpt"
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    args = lm_args(tmp_path / "c", text_file, "--model.quantization=QAT8da4w", f"--ckpt_path={broken}")
    fails_cleanly(args, capsys, "--ckpt_path", "not a readable checkpoint")
    fails_cleanly(lm_args(tmp_path / "d", text_file, "--model.quantization=QAT8da4w", f"--ckpt_path={tmp_path / 'nope.ckpt'}"),
                  capsys, "--ckpt_path", "does not exist")


def test_corrupted_saved_model(tmp_path, tiny_gpt2):
    from lit_qft import quantization as Q
    from lit_qft.assets import load_tokenizer
    from lit_qft.export import RECIPE_FILE, WEIGHTS_FILE, load_quantized, save_quantized

    recipe = Q.PTQInt8WeightOnly()
    Q.prepare(tiny_gpt2, recipe)
    Q.convert(tiny_gpt2, recipe)
    folder = save_quantized(tiny_gpt2, load_tokenizer("gpt2"), recipe, tmp_path / "q")
    weights = (folder / WEIGHTS_FILE).read_bytes()

    (folder / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 3])
    with pytest.raises(ValueError, match="cannot be loaded safely") as e:
        load_quantized(folder)
    assert "\n" not in str(e.value)

    (folder / WEIGHTS_FILE).write_bytes(weights)
    (folder / RECIPE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=RECIPE_FILE):
        load_quantized(folder)

    (folder / RECIPE_FILE).write_text(json.dumps({"class_path": "lit_qft.quantization.PTQInt8WeightOnly", "init_args": {}}))
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config[: len(config) // 2])
    with pytest.raises(ValueError, match="config.json is corrupted"):
        load_quantized(folder)

    (folder / "config.json").write_text(config)
    model, _, _ = load_quantized(folder)  # repaired: loads again
    assert model.config.n_embd == 64
