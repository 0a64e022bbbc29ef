"""results: every JSON result under RESULTS_ROOT as a Markdown table laid out like the paper's, with the paper's
SacreBLEU beside ours (``ours (paper)``), then the signatures."""

import glob
import json
import os

from .config import available_tasks, load_task, output_root
from .tables import results_table


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


def main_results(output=None):
    results = load_results()
    if not results:
        print("no results yet: run scripts/evaluate.sh TASK SYSTEM (or scripts/reproduce.sh) first")
        return 1
    table = results_table(results)
    print(table)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    return 0
