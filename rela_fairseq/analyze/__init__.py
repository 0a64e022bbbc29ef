"""Analysis of trained models: attention sparsity, null attention, head diversity, word alignment (AER).

Library use::

    from rela_fairseq.analyze import load_model, analyse
    model, task = load_model("checkpoints/checkpoint_best.pt", "data-bin")
    report = analyse(model, task, "test", gold="test.align")   # one teacher-forced pass for both
    report["attention"]["types"]["cross"]["overall"]["sparsity"], report["alignment"]["best"]

Command line: ``rela-analyze {attention,align,aer,plot}`` (``python -m rela_fairseq.analyze``).
"""

from .forced import forced_batches, load_model

__all__ = ["analyse", "forced_batches", "load_model", "score_alignments"]


def _progress(task, subset, max_tokens, enabled):
    from tqdm import tqdm

    return tqdm(total=len(task.dataset(subset)), unit=" sentences", desc=f"teacher-forcing {subset}",
                disable=not enabled, mininterval=1)


def analyse(model, task, subset="test", gold=None, gold_index_base=1, swap=False, segmentation="auto",
            max_tokens=4000, progress=True):
    """{'attention': statistics summary, 'alignment': AER summary (when ``gold`` is given)}, and the alignment
    collector (None without gold), from one teacher-forced pass over ``subset``."""
    from .align import AlignmentCollector
    from .metrics import AttentionStats

    stats = AttentionStats()
    collector = AlignmentCollector(task.source_dictionary, task.target_dictionary, segmentation, swap) if gold else None
    with _progress(task, subset, max_tokens, progress) as bar:
        for batch in forced_batches(model, task, subset, max_tokens):
            for (kind, layer), weights in batch.attention.items():
                stats.add(kind, layer, weights, batch.valid_pairs(kind))
            if collector is not None:
                collector.add(batch)
            bar.update(len(batch.ids))
    report = {"attention": stats.summary()}
    if collector is not None:
        report["alignment"] = score_alignments(collector, gold, gold_index_base)
    return report, collector


def score_alignments(collector, gold_path, gold_index_base=1):
    """AER of every setting against the gold; per layer the best head and the head average, normal and shifted."""
    from .aer import AlignmentFileError, read_alignments, score

    gold = read_alignments(gold_path, gold_index_base)
    ids = collector.sentence_ids()
    if len(gold) != len(ids) or ids != list(range(len(ids))):
        raise AlignmentFileError(f"{gold_path} has {len(gold)} lines but the subset has {len(ids)} sentences: the "
                                 "gold must hold one line per sentence of the subset, in order")
    for sid, ((sure, possible), (_, _, src_words, tgt_words)) in enumerate(zip(gold, (collector.words[i] for i in ids))):
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
        row = {"layer": layer}
        for mode in ("normal", "shifted"):
            heads = {h: r for (l, h, m), r in scores.items() if l == layer and m == mode and h != "avg"}
            best = min(heads, key=lambda h: heads[h]["aer"])
            row[f"best_head_{mode}"] = dict(heads[best], head=best)
            row[f"avg_{mode}"] = scores[(layer, "avg", mode)]
        rows.append(row)
    best_setting = min(scores, key=lambda s: scores[s]["aer"])
    best = {mode: min((s for s in scores if s[2] == mode), key=lambda s: scores[s]["aer"])
            for mode in ("normal", "shifted")}
    return {
        "gold": gold_path,
        "sentences": len(ids),
        "swap": collector.swap,
        "rows": rows,
        "best": _setting_entry(best_setting, scores),
        "best_normal": _setting_entry(best["normal"], scores),
        "best_shifted": _setting_entry(best["shifted"], scores),
    }


def _setting_entry(setting, scores):
    layer, head, mode = setting
    return dict(scores[setting], layer=layer, head=head, mode=mode)
