"""tables: every table the pipeline prints, and the number formats they share.

* ``compare_table``: one task, one row per system (compare.sh; the toy task's main job, scripts/toy_demo.sh, too);
* ``results_table``: every result under RESULTS_ROOT in the paper's layout (results.sh);
* ``tune_table``: the grid of tune.sh, per system and point.

Each is Markdown, written beside the JSON it is made from and printed.
"""

from __future__ import annotations

import statistics

from ..analyze import NEAR_NULL_MASS
from ..attention_types import ATTENTION_TYPES
from ..systems import LABELS, SYSTEMS
from .config import format_value
from .significance import mark

TASK_ORDER = ("wmt14_en_de", "wmt14_en_fr", "wmt18_en_fi", "wmt18_zh_en", "wmt16_ro_en", "iwslt14_de_en", "toy")
TASK_LABELS = {"wmt14_en_de": "En-De", "wmt14_en_fr": "En-Fr", "wmt18_en_fi": "En-Fi", "wmt18_zh_en": "Zh-En",
               "wmt16_ro_en": "Ro-En", "iwslt14_de_en": "IWSLT De-En", "toy": "toy"}
HEAD_OFF_RATE = 0.5  # a head counts as switched off when it attends to (almost) nothing for more than half its queries


def mean_sd(values: list) -> dict:
    """Mean and sample standard deviation (None below two values) of the values that are not None, rounded to 2
    decimals, with their number and the values themselves."""
    values = [v for v in values if v is not None]
    return {"mean": round(statistics.mean(values), 2) if values else None,
            "sd": round(statistics.stdev(values), 2) if len(values) > 1 else None, "n": len(values),
            "values": values}


def fmt_mean_sd(stat: dict, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "–"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['sd']:.{digits}f}" if stat["sd"] is not None else "")


def pct(x: float | None) -> str:
    """A share as a percentage with one decimal, without the sign (tables say % in the header)."""
    return "–" if x is None else f"{100 * x:.1f}"


