"""toy-report: softmax and ReLA side by side on the toy task: BLEU, chrF, sparsity, null rate, JS head diversity and
best-layer AER against the task's gold alignments, and the plots.

Runs after ``reproduce toy softmax`` and ``reproduce toy rela_g`` (the README's main command does all three).
"""

import os

from ..attention_types import ATTENTION_TYPES
from ..errors import RelaFairseqError
from ..files import read_json, write_json
from ..systems import LABELS


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _js(x):
    """JS diversity is undefined (None) where no query had two live heads, e.g. in a one-head model."""
    return "n/a" if x is None else f"{x:.3f}"


def analyse_system(task, system, progress=True):
    from ..analyze import AlignmentSettings, analyse, load_model

    result_path = task.result_path(system)
    if not os.path.exists(result_path):
        raise RelaFairseqError(f"no result for {task.name}/{system}: run scripts/reproduce.sh {task.name} {system}")
    result = read_json(result_path)
    checkpoint = os.path.join(task.checkpoint_dir(system), result["checkpoint"])
    model, fairseq_task = load_model(checkpoint, task.bin_dir, "test")
    analysis = analyse(model, fairseq_task, "test", AlignmentSettings(task.path("raw", "test.align")),
                       progress=progress)
    return result, analysis, model, fairseq_task


def best_layer(alignment, key):
    rows = alignment["rows"]
    best = min(rows, key=lambda r: r[key]["aer"])
    return best[key]["aer"], best["layer"], best[key].get("head")


def table(rows_by_system):
    systems = list(rows_by_system)
    width = 44
    lines = [f"{'':{width}}" + "".join(f"{LABELS[s]:>14}" for s in systems)]

    def add(label, values):
        lines.append(f"{label:{width}}" + "".join(f"{v:>14}" for v in values))

    add("SacreBLEU", [f"{r['result']['sacrebleu']['score']:.1f}" for r in rows_by_system.values()])
    add("chrF", [f"{r['result']['chrf']['score']:.1f}" for r in rows_by_system.values()])
    add("sparsity, all attention", [_pct(r["attention"]["overall_sparsity"]) for r in rows_by_system.values()])
    for metric, label, fmt in (("sparsity", "  sparsity", _pct), ("null_rate", "null rate", _pct),
                               ("js", "JS head diversity (nats)", _js)):
        for t in ATTENTION_TYPES:
            add(f"{label}, {t.short}", [fmt(r["attention"]["types"][t.name]["overall"][metric])
                                           for r in rows_by_system.values()])
    for key, label in (("best_head_normal", "AER best layer, best head, normal"),
                       ("avg_normal", "AER best layer, head average, normal"),
                       ("best_head_shifted", "AER best layer, best head, shifted"),
                       ("avg_shifted", "AER best layer, head average, shifted")):
        cells = []
        for r in rows_by_system.values():
            aer, layer, head = best_layer(r["alignment"], key)
            cells.append(f"{100 * aer:.1f}% (L{layer + 1})")
        add(label, cells)
    return "\n".join(lines)


def toy_report(task, systems=("softmax", "rela_g"), progress=True):
    from ..analyze import forced_batches, plots, sentence_maps

    plot_dir = os.path.join(task.results_dir, "plots")
    rows, written = {}, []
    for system in systems:
        result, analysis, model, fairseq_task = analyse_system(task, system, progress)
        rows[system] = {"result": result, "attention": analysis.attention, "alignment": analysis.alignment}
        write_json(os.path.join(task.results_dir, f"{system}.analysis.json"),
                   {"attention": analysis.attention, "alignment": analysis.alignment})
        # the first test sentence's cross-attention, every layer
        batch = next(forced_batches(model, fairseq_task, "test", max_tokens=200))
        b = batch.ids.tolist().index(min(batch.ids.tolist()))
        maps, tgt, src = sentence_maps(batch, b, "cross", fairseq_task.source_dictionary,
                                       fairseq_task.target_dictionary)
        for layer, w in sorted(maps.items()):
            written += plots.heatmap(w, src, tgt, os.path.join(plot_dir, f"{system}_cross_layer{layer + 1}.png"),
                                     f"{LABELS[system]}: cross-attention, layer {layer + 1}, test sentence "
                                     f"{int(batch.ids[b])}")
    labelled = {LABELS[s]: r["attention"] for s, r in rows.items()}
    written += plots.layer_head_stats(labelled, os.path.join(plot_dir, "sparsity.png"), "sparsity")
    written += plots.layer_head_stats(labelled, os.path.join(plot_dir, "null_rate.png"), "null_rate")
    written += plots.aer_curves({LABELS[s]: r["alignment"] for s, r in rows.items()},
                                os.path.join(plot_dir, "aer_by_layer.png"))
    sentences = next(iter(rows.values()))["result"]["sentences"]
    print()
    print(f"Toy task, {sentences} test sentences ({task.results_dir})")
    print(table(rows))
    print()
    print("SacreBLEU signature: " + next(iter(rows.values()))["result"]["sacrebleu"]["signature"])
    print("Sparsity and null rate over valid query-key pairs only; JS in nats; AER against the generated gold "
          "alignments (sure and possible links), word level.")
    print(f"Plots ({len(written)} files) in {plot_dir}:")
    for path in written:
        print("  " + os.path.relpath(path))
    return rows
