"""Reading parallel text out of the archives WMT and IWSLT distribute.

An item of a task config names a download, the members holding each side, and optionally their format:

    {download: europarl_v7, src: training/europarl-v7.de-en.en, tgt: training/europarl-v7.de-en.de}
    {download: wmt14_test_full, src: test-full/newstest2014-deen-src.en.sgm,
     tgt: test-full/newstest2014-deen-ref.de.sgm}
    {src_download: train_de, tgt_download: train_en}      (each side its own download: Multi30k)
    {download: wiki_titles, src: wiki/fi-en/titles.fi-en, tgt: wiki/fi-en/titles.fi-en, format: bitext,
     src_column: 1, tgt_column: 0}

Formats (guessed from the member name when not given): ``text`` (a line a sentence; ``.gz`` members are decompressed),
``sgml`` (WMT ``.sgm``: the text of each ``<seg>``, exactly as sacrebleu reads it), ``xml`` (IWSLT ``.xml``, likewise),
``tags`` (IWSLT ``train.tags.*``: the text lines, and the text of ``<title>``/``<description>``), ``bitext``
(``src ||| tgt`` columns), ``tsv``.
A member may be omitted when the download itself is the text file (``.gz`` or plain).
"""

import gzip
import io
import itertools
import os
import re
import shutil
import tarfile
import unicodedata
import zipfile
from typing import IO, cast

from ..errors import RelaFairseqError

FORMATS = ("text", "sgml", "xml", "tags", "bitext", "tsv")
NORMALISATION_VERSION = 2  # recorded by prepare's extract step: raise it when read_side or normalise change
_SEG = re.compile(r"<seg.*?>(.*)</seg>.*?")
_KEPT_TAG = re.compile(r"^<(title|description)>(.*)</\1>$")
# control characters (\r, form feed, NEL, ...) separate words: a space, as Moses' remove-non-printing-char.perl
# (which fairseq's WMT recipes run) makes them; zero-width space and byte-order mark stand between letters: removed
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_INVISIBLE = re.compile(r"[\u200b\ufeff]")


class CorpusError(RelaFairseqError):
    pass


def guess_format(member):
    name = (member or "").lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".sgm"):
        return "sgml"
    if name.endswith(".xml"):
        return "xml"
    if os.path.basename(name).startswith("train.tags."):
        return "tags"
    return "text"


def extract_members(archive, members, out_dir):
    """Extract the named members of ``archive`` (tar, tgz, zip) into ``out_dir`` in one pass over the archive.

    Written to ``out_dir.tmp`` and renamed when complete, so an interrupted extraction is redone, never trusted."""
    members = sorted(set(members))
    tmp = out_dir + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    root = os.path.abspath(tmp)
    found = set()

    def target(name):
        path = os.path.abspath(os.path.join(root, name))
        if not path.startswith(root + os.sep):
            raise CorpusError(f"{archive}: member {name!r} would be written outside {out_dir}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            names = []
            for info in tar:
                names.append(info.name)
                if info.name in members and info.isfile():
                    with cast("IO[bytes]", tar.extractfile(info)) as src, open(target(info.name), "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    found.add(info.name)
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            for name in members:
                if name in names:
                    with zf.open(name) as src, open(target(name), "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    found.add(name)
    else:
        raise CorpusError(f"{archive} is not a tar or zip archive, but the config names members in it: {members}")
    missing = [m for m in members if m not in found]
    if missing:
        shutil.rmtree(tmp)
        files = [n for n in names if not n.endswith("/")]
        raise CorpusError(f"{os.path.basename(archive)} has no member {missing[0]!r} (it holds e.g. "
                          f"{', '.join(files[:8])}{' ...' if len(files) > 8 else ''})")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _text_stream(path):
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="\n")


def read_side(path, fmt=None, column=None):
    """The sentences of one side (a file, possibly .gz), in order."""
    fmt = fmt or guess_format(path)
    if fmt not in FORMATS:
        raise CorpusError(f"unknown format {fmt!r} for {path}; choose one of {', '.join(FORMATS)}")
    member = os.path.basename(path)
    with _text_stream(path) as stream:
        for line in stream:
            if fmt in ("sgml", "xml"):
                if line.lstrip().startswith("<seg "):
                    # the same extraction as sacrebleu, so that references match its own exactly
                    yield re.sub(r"\s+", " ", _SEG.sub(r"\1", line.strip()).strip())
            elif fmt == "tags":
                text = line.strip()
                kept = _KEPT_TAG.match(text)
                if kept:  # talk titles and descriptions are parallel text too (as fairseq's prepare-iwslt14.sh)
                    yield kept.group(2).strip()
                elif not text.startswith("<"):
                    yield line.rstrip("\n")
            elif fmt in ("bitext", "tsv"):
                fields = line.rstrip("\n").split(" ||| " if fmt == "bitext" else "\t")
                if column is None or column >= len(fields):
                    raise CorpusError(f"{member}: line has {len(fields)} {fmt} columns, the config asks for column "
                                      f"{column}")
                yield fields[column]
            else:
                yield line.rstrip("\n")


def read_parallel(src_path, tgt_path, item):
    """The (source, target) sentence pairs of one config item, streamed; an error if the sides differ in length."""
    fmt = item.get("format")
    sides = (read_side(src_path, fmt, item.get("src_column")), read_side(tgt_path, fmt, item.get("tgt_column")))
    for n, (src, tgt) in enumerate(itertools.zip_longest(*sides)):
        if src is None or tgt is None:
            longer, shorter = (src_path, tgt_path) if tgt is None else (tgt_path, src_path)
            raise CorpusError(f"{longer} has more sentences than {shorter} ({n} pairs read); "
                              "the two sides must align line by line")
        yield src, tgt


def normalise(line):
    """Unicode NFC, control characters as spaces, no zero-width spaces, single spaces."""
    line = unicodedata.normalize("NFC", line)
    line = _INVISIBLE.sub("", _CONTROL.sub(" ", line))
    return " ".join(line.split())
