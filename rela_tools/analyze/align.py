"""Word alignments from cross-attention (docs/analysis.md).

The reference is teacher-forced. For target subword y_i:

* **normal**: the attention row that predicts y_i (decoder input y_{i-1});
* **shifted** (Chen et al. 2020): the row where y_i is the decoder input (it predicts y_{i+1}).

The link goes to the argmax over the source subwords, EOS and padding excluded. A row with no weight on any source
subword (a null ReLA row, or one that attends to EOS only) emits **no link**: fairseq's ``--print-alignment`` would
pick position 0 there. ``null_threshold`` extends that to rows with almost no weight (sigmoid, softmax+null): a row
whose weights on the source subwords sum to at most it emits no link either (0 by default: exactly no weight).
Subword links become word links (a word pair is aligned if any of their subwords are), for
sentencepiece (``▁`` starts a word) and subword-nmt BPE (``@@`` continues one). Per layer: every head, and the head
average. ``swap`` writes (target word, source word) pairs, for gold sets in the other direction (RWTH De-En is
German-first: an En→De model's links are swapped).

Word boundaries come from the subword strings. A subword outside the model's dictionary is binarised as ``<unk>``,
which has lost its ``▁`` or ``@@``: its sentence's words are then read from the subword text the subset was binarised
from (``read_subword_text``), and without that text the collector refuses the sentence rather than miscount its words.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..errors import RelaFairseqError

if TYPE_CHECKING:  # torch only for the type checker: rela-analyze aer runs without it
    import torch

    from .forced import ForcedBatch

SEGMENTATIONS = ("auto", "spm", "bpe", "none")


def detect_segmentation(token_lists: Iterable[Iterable[str]]) -> str:
    for tokens in token_lists:
        for token in tokens:
            if token.startswith("\u2581"):
                return "spm"
            if token.endswith("@@"):
                return "bpe"
    return "none"


def word_index(tokens: Sequence[str], segmentation: str) -> list[int]:
    """The word each subword belongs to (0-based)."""
    index: list[int] = []
    word = -1
    for position, token in enumerate(tokens):
        if segmentation == "spm":
            starts = position == 0 or token.startswith("\u2581")
        elif segmentation == "bpe":
            starts = position == 0 or not tokens[position - 1].endswith("@@")
        else:
            starts = True
        word += starts
        index.append(word)
    return index


class SubwordTextError(RelaFairseqError):
    """The subword text of a subset is missing, or does not match the binarised subset."""


def read_subword_text(prefix: str, languages: tuple[str, str], n_sentences: int) -> tuple[list, list]:
    """(source, target) subword lists of every sentence, from ``PREFIX.SRC`` and ``PREFIX.TGT``: the text given to
    ``fairseq-preprocess`` as ``--testpref PREFIX`` (or --validpref ...)."""
    sides = []
    for lang in languages:
        path = f"{prefix}.{lang}"
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.split() for line in f]
        except OSError as exc:
            raise SubwordTextError(f"--subword-text {prefix}: cannot read {path} ({exc.strerror}); give the prefix of "
                                   f"the subword text the subset was binarised from ({prefix}.{languages[0]} and "
                                   f"{prefix}.{languages[1]})") from exc
        if len(lines) != n_sentences:
            raise SubwordTextError(f"{path} has {len(lines)} lines but the subset has {n_sentences} sentences: give "
                                   "the subword text the subset was binarised from")
        sides.append(lines)
    return sides[0], sides[1]


def hard_links(rows: torch.Tensor, target_positions: Sequence[int], shifted: bool,
               null_threshold: float = 0.0) -> set[tuple[int, int]]:
    """Subword links {(source subword, target subword)} from cross-attention ``rows`` [T, S'] of one sentence.

    ``rows`` holds only the real source subwords as columns (EOS and padding already removed) and one row per
    decoder step (padding included); ``target_positions`` are the steps that predict the real target subwords (EOS
    and padding excluded: 0..n-1 for fairseq's right-padded targets), and the i-th of them is target subword i. A row
    whose weights sum to at most ``null_threshold`` aligns nothing."""
    links: set[tuple[int, int]] = set()
    if rows.size(-1) == 0:
        return links
    for i, position in enumerate(target_positions):
        row = rows[position + 1] if shifted else rows[position]
        if float(row.sum()) > null_threshold:  # a row without (enough) weight on the source words aligns nothing
            links.add((int(row.argmax()), i))
    return links


def to_words(links: Iterable[tuple[int, int]], src_words: Sequence[int], tgt_words: Sequence[int],
             swap: bool = False) -> set[tuple[int, int]]:
    pairs = {(src_words[s], tgt_words[t]) for s, t in links}
    return {(t, s) for s, t in pairs} if swap else pairs


class AlignmentCollector:
    """Word links per setting (layer, head or 'avg', 'normal' | 'shifted') and sentence id."""

    def __init__(self, src_dict: Any, tgt_dict: Any, segmentation: str = "auto", swap: bool = False,
                 subword_text: tuple[list, list] | None = None, null_threshold: float = 0.0) -> None:
        """``subword_text``: (source, target) subword lists per sentence id (``read_subword_text``), or None to read
        the subwords from the dictionaries."""
        self.src_dict, self.tgt_dict = src_dict, tgt_dict
        if segmentation == "auto":  # from the whole vocabularies: a sentence may have no split word to show it
            segmentation = detect_segmentation([src_dict.symbols, tgt_dict.symbols])
        self.segmentation, self.swap = segmentation, swap
        self.subword_text = subword_text
        self.null_threshold = null_threshold
        # setting -> {sentence id: set of word links}
        self.links: defaultdict[tuple[int, int | str, str], dict[int, set[tuple[int, int]]]] = defaultdict(dict)
        # sentence id -> (source subwords, target subwords, source words, target words)
        self.words: dict[int, tuple[list[str], list[str], list[int], list[int]]] = {}

    def add(self, batch: ForcedBatch) -> None:
        pad, eos = batch.pad, batch.eos
        cross = {layer: w for (attention_type, layer), w in batch.attention.items() if attention_type == "cross"}
        for b, sid in enumerate(batch.ids.tolist()):
            src = batch.src_tokens[b]
            src_positions = (src.ne(pad) & src.ne(eos)).nonzero().squeeze(-1)
            tgt = batch.target[b]
            tgt_positions = (tgt.ne(pad) & tgt.ne(eos)).nonzero().squeeze(-1)  # --left-pad-target pads in front
            target_rows = tgt_positions.tolist()
            src_tokens = [self.src_dict[int(t)] for t in src[src_positions]]
            tgt_tokens = [self.tgt_dict[int(t)] for t in tgt[tgt_positions]]
            if self.subword_text is not None:
                src_tokens = self._text_tokens(0, sid, src_tokens)
                tgt_tokens = self._text_tokens(1, sid, tgt_tokens)
            if self.subword_text is None and self.segmentation != "none":
                self._refuse_unknown_subwords(sid, src_tokens, self.src_dict, "source")
                self._refuse_unknown_subwords(sid, tgt_tokens, self.tgt_dict, "target")
            src_words, tgt_words = word_index(src_tokens, self.segmentation), word_index(tgt_tokens, self.segmentation)
            self.words[sid] = (src_tokens, tgt_tokens, src_words, tgt_words)
            for layer, weights in cross.items():
                rows = weights[b][:, :, src_positions]  # [H, T, S'] real source subwords only
                heads: dict[int | str, torch.Tensor] = {h: rows[h] for h in range(rows.size(0))}
                heads["avg"] = rows.mean(0)
                for head, head_rows in heads.items():
                    for mode in ("normal", "shifted"):
                        links = hard_links(head_rows, target_rows, mode == "shifted", self.null_threshold)
                        self.links[(layer, head, mode)][sid] = to_words(links, src_words, tgt_words, self.swap)

    def _text_tokens(self, side: int, sid: int, binarised: list[str]) -> list[str]:
        assert self.subword_text is not None
        tokens = self.subword_text[side][sid]
        if len(tokens) != len(binarised):
            raise SubwordTextError(
                f"sentence {sid} (line {sid + 1}) of the subword text has {len(tokens)} {('source', 'target')[side]} "
                f"subwords but the binarised subset has {len(binarised)} ({' '.join(binarised[:8])} ...): give the "
                "subword text the subset was binarised from")
        return tokens

    @staticmethod
    def _refuse_unknown_subwords(sid: int, tokens: list[str], dictionary: Any, side: str) -> None:
        unk = getattr(dictionary, "unk_word", "<unk>")
        if unk in tokens:
            raise SubwordTextError(
                f"sentence {sid} has a {side} subword outside the model's dictionary ({unk}, position "
                f"{tokens.index(unk)}), whose word boundary the dictionary lost, so its words cannot be counted; pass "
                "--subword-text PREFIX, the subword text the subset was binarised from (fairseq-preprocess "
                "--testpref PREFIX)")

    def settings(self) -> list[tuple[int, int | str, str]]:
        return sorted(self.links, key=lambda s: (s[0], s[2], -1 if s[1] == "avg" else s[1]))

    def sentence_ids(self) -> list[int]:
        return sorted(self.words)

    def hypothesis(self, setting: tuple[int, int | str, str]) -> list[set[tuple[int, int]]]:
        """Links of every sentence, in sentence-id order."""
        by_id = self.links[setting]
        return [by_id[sid] for sid in self.sentence_ids()]


def links_text(links: Iterable[tuple[int, int]]) -> str:
    """0-based ``i-j`` pairs, sorted: the usual hypothesis format (a gold set's format: ``toy.gold_links_text``)."""
    return " ".join(f"{i}-{j}" for i, j in sorted(links))

