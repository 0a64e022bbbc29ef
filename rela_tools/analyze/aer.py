"""Alignment error rate (Och & Ney 2003), corpus level.

Gold: one sentence a line, ``i-j`` sure and ``ipj`` possible links (sure links count as possible too); hypothesis:
``i-j`` links. Sums over the corpus (not an average of sentence scores):

    precision = Σ|A∩P| / Σ|A|,   recall = Σ|A∩S| / Σ|S|,   AER = 1 − (Σ|A∩S| + Σ|A∩P|) / (Σ|A| + Σ|S|)

Links are read as sets per sentence. ``index_base`` shifts 1-based files to 0-based; ``reverse`` swaps each pair.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..errors import RelaFairseqError

_LINK = re.compile(r"^(\d+)([-p])(\d+)$")


class AlignmentFileError(RelaFairseqError):
    pass


def parse_line(line: str, path: str, lineno: int, index_base: int = 0,
               reverse: bool = False) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(sure links, possible links) of one line; possible includes sure."""
    sure: set[tuple[int, int]] = set()
    possible: set[tuple[int, int]] = set()
    for token in line.split():
        match = _LINK.match(token)
        if not match:
            raise AlignmentFileError(f"{path}, line {lineno}: malformed link {token!r} (expected i-j or ipj)")
        i, kind, j = int(match.group(1)) - index_base, match.group(2), int(match.group(3)) - index_base
        if i < 0 or j < 0:
            raise AlignmentFileError(f"{path}, line {lineno}: link {token!r} is below index base {index_base}")
        link = (j, i) if reverse else (i, j)
        possible.add(link)
        if kind == "-":
            sure.add(link)
    return sure, possible


def read_alignments(path: str, index_base: int = 0,
                    reverse: bool = False) -> list[tuple[set[tuple[int, int]], set[tuple[int, int]]]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except OSError as exc:
        raise AlignmentFileError(f"cannot read {path}: {exc.strerror}") from None
    if lines and lines[-1] == "":
        lines.pop()
    return [parse_line(line, path, n, index_base, reverse) for n, line in enumerate(lines, 1)]


def score(gold: Sequence[tuple[set, set]], hyp: Sequence[set], gold_name: str = "gold",
          hyp_name: str = "hypothesis") -> dict:
    """gold: [(sure, possible)], hyp: [links] (sets of (i, j)); returns aer, precision, recall as fractions."""
    if len(gold) != len(hyp):
        raise AlignmentFileError(f"{gold_name} has {len(gold)} lines but {hyp_name} has {len(hyp)}: they must "
                                 "align sentence by sentence")
    a = s = a_s = a_p = 0
    for (sure, possible), links in zip(gold, hyp):
        a += len(links)
        s += len(sure)
        a_s += len(links & sure)
        a_p += len(links & possible)
    return {
        "aer": 1.0 - (a_s + a_p) / (a + s) if a + s else 0.0,
        "precision": a_p / a if a else 0.0,
        "recall": a_s / s if s else 0.0,
        "links": a,
    }


def score_files(gold_path: str, hyp_path: str, gold_index_base: int = 1, hyp_index_base: int = 0,
                reverse_gold: bool = False, reverse_hyp: bool = False) -> dict:
    gold = read_alignments(gold_path, gold_index_base, reverse_gold)
    hyp = [possible for _, possible in read_alignments(hyp_path, hyp_index_base, reverse_hyp)]
    return score(gold, hyp, gold_path, hyp_path)


def format_score(result: dict) -> str:
    return (f"AER {100 * result['aer']:.1f}% (P {100 * result['precision']:.1f}% / "
            f"R {100 * result['recall']:.1f}% / {result['links']} links)")
