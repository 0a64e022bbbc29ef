"""results: every JSON result under RESULTS_ROOT as a Markdown table laid out like the paper's, with the paper's
SacreBLEU beside ours (``ours (paper)``), then the signatures."""

import glob
import json
import os
import statistics

from ..systems import LABELS, SYSTEMS
from .config import available_tasks, format_value, load_task, output_root

TASK_ORDER = ("wmt14_en_de", "wmt14_en_fr", "wmt18_en_fi", "wmt18_zh_en", "wmt16_ro_en", "iwslt14_de_en", "toy")
TASK_LABELS = {"wmt14_en_de": "En-De", "wmt14_en_fr": "En-Fr", "wmt18_en_fi": "En-Fi", "wmt18_zh_en": "Zh-En",
               "wmt16_ro_en": "Ro-En", "iwslt14_de_en": "IWSLT De-En", "toy": "toy"}


def load_results(results_root=None):
    root = results_root or output_root("RESULTS_ROOT", "results")
    results = []
    for path in sorted(glob.glob(os.path.join(root, "*", "*.json"))):
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        if "sacrebleu" in result and "system" in result:
            results.append(result)
    return results


def paper_numbers():
    numbers = {}
    for name in available_tasks():
        numbers[name] = load_task(name, quick=False).get("paper") or {}
    return numbers


def markdown_table(results, paper=None):
    paper = paper if paper is not None else paper_numbers()
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
        return f"{statistics.mean(scores):.1f} ± {statistics.stdev(scores):.1f} ({len(runs)} seeds)"
    seed = runs[0].get("seed", 1)
    return f"{scores[0]:.1f}" + (f" (seed {seed})" if seed != 1 else "")


def main_results(output=None):
    results = load_results()
    if not results:
        print("no results yet: run scripts/evaluate.sh TASK SYSTEM (or scripts/reproduce.sh) first")
        return 1
    table = markdown_table(results)
    print(table)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    return 0
