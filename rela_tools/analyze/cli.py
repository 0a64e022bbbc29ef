"""rela-analyze: attention statistics, word alignment and AER, and plots, for rela_fairseq (and stock fairseq
Transformer) checkpoints.

  rela-analyze attention --path CKPT DATA [--gen-subset test]
  rela-analyze align     --path CKPT DATA --gold GOLD [--gold-index-base 1] [--swap] [--subword-text PREFIX]
  rela-analyze aer       GOLD HYP [--gold-index-base 1] [--hyp-index-base 0] [--reverse-gold] [--reverse-hyp]
  rela-analyze plot      {heatmap,stats,aer} ...

Every subcommand prints readable tables, or with --json one JSON object on stdout instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterable, Optional, Sequence

from ..attention_types import ATTENTION_TYPE, ATTENTION_TYPES
from ..errors import RelaFairseqError
from . import NEAR_NULL_MASS
from .align import SEGMENTATIONS


def _pct(value: Optional[float]) -> str:
    return "   n/a" if value is None else f"{100 * value:5.1f}%"


def _num(value: Optional[float], digits: int = 3) -> str:
    return "  n/a" if value is None else f"{value:.{digits}f}"


def attention_table(summary: dict, label: str = "") -> str:
    """Per attention type: overall, then per layer (and each head's sparsity / null rate)."""
    lines = []
    head = f"Attention statistics{(' of ' + label) if label else ''} (valid query-key pairs only; "
    lines.append(head + f"JS diversity in nats, log base {summary['log_base'].split()[0]})")
    for attention_type, data in summary["types"].items():
        o = data["overall"]
        lines.append("")
        lines.append(f"{ATTENTION_TYPE[attention_type].label}: sparsity {_pct(o['sparsity']).strip()}, null rate "
                     f"{_pct(o['null_rate']).strip()}, near-null rate {_pct(o.get('near_null_rate')).strip()} "
                     f"(row mass < {summary.get('near_null_mass', NEAR_NULL_MASS)}), mean row mass "
                     f"{_num(o.get('mass'))}, JS {_num(o['js'])}")
        lines.append("  layer  sparsity  null rate     JS  JS(null=uniform)  per head: sparsity/null")
        for row in data["layers"]:
            heads = "  ".join(f"h{h['head']} {_pct(h['sparsity']).strip()}/{_pct(h['null_rate']).strip()}"
                              for h in row["heads"])
            lines.append(f"  {row['layer'] + 1:5d}  {_pct(row['sparsity'])}    {_pct(row['null_rate'])}  "
                         f"{_num(row['js'])}  {_num(row['js_null_as_uniform']):>16}  {heads}")
    if summary.get("overall_sparsity") is not None:
        lines.append("")
        lines.append(f"all attention: sparsity {_pct(summary['overall_sparsity']).strip()}")
    return "\n".join(lines)


def alignment_table(summary: dict, label: str = "") -> str:
    lines = [f"AER{(' of ' + label) if label else ''} against {summary['gold']} ({summary['sentences']} sentences"
             f"{', links swapped' if summary['swap'] else ''}); lower is better",
             "  layer   best head (normal)   head avg (normal)   best head (shifted)   head avg (shifted)"]
    for row in summary["rows"]:
        def cell(entry: dict, with_head: bool) -> str:
            text = f"{100 * entry['aer']:5.1f}%"
            return text + (f" (h{entry['head']})" if with_head else "     ")
        lines.append(f"  {row['layer'] + 1:5d}   {cell(row['best_head_normal'], True):>18}   "
                     f"{cell(row['avg_normal'], False):>17}   {cell(row['best_head_shifted'], True):>19}   "
                     f"{cell(row['avg_shifted'], False):>18}")
    b = summary["best"]
    lines.append(f"best: layer {b['layer'] + 1}, {'head ' + str(b['head']) if b['head'] != 'avg' else 'head average'}"
                 f", {b['mode']}: AER {100 * b['aer']:.1f}% (P {100 * b['precision']:.1f}% / "
                 f"R {100 * b['recall']:.1f}% / {b['links']} links)")
    return "\n".join(lines)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="binarised data directory (fairseq-preprocess output)")
    p.add_argument("--path", required=True, help="checkpoint file")
    p.add_argument("--gen-subset", default="test", help="subset to teacher-force (default: test)")
    p.add_argument("--max-tokens", type=int, default=4000, help="tokens per batch (default: 4000)")
    p.add_argument("--cuda", action="store_true", help="run on the GPU (default: CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rela-analyze", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("attention", help="sparsity, null-attention rate and JS head diversity per layer and head")
    _add_model_args(p)

    p = sub.add_parser("align", help="hard word alignments from cross-attention, scored against a gold set")
    _add_model_args(p)
    p.add_argument("--gold", required=True, help="gold alignments, one line per sentence of the subset")
    p.add_argument("--gold-index-base", type=int, choices=(0, 1), default=1, help="default 1, as the standard sets")
    p.add_argument("--swap", action="store_true",
                   help="write links as (target word, source word): the gold has the other direction")
    p.add_argument("--segmentation", choices=SEGMENTATIONS, default="auto",
                   help="subword style for the word mapping (default: detected)")
    p.add_argument("--subword-text", metavar="PREFIX",
                   help="the subword text the subset was binarised from (PREFIX.SRC and PREFIX.TGT, as given to "
                        "fairseq-preprocess --testpref): word boundaries of subwords outside the dictionaries, which "
                        "<unk> loses; needed when the subset has <unk>")
    p.add_argument("--output-dir", help="where to write the best settings' alignments (default: beside the "
                                        "checkpoint, alignments-<subset>/)")
    p.add_argument("--null-threshold", type=float, default=0.0, metavar="MASS",
                   help="a cross-attention row whose weights on the source words sum to at most MASS aligns nothing, "
                        "as a null ReLA row (default 0: only rows with no weight at all). For functions that switch "
                        f"off softly (sigmoid, softmax_null) e.g. {NEAR_NULL_MASS}, the near-null threshold of "
                        "`attention`")

    p = sub.add_parser("aer", help="alignment error rate of a hypothesis file against a gold file")
    p.add_argument("gold")
    p.add_argument("hyp")
    p.add_argument("--gold-index-base", type=int, choices=(0, 1), default=1)
    p.add_argument("--hyp-index-base", type=int, choices=(0, 1), default=0)
    p.add_argument("--reverse-gold", action="store_true", help="swap each gold pair")
    p.add_argument("--reverse-hyp", action="store_true", help="swap each hypothesis pair")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("plot", help="figures (PNG, and PDF with --pdf)")
    plots = p.add_subparsers(dest="plot", required=True, metavar="PLOT")
    h = plots.add_parser("heatmap", help="attention heat maps of chosen sentences, one panel per head")
    _add_model_args(h)
    h.add_argument("--sentence", type=int, nargs="+", default=[0], help="sentence ids in the subset (default 0)")
    h.add_argument("--type", choices=[t.name for t in ATTENTION_TYPES], default="cross")
    h.add_argument("--layer", type=int, nargs="+", help="layers, 1-based (default: all)")
    h.add_argument("--output-dir", default="plots")
    h.add_argument("--pdf", action="store_true")
    s = plots.add_parser("stats", help="sparsity and null rate per layer and head, from `attention --json` files")
    s.add_argument("inputs", nargs="+", metavar="LABEL=FILE.json")
    s.add_argument("--output-dir", default="plots")
    s.add_argument("--pdf", action="store_true")
    a = plots.add_parser("aer", help="AER-by-layer curves of several models, from `align --json` files")
    a.add_argument("inputs", nargs="+", metavar="LABEL=FILE.json")
    a.add_argument("--output", default="plots/aer_by_layer.png")
    a.add_argument("--pdf", action="store_true")
    return parser


def _labelled_json(items: Iterable[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = os.path.splitext(os.path.basename(item))[0], item
        try:
            with open(path, encoding="utf-8") as f:
                out[label] = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            parser.error(f"cannot read {path}: {exc}")
    return out


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "aer":
        from .aer import format_score, score_files

        scores = score_files(args.gold, args.hyp, args.gold_index_base, args.hyp_index_base, args.reverse_gold,
                             args.reverse_hyp)
        print(json.dumps(scores) if args.json else format_score(scores))
        return 0

    if args.command == "plot" and args.plot in ("stats", "aer"):
        from . import plots

        inputs = _labelled_json(args.inputs, parser)
        if args.plot == "stats":
            summaries = {k: v.get("attention", v) for k, v in inputs.items()}
            written = []
            for metric in ("sparsity", "null_rate"):
                written += plots.layer_head_stats(summaries, os.path.join(args.output_dir, f"{metric}.png"), metric,
                                                  args.pdf)
        else:
            written = plots.aer_curves({k: v.get("alignment", v) for k, v in inputs.items()}, args.output, args.pdf)
        print("\n".join(written))
        return 0

    from .analysis import analyse
    from .forced import load_model

    if not os.path.exists(args.path):
        parser.error(f"--path {args.path}: no such checkpoint")
    model, task = load_model(args.path, args.data, args.gen_subset, cpu=not args.cuda)
    if args.command == "attention":
        result = analyse(model, task, args.gen_subset, max_tokens=args.max_tokens, progress=not args.json)
        print(json.dumps(result.attention) if args.json else attention_table(result.attention, args.path))
        return 0
    if args.command == "align":
        return _align(args, model, task)
    return _heatmaps(args, model, task)


def _align(args: argparse.Namespace, model: Any, task: Any) -> int:
    from .align import links_text
    from .analysis import AlignmentSettings, analyse

    settings = AlignmentSettings(args.gold, args.gold_index_base, args.swap, args.segmentation, args.subword_text,
                                 args.null_threshold)
    result = analyse(model, task, args.gen_subset, settings, max_tokens=args.max_tokens, progress=not args.json)
    summary, collector = result.alignment, result.collector
    assert summary is not None and collector is not None  # a gold set was given
    out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.path)),
                                              f"alignments-{args.gen_subset}")
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for key in ("best_normal", "best_shifted"):
        entry = summary[key]
        name = f"{key}.layer{entry['layer'] + 1}.{'avg' if entry['head'] == 'avg' else 'head' + str(entry['head'])}" \
               ".align"
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            for links in collector.hypothesis((entry["layer"], entry["head"], entry["mode"])):
                f.write(links_text(links) + "\n")
        files[key] = path
    summary["files"] = files
    if args.json:
        print(json.dumps(summary))
    else:
        print(alignment_table(summary, args.path))
        print("alignments (0-based word indices, i-j" + (", target first" if args.swap else "") + "):")
        for path in files.values():
            print("  " + path)
    return 0


