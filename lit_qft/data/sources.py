"""Where examples come from: built-in offline corpora, local files, or Hugging Face hub datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError

#: Local file suffixes and the ``datasets`` builder that reads them.
FILE_BUILDERS = {".txt": "text", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _builtin_names() -> tuple[str, ...]:
    from lit_qft.assets.corpora import BUILTIN_CORPORA

    return tuple(BUILTIN_CORPORA)


def resolve_text_source(source: str) -> Path:
    """A built-in corpus name (``web-english``) or a path to a local file (checked to exist)."""
    path = Path(source).expanduser()
    if source in _builtin_names():
        from lit_qft.assets.corpora import builtin_corpus

        return builtin_corpus(source)
    if path.suffix:
        if not path.is_file():
            raise FileNotFoundError(f"--data.source: file {source!r} does not exist")
        return path
    raise ValueError(f"--data.source: {source!r} is neither a built-in corpus ({', '.join(_builtin_names())}) nor a file")


def describe(source: str, split: str) -> str:
    return source if Path(source).suffix or source in _builtin_names() else f"{source} (split {split!r})"


def load_source(source: str, split: str = "train", subset: str | None = None) -> Dataset:
    """Load ``source`` as a :class:`datasets.Dataset`.

    Args:
        source: A built-in corpus (``web-english``, ``rotten-tomatoes``, ``bible-en-es``), a local
            ``.txt`` (one example per line, column ``text``) / ``.csv`` / ``.json`` / ``.jsonl`` /
            ``.parquet`` file, a local dataset folder, or a hub dataset id (``stanfordnlp/sst2``).
        split: Split of a hub dataset or folder (local files have only ``train``).
        subset: Configuration name of a hub dataset (``wikitext-2-raw-v1``, ``en-es``).
    """
    path = Path(source).expanduser()
    if source in _builtin_names() or path.suffix:
        path = resolve_text_source(source)
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"--data.source: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_BUILDERS)}"
            )
        # Each local file is one split called "train"; validation is split off by val_fraction.
        try:
            return load_dataset(builder, data_files=str(path), split="train")
        except DatasetGenerationError as e:  # malformed JSON/CSV/parquet: one line, not a traceback
            cause = e.__cause__ or e
            detail = " ".join(str(cause).split())[:200]
            raise ValueError(f"--data.source: cannot read {path} as {path.suffix} ({detail})") from None
    if path.is_dir():
        return load_dataset(str(path), subset, split=split)
    try:
        return load_dataset(source, subset, split=split)
    except FileNotFoundError as e:  # hub id that does not exist, or no network
        raise FileNotFoundError(
            f"--data.source: cannot load {source!r} (subset {subset!r}, split {split!r}) from the hub or disk "
            f"({type(e).__name__}); check the name, or use a local file or a built-in corpus"
        ) from None
    except (ConnectionError, OSError) as e:
        raise ValueError(
            f"--data.source: cannot reach the hub for {source!r} ({type(e).__name__}); "
            "use a local file or a built-in corpus offline"
        ) from None


def check_columns(ds: Dataset, columns: dict[str, str], where: str) -> None:
    """Raise a one-line error when a configured column (``{flag: column}``) is missing."""
    for flag, column in columns.items():
        if column not in ds.column_names:
            raise ValueError(
                f"--data.{flag}: column {column!r} not found in {where}; it has columns {ds.column_names}"
            )


def check_not_empty(ds: Dataset, where: str) -> None:
    if len(ds) == 0:
        raise ValueError(f"--data.source: {where} contains no examples")


def drop_empty(ds: Dataset, columns: Sequence[str], num_proc: int | None = None) -> Dataset:
    """Drop rows whose text columns are missing or whitespace (blank lines of a .txt file)."""

    def keep(batch):
        return [all(isinstance(v, str) and v.strip() for v in row) for row in zip(*(batch[c] for c in columns))]

    return ds.filter(keep, batched=True, num_proc=num_proc, desc="Dropping empty rows")
