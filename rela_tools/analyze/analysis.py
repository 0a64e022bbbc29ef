"""One teacher-forced pass over a subset: attention statistics and, against a gold set, word-alignment AER."""

from __future__ import annotations

from typing import Any, ContextManager, NamedTuple, Optional, cast

from .aer import AlignmentFileError, read_alignments, score
from .align import AlignmentCollector, read_subword_text
from .forced import forced_batches
from .metrics import AttentionStats


class AlignmentSettings(NamedTuple):
    """How model links are compared with a gold set (``rela-analyze align`` options)."""

    gold: str  # gold alignments, one line per sentence of the subset
    gold_index_base: int = 1  # 1 in the standard sets
    swap: bool = False  # the gold has the other direction: write (target, source) pairs
    segmentation: str = "auto"  # subword style for the word mapping (align.SEGMENTATIONS)
    subword_text: Optional[str] = None  # PREFIX of the subword text the subset was binarised from (PREFIX.SRC, .TGT)
    null_threshold: float = 0.0  # a row whose weights on the source sum to at most this aligns nothing (align.py)


class Analysis(NamedTuple):
    attention: dict  # AttentionStats.summary()
    alignment: Optional[dict]  # score_alignments(), when a gold set was given
    collector: Optional[AlignmentCollector]  # every setting's links, when a gold set was given


def _progress(task: Any, subset: str, enabled: bool) -> ContextManager[Any]:
    from tqdm import tqdm

    return tqdm(total=len(task.dataset(subset)), unit=" sentences", desc=f"teacher-forcing {subset}",
                disable=not enabled, mininterval=1)


def analyse(model: Any, task: Any, subset: str = "test", alignment: AlignmentSettings | None = None,
            max_tokens: int = 4000, progress: bool = True) -> Analysis:
    """Attention statistics of ``subset`` and, with ``alignment``, AER against its gold set, in one pass."""
    stats = AttentionStats()
    collector = None
    if alignment:
        text = None
        if alignment.subword_text:
            languages = (task.cfg.source_lang, task.cfg.target_lang)
            text = read_subword_text(alignment.subword_text, languages, len(task.dataset(subset)))
        collector = AlignmentCollector(task.source_dictionary, task.target_dictionary, alignment.segmentation,
                                       alignment.swap, text, alignment.null_threshold)
    with _progress(task, subset, progress) as bar:
        for batch in forced_batches(model, task, subset, max_tokens):
            for (attention_type, layer), weights in batch.attention.items():
                stats.add(attention_type, layer, weights, batch.valid_pairs(attention_type))
            if collector is not None:
                collector.add(batch)
            bar.update(len(batch.ids))
    scores = (score_alignments(cast(AlignmentCollector, collector), alignment.gold, alignment.gold_index_base)
              if alignment else None)
    return Analysis(stats.summary(), scores, collector)


def score_alignments(collector: AlignmentCollector, gold_path: str, gold_index_base: int = 1) -> dict:
    """AER of every setting against the gold; per layer the best head and the head average, normal and shifted."""
    gold = read_alignments(gold_path, gold_index_base)
    ids = collector.sentence_ids()
    if len(gold) != len(ids) or ids != list(range(len(ids))):
        raise AlignmentFileError(f"{gold_path} has {len(gold)} lines but the subset has {len(ids)} sentences: the "
                                 "gold must hold one line per sentence of the subset, in order")
    words = (collector.words[i] for i in ids)
    for sid, ((_sure, possible), (_, _, src_words, tgt_words)) in enumerate(zip(gold, words)):
        n_src, n_tgt = (src_words[-1] + 1 if src_words else 0), (tgt_words[-1] + 1 if tgt_words else 0)
        if collector.swap:
            n_src, n_tgt = n_tgt, n_src
        for i, j in possible:
            if i >= n_src or j >= n_tgt:
                raise AlignmentFileError(
                    f"{gold_path}, line {sid + 1}: gold link {i + gold_index_base}-{j + gold_index_base} is outside "
                    f"the sentence ({n_src} x {n_tgt} words, index base {gold_index_base}); is the gold in the other "
                    "direction (--swap) or 0-based (--gold-index-base 0)?")
    scores = {setting: score(gold, collector.hypothesis(setting)) for setting in collector.settings()}
    rows = []
    for layer in sorted({s[0] for s in scores}):
        row: dict[str, Any] = {"layer": layer}
        for mode in ("normal", "shifted"):
            heads = {h: r for (lay, h, m), r in scores.items() if lay == layer and m == mode and h != "avg"}
            best = min(heads, key=lambda h: heads[h]["aer"])
            row[f"best_head_{mode}"] = dict(heads[best], head=best)
            row[f"avg_{mode}"] = scores[(layer, "avg", mode)]
        rows.append(row)
    best_setting = min(scores, key=lambda s: scores[s]["aer"])
    best_by_mode = {mode: min((s for s in scores if s[2] == mode), key=lambda s: scores[s]["aer"])
                    for mode in ("normal", "shifted")}
    return {
        "gold": gold_path,
        "sentences": len(ids),
        "swap": collector.swap,
        "rows": rows,
        "best": _setting_entry(best_setting, scores),
        "best_normal": _setting_entry(best_by_mode["normal"], scores),
        "best_shifted": _setting_entry(best_by_mode["shifted"], scores),
    }


def _setting_entry(setting: tuple[int, int | str, str], scores: dict) -> dict:
    layer, head, mode = setting
    return dict(scores[setting], layer=layer, head=head, mode=mode)
