"""Alignment error rate (Och & Ney 2003), corpus level.

Gold: one sentence a line, ``i-j`` sure and ``ipj`` possible links (sure links count as possible too); hypothesis:
``i-j`` links. Sums over the corpus (not an average of sentence scores):

    precision = Σ|A∩P| / Σ|A|,   recall = Σ|A∩S| / Σ|S|,   AER = 1 − (Σ|A∩S| + Σ|A∩P|) / (Σ|A| + Σ|S|)

Links are read as sets per sentence. ``index_base`` shifts 1-based files to 0-based; ``reverse`` swaps each pair.
"""

import re

from ..errors import RelaFairseqError

_LINK = re.compile(r"^(\d+)([-p])(\d+)$")


class AlignmentFileError(RelaFairseqError):
    pass


def parse_line(line, path, lineno, index_base=0, reverse=False):
    """(sure links, possible links) of one line; possible includes sure."""
    sure, possible = set(), set()
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


def read_alignments(path, index_base=0, reverse=False):
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except OSError as exc:
        raise AlignmentFileError(f"cannot read {path}: {exc.strerror}") from None
    if lines and lines[-1] == "":
        lines.pop()
    return [parse_line(line, path, n, index_base, reverse) for n, line in enumerate(lines, 1)]


def score(gold, hyp, gold_name="gold", hyp_name="hypothesis"):
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


def score_files(gold_path, hyp_path, gold_index_base=1, hyp_index_base=0, reverse_gold=False, reverse_hyp=False):
    gold = read_alignments(gold_path, gold_index_base, reverse_gold)
    hyp = [possible for _, possible in read_alignments(hyp_path, hyp_index_base, reverse_hyp)]
    return score(gold, hyp, gold_path, hyp_path)


def format_score(result):
    return (f"AER {100 * result['aer']:.1f}% (P {100 * result['precision']:.1f}% / "
            f"R {100 * result['recall']:.1f}% / {result['links']} links)")