def _heatmaps(args: argparse.Namespace, model: Any, task: Any) -> int:
    from . import plots
    from .forced import forced_batches, sentence_maps

    wanted = set(args.sentence)
    n = len(task.dataset(args.gen_subset))
    bad = sorted(i for i in wanted if not 0 <= i < n)
    if bad:
        raise RelaFairseqError(f"--sentence {bad[0]}: the {args.gen_subset} subset has sentences 0..{n - 1}")
    written = []
    for batch in forced_batches(model, task, args.gen_subset, args.max_tokens):
        for b, sid in enumerate(batch.ids.tolist()):
            if sid not in wanted:
                continue
            maps, rows, cols = sentence_maps(batch, b, args.type, task.source_dictionary, task.target_dictionary)
            for layer, w in sorted(maps.items()):
                if args.layer and layer + 1 not in args.layer:
                    continue
                name = f"sentence{sid}_{args.type}_layer{layer + 1}.png"
                written += plots.heatmap(w, cols, rows, os.path.join(args.output_dir, name),
                                         f"sentence {sid}, {ATTENTION_TYPE[args.type].label}, layer {layer + 1}",
                                         args.pdf)
            wanted.discard(sid)
        if not wanted:
            break
    print("\n".join(written))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, parser)
    except RelaFairseqError as exc:
        sys.stderr.write(f"rela-analyze: error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
