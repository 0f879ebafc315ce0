"""The cache folder and atomic writes: nothing half-written is ever visible under its final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_dir(*parts: str) -> Path:
    """Return ``$LIT_QFT_CACHE/<parts>`` (default ``~/.cache/lit-qft``), creating it."""
    root = Path(os.environ.get("LIT_QFT_CACHE", Path.home() / ".cache" / "lit-qft"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to ``final`` (replacing an old one).

    On error the temporary folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs should get the usual permissions
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} exists; choose another output folder")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary sibling file for writing; rename it to ``final`` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