def num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def compare_table(report: dict) -> str:
    """One row per system: its setting, BLEU (mean ± sd over seeds, † where it differs from softmax's significantly)
    and chrF, the brevity penalty, speed × softmax, then sparsity, null rate and JS head diversity per attention type
    (encoder self / decoder self / cross), and where the task has gold word alignments (the toy task) the AER of the
    best layer's best cross-attention head."""
    short = "/".join(t.short for t in ATTENTION_TYPES)
    with_aer = any(s.get("aer") for s in report["systems"].values())
    header = ["system", "setting", "seeds", "BLEU", "chrF", "BP", "train ×softmax", "decode ×softmax",
              f"sparsity % ({short})", f"null rate % ({short})", f"near-null % ({short})", f"JS nats ({short})",
              *(["AER % (normal / shifted)"] if with_aer else []), "train min"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in report["systems"].values():
        per_type = [" / ".join(fmt((s.get(key) or {}).get(t.name)) for t in ATTENTION_TYPES)
                    for key, fmt in (("sparsity", pct), ("null_rate", pct), ("near_null_rate", pct), ("js", num))]
        minutes = s["train_seconds"]["mean"]
        setting = s.get("setting") or {"describe": "shared", "source": "shared"}
        setting_text = setting["describe"] + ("" if setting["source"] == "shared" else f" ({setting['source']})")
        lines.append("| " + " | ".join([
            s["label"], setting_text, str(s["bleu"]["n"]), fmt_mean_sd(s["bleu"]) + mark(s.get("significance")),
            fmt_mean_sd(s["chrf"]), fmt_mean_sd(s.get("brevity_penalty") or mean_sd([]), 2),
            num(s["train_speed"]), num(s["decode_speed"]), *per_type, *([aer_cell(s.get("aer"))] if with_aer else []),
            "–" if minutes is None else f"{minutes / 60:.1f}"]) + " |")
    speed = report["speed"]
    reference = report.get("reference", "softmax")
    notes = [
        "",
        f"{report['task']}{' (QUICK)' if report['quick'] else ''}, test set {report['test_set']}: SacreBLEU "
        f"`{report['signature']}` and chrF, mean ± standard deviation over the seeds; † the difference to "
        f"{reference} is significant (p < 0.05, SacreBLEU's paired bootstrap resampling, 1,000 samples, over the "
        "seed-pooled outputs; with one seed, that seed's). setting: what differs from the config's shared setting, "
        "and where it comes from (config: the task config's systems; tuned: chosen by tune.sh on the validation set). "
        f"BP: brevity penalty. Speed: fairseq's own words/s (training, {speed['updates']} updates from scratch) and "
        f"sentences/s (decoding, about {speed['sentences']} test sentences, every system with the "
        "config's shared decoding settings: beam and length penalty) relative to softmax, "
        f"median over {speed['rounds']} interleaved rounds in the same run. Sparsity and null rate over valid "
        "query-key pairs of the test set (teacher-forced, first seed); near-null: the share of query rows whose "
        f"weights sum to less than {NEAR_NULL_MASS} (a soft switch-off; ReLA's are exact: its null rate); JS head "
        "diversity in nats. "
        + ("AER: alignment error rate against the gold word alignments of the test set, of the cross-attention layer "
           "and head (hN, or avg: the heads' average) that align best, reading each target word's alignment from the "
           "attention of the step that predicts it (normal) or of the step after (shifted), as docs/analysis.md "
           "describes. "
           if with_aer else "") + "train min: fairseq's training time per run.",
    ]
    return "\n".join(lines + notes)




def aer_cell(aer: dict | None) -> str:
    """``12.3 (L2 avg) / 8.1 (L3 h1)``: the AER of the best layer and head (or head average), read normally and
    shifted."""
    if not aer:
        return "–"
    cells = []
    for best in (aer["best_normal"], aer["best_shifted"]):
        head = "avg" if best["head"] == "avg" else f"h{best['head']}"
        cells.append(f"{100 * best['aer']:.1f} (L{best['layer'] + 1} {head})")
    return " / ".join(cells)


def tune_table(report: dict) -> str:
    """One row per system and grid point: the training and decoding values, validation BLEU (mean ± sd over the
    seeds) and validation loss; the chosen point in bold."""
    keys = {section: [key for key in report["grid"].get(section) or {}] for section in ("train", "evaluate")}
    header = ["system", *keys["train"], *keys["evaluate"], "seeds", "valid BLEU", "valid loss", "heads off %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in report["systems"].values():
        for point in entry["points"]:
            values = [format_value(point[section][key]) if key in point[section] else "pinned"
                      for section in ("train", "evaluate") for key in keys[section]]
            bleu, loss = point["valid_bleu"], point["valid_loss"]
            off = point["heads_off"]
            off_pct = {**off, "mean": None if off["mean"] is None else 100 * off["mean"],
                       "sd": None if off["sd"] is None else 100 * off["sd"]}
            cells = [entry["label"], *values, str(bleu["n"]), fmt_mean_sd(bleu, 1), fmt_mean_sd(loss, 3),
                     fmt_mean_sd(off_pct, 0)]
            if point["chosen"]:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
    notes = ["", f"{report['task']}{' (QUICK)' if report['quick'] else ''}: validation set only. valid BLEU: "
             "SacreBLEU of the average of each run's last checkpoints (as evaluated on the test set), mean ± sd over "
             "the seeds; valid loss: fairseq's validation loss (label-smoothed, base 2) at the last update; heads off: "
             f"the share of attention heads that attend to (almost) nothing, their weights summing to less than "
             f"{NEAR_NULL_MASS} (ReLA's exact null rows included), for more than {HEAD_OFF_RATE:.0%} of their "
             "queries (validation set, teacher-forced; all attention types). "
             "pinned: set for this system by the config's systems, not tuned. Bold: the point chosen per system "
             "(highest valid BLEU; ties: lower loss)."]
    return "\n".join(lines + notes)


def results_table(results: list[dict], paper: dict | None = None) -> str:
    """Every result (``results.load_results``) in the paper's layout: one row per system and setting, one column per
    task, ours (the paper's) SacreBLEU; then the signatures."""
    if paper is None:
        from .results import paper_numbers

        paper = paper_numbers()
    cells: dict[tuple[str, str, str], list[dict]] = {}  # (system, setting, column) -> results of every seed
    columns = []
    # the settings each system was run at, in order of appearance
    settings: dict[str, list[str]] = {system: [] for system in SYSTEMS}
    for r in results:
        column = r["task"] + (" (QUICK)" if r.get("quick") else "")
        if column not in columns:
            columns.append(column)
        setting = setting_of(r)
        if setting not in settings[r["system"]]:
            settings[r["system"]].append(setting)
        cells.setdefault((r["system"], setting, column), []).append(r)
    order = {t: i for i, t in enumerate(TASK_ORDER)}
    columns.sort(key=lambda c: (order.get(c.split(" ")[0], len(order)), c))
    header = ["system"] + [TASK_LABELS.get(c.split(" ")[0], c) + (" (QUICK)" if "QUICK" in c else "") for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for system in SYSTEMS:
        for setting in settings[system] or [""]:
            row = [LABELS[system] + (f" ({setting})" if setting else "")]
            for column in columns:
                task = column.split(" ")[0]
                theirs = (paper.get(task) or {}).get(system)
                text = bleu_cell(cells.get((system, setting, column), []))
                if theirs is not None:
                    text += f" ({theirs})"
                row.append(text)
            if any(cells.get((system, setting, c)) for c in columns) or any(
                    (paper.get(c.split(" ")[0]) or {}).get(system) for c in columns):
                lines.append("| " + " | ".join(row) + " |")
    notes = ["", "SacreBLEU, detokenised and case-sensitive: ours (paper's, where the paper reports one); over "
             "several seeds (scripts/compare.sh --seeds) the mean ± standard deviation and their number."]
    signatures = sorted({(r["task"], r["test_set"], r["langpair"], r["sacrebleu"]["signature"]) for r in results})
    for task, test_set, langpair, signature in signatures:
        notes.append(f"- {TASK_LABELS.get(task, task)}: `{test_set}` `-l {langpair}`, `{signature}`")
    tokenized = [r for r in results if "tokenized_bleu" in r]
    for r in tokenized:
        notes.append(f"- {TASK_LABELS.get(r['task'], r['task'])} {LABELS[r['system']]}: "
                     f"{r['tokenized_bleu']['score']:.1f} {r['tokenized_bleu']['label']}")
    return "\n".join(lines + notes)


def setting_of(result: dict) -> str:
    """What a result's run set other than the task's shared settings (``lr 0.002, lenpen 1``), '' for none (and for
    results written before settings were recorded)."""
    overrides = (result.get("setting") or {}).get("overrides") or {}
    return ", ".join(f"{key} {format_value(value)}" for section in ("train", "evaluate")
                     for key, value in (overrides.get(section) or {}).items())


def bleu_cell(runs: list) -> str:
    """One system's SacreBLEU on one task: its score, or over several seeds the mean ± sd (n seeds); a single run of
    a seed other than 1 says so."""
    if not runs:
        return "–"
    scores = [r["sacrebleu"]["score"] for r in runs]
    if len(runs) > 1:
        return f"{fmt_mean_sd(mean_sd(scores))} ({len(runs)} seeds)"
    seed = runs[0].get("seed", 1)
    return f"{scores[0]:.1f}" + (f" (seed {seed})" if seed != 1 else "")
