"""compare: the paper's comparison on one task, end to end: train what is missing, evaluate, analyse the attention of
every system, measure its speed against softmax in the same run, and print one table (Markdown), written beside a
JSON with every number and the plots.

Re-running reuses finished work: a run whose checkpoints reached the config's ``max_update`` on the current data is
not trained again, a result newer than its checkpoints is not evaluated again, an analysis newer than its result is
not recomputed, and the speed measurement is kept once it covers the systems compared. Every stage logs what it does
(and fairseq its own progress).

Each system runs at its own setting (``Task.setting``: the config's ``systems`` and tune.sh's choice on the
validation set, where there is one; ``--shared-setting`` ignores tune.sh's), shown in the table. Every system is
tested against softmax by paired bootstrap resampling (``significance.py``), and every run's learning curve
(validation loss and BLEU per saved checkpoint, ``curves.py``) is plotted.

Outputs, in RESULTS_ROOT/<task>/compare/ (``compare_dir``: ``compare@shared`` for ``--shared-setting``,
``compare@max_update=3000`` for ``--set train.max_update=3000``, so that neither writes over the other):
``compare.md`` (the table), ``compare.json``, ``<run>.analysis.json``, ``speed.json``, ``sparsity.png``,
``null_rate.png``, ``near_null_rate.png`` (per layer and head, one row of panels per system),
``cross_sentence<N>_layer<L>.png`` (cross-attention of test sentence N in layer L, one row per system, one column per
head), ``learning_curves.png``, and where the task has gold word alignments ``aer_by_layer.png``.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import re
import time

from ..analyze.plots import learning_curve_plot
from ..attention_types import ATTENTION_TYPES
from ..errors import MissingDependencyError
from ..files import exclusive_lock, read_json, read_lines, write_json
from ..systems import LABELS
from .commands import training_seconds
from .config import Setting, Task, format_value
from .curves import learning_curve
from .evaluate import evaluate_if_needed, references
from .prepare import prepare
from .records import ResultRecord, finished_updates, newer, reusable_result
from .significance import compare_to_reference
from .tables import compare_table, mean_sd
from .train import share_runs, train_if_needed

logger = logging.getLogger(__name__)
REFERENCE = "softmax"


def compare(task: Task, systems: list[str], seeds: int = 1, mirror: str | None = None) -> dict:
    started = time.time()
    out_dir = compare_dir(task)
    os.makedirs(out_dir, exist_ok=True)
    if REFERENCE not in systems:
        systems = [REFERENCE, *systems]
        logger.info(f"adding {REFERENCE}: speeds and significance are measured against it")
    check_report_dependencies("compare.sh")  # before anything trains: the last step writes plots
    settings = {system: task.setting(system) for system in systems}
    for system, setting in settings.items():
        logger.info(f"{LABELS[system]}: {setting.describe()} ({setting.source})")
    stage = _Stages(1 + len(systems) * seeds * 3 + len(systems) + 3)
    stage("prepare the data")
    prepare(task, mirror=mirror)
    first_seed = task["train"]["seed"]
    seed_list = list(range(first_seed, first_seed + seeds))

    def run(unit: tuple[str, int]) -> dict:
        system, seed = unit
        setting = settings[system]
        stage(f"{LABELS[system]}, seed {seed}: train")
        trained_now = train_if_needed(task, system, seed, setting)
        stage(f"{LABELS[system]}, seed {seed}: evaluate")
        entry = _run_entry(task, system, seed, setting,
                           evaluate_if_needed(task, system, seed, setting, force=trained_now))
        stage(f"{LABELS[system]}, seed {seed}: learning curve")
        entry["curve"] = learning_curve(task, system, seed, setting)
        return entry

    # a second compare.sh of these systems started beside this one takes the runs this one is not on (train.py)
    units = [(system, seed) for system in systems for seed in seed_list]
    entries = share_runs(task, units, lambda unit: (unit[0], unit[1], settings[unit[0]]), run)
    runs: dict[str, list[dict]] = {system: [] for system in systems}
    for (system, _), entry in zip(units, entries):
        runs[system].append(entry)
    for system in systems:
        for entry in _further_finished_seeds(task, system, seed_list, settings[system]):
            stage(f"{LABELS[system]}, seed {entry['seed']}: learning curve")
            entry["curve"] = learning_curve(task, system, entry["seed"], settings[system])
            runs[system].append(entry)

    # the rest once, by one compare.sh at a time: the speed must be measured with nothing else running, and a second
    # one started beside this one then finds it all done
    with exclusive_lock(os.path.join(out_dir, "compare.lock"), lambda holder: logger.info(
            f"another compare.sh ({holder}) is analysing and timing these runs; waiting for it")):
        return _report(task, systems, settings, seed_list, runs, out_dir, stage, started)


def _report(task: Task, systems: list[str], settings: dict[str, Setting], seed_list: list[int],
            runs: dict[str, list[dict]], out_dir: str, stage: _Stages, started: float) -> dict:
    """Analysis, significance, speed, the table and the plots of the finished runs."""
    analyses = {}
    for system in systems:
        stage(f"{LABELS[system]}: attention analysis")
        analyses[system] = _analyse_if_needed(task, system, out_dir)

    stage(f"paired bootstrap resampling against {LABELS[REFERENCE]} on the test set")
    tests = compare_to_reference({s: {r["seed"]: read_lines(r["hyp"]) for r in runs[s]} for s in systems},
                                 references(task, "test"), REFERENCE)

    stage("speed against softmax (nothing else should run meanwhile)")
    speed = _speed_if_needed(task, systems, out_dir, stage)

    stage("table and plots")
    report = {
        "task": task.name,
        "quick": task.quick,
        "test_set": runs[systems[0]][0]["test_set"],
        "seeds": seed_list,
        "reference": REFERENCE,
        "systems": {s: _summary(s, settings[s], runs[s], analyses[s], speed["systems"].get(s), tests.get(s))
                    for s in systems},
        "speed": {k: v for k, v in speed.items() if k != "systems"},
        "signature": runs[systems[0]][0]["signature"],
        "wall_seconds": round(time.time() - started),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(os.path.join(out_dir, "compare.json"), report)
    table = compare_table(report)
    with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plots = _plots(task, systems, analyses, out_dir)
    plots += learning_curve_plot({LABELS[s]: {r["seed"]: r["curve"] for r in runs[s]} for s in systems},
                                 os.path.join(out_dir, "learning_curves.png"), f"{task.name}: validation")
    print(table)
    print(f"\nwritten to {out_dir}: compare.md, compare.json and {len(plots)} plots")
    return report


def compare_dir(task: Task) -> str:
    """Where a comparison's tables and plots go: RESULTS_ROOT/<task>/compare for the systems' own settings, else
    ``compare@`` and what differs (``shared`` for --shared-setting, then each ``--set``)."""
    differs = [] if task.use_tuned else ["shared"]
    differs += [f"{key}={format_value(value)}" for section in ("train", "evaluate")
                for key, value in task.command_line[section].items()]
    return os.path.join(task.results_dir, "compare" + ("@" + ",".join(differs) if differs else ""))


def check_report_dependencies(command: str) -> None:
    """Fail before training anything when the last step (plots) could not run: matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError("matplotlib", f"{command}'s plots",
                                     "pip install 'rela-fairseq[analysis]'  (or: pip install matplotlib)")


class _Stages:
    """Numbered progress lines: ``[compare 3/17] ReLA-g, seed 1: train``."""

    def __init__(self, total: int, name: str = "compare"):
        self.total, self.n, self.name = total, 0, name
        self.logger = logging.getLogger(f"rela_tools.pipeline.{name}")

    def __call__(self, what: str) -> None:
        self.n = min(self.n + 1, self.total)
        self.logger.info(f"[{self.name} {self.n}/{self.total}] {what}")


# --------------------------------------------------------------------------- runs

def _run_entry(task: Task, system: str, seed: int, setting: Setting, result: ResultRecord) -> dict:
    checkpoint_dir = task.checkpoint_dir(system, seed, setting)
    log_path = os.path.join(checkpoint_dir, "train.log")
    seconds = None
    if os.path.exists(log_path):
        with open(log_path, encoding="utf-8") as f:
            seconds = training_seconds(f.read())
    bleu = result["sacrebleu"]
    return {"seed": seed, "run": task.run_name(system, seed, setting), "bleu": bleu["score"],
            "brevity_penalty": _brevity_penalty(bleu.get("text", "")), "chrf": result["chrf"]["score"],
            "train_seconds": seconds, "checkpoint": os.path.join(checkpoint_dir, result["checkpoint"]),
            "hyp": task.result_path(system, seed, setting)[:-len(".json")] + ".hyp",
            "signature": bleu["signature"], "test_set": result["test_set"]}


def _brevity_penalty(text: str) -> float | None:
    """The brevity penalty in SacreBLEU's score line (``... (BP = 0.871 ratio = ...``)."""
    match = re.search(r"BP = ([\d.]+)", text)
    return float(match.group(1)) if match else None


def _further_finished_seeds(task: Task, system: str, seed_list: list[int], setting: Setting) -> list[dict]:
    """Runs of other seeds at the same setting that are finished and evaluated (from an earlier ``--seeds``): they
    count too."""
    entries: list[dict] = []
    prefix = f"{task.run_name(system, None, setting)}-seed"
    if not os.path.isdir(task.checkpoint_root):
        return entries
    for name in sorted(os.listdir(task.checkpoint_root)):
        if not name.startswith(prefix) or not name[len(prefix):].isdigit():
            continue
        seed = int(name[len(prefix):])
        if seed in seed_list or finished_updates(task, system, seed, setting) is None:
            continue
        result = reusable_result(task, system, seed, setting)
        if result is None:
            continue  # not scored, or under other evaluate settings: compare --seeds evaluates it again
        entries.append(_run_entry(task, system, seed, setting, result))
    return entries


# --------------------------------------------------------------------------- analysis and speed

def _analyse_if_needed(task: Task, system: str, out_dir: str) -> dict:
    """Attention statistics of the first seed's decoded checkpoint on the test set, and where the task has gold word
    alignments (the toy task) the alignment scores of every layer: ``{"attention": ..., "alignment": ... or None}``,
    cached beside the table."""
    from ..analyze import AlignmentSettings, analyse, load_model

    path = os.path.join(out_dir, f"{task.run_name(system)}.analysis.json")  # per run: settings never share one
    result_path = task.result_path(system)
    if newer(path, result_path):
        logger.info(f"{system}: attention analysed already, reusing {path}")
        return read_json(path)
    checkpoint = os.path.join(task.checkpoint_dir(system), read_json(result_path)["checkpoint"])
    model, fairseq_task = load_model(checkpoint, task.bin_dir, "test")
    gold = task.path("raw", "test.align")
    analysis = analyse(model, fairseq_task, "test", AlignmentSettings(gold) if os.path.exists(gold) else None)
    summary = {"attention": analysis.attention, "alignment": analysis.alignment}
    write_json(path, summary)
    return summary


def _speed_if_needed(task: Task, systems: list[str], out_dir: str, stage) -> dict:
    from .throughput import measure

    path = os.path.join(out_dir, "speed.json")
    settings = task.get("compare") or {}
    wanted = {"updates": settings.get("speed_updates", 20), "sentences": settings.get("speed_sentences", 200),
              "rounds": settings.get("speed_rounds", 3)}
    checkpoints = {s: os.path.join(task.checkpoint_dir(s), read_json(task.result_path(s))["checkpoint"])
                   for s in systems}
    # decoding runs the evaluated checkpoints with the evaluate settings: a change in either measures again
    made_with = {"evaluate_settings": task["evaluate"],
                 "checkpoints": {s: os.path.getmtime(ckpt) for s, ckpt in checkpoints.items()}}
    if os.path.exists(path):
        cached = read_json(path)
        cached_with = cached.get("made_with", {})
        same = (all(cached.get(k) == v for k, v in wanted.items())
                and cached_with.get("evaluate_settings") == made_with["evaluate_settings"]
                and all(cached_with.get("checkpoints", {}).get(s) == t for s, t in made_with["checkpoints"].items()))
        if set(systems) <= set(cached["systems"]) and same:
            logger.info(f"speed measured already, reusing {path} (delete it to measure again)")
            return cached
    speed = measure(task, checkpoints, progress=lambda what: logger.info(what), reference=REFERENCE, **wanted)
    speed["made_with"] = made_with
    write_json(path, speed)
    return speed


# --------------------------------------------------------------------------- the table

def _summary(system: str, setting: Setting, runs: list[dict], analysis: dict, speed: dict | None,
             test: dict | None) -> dict:
    attention, alignment = analysis["attention"], analysis["alignment"]
    types = attention["types"]
    return {
        "label": LABELS[system],
        "setting": {"describe": setting.describe(), "source": setting.source, "overrides": setting.overrides},
        "runs": runs,
        "bleu": mean_sd([r["bleu"] for r in runs]),
        "chrf": mean_sd([r["chrf"] for r in runs]),
        "brevity_penalty": mean_sd([r["brevity_penalty"] for r in runs]),
        "significance": test,
        "train_seconds": mean_sd([r["train_seconds"] for r in runs]),
        "train_speed": speed and speed["train_ratio"],
        "decode_speed": speed and speed["decode_ratio"],
        "speed_raw": speed,
        "sparsity": {t.name: types[t.name]["overall"]["sparsity"] for t in ATTENTION_TYPES if t.name in types},
        "null_rate": {t.name: types[t.name]["overall"]["null_rate"] for t in ATTENTION_TYPES if t.name in types},
        "near_null_rate": {t.name: types[t.name]["overall"].get("near_null_rate") for t in ATTENTION_TYPES
                           if t.name in types},
        "js": {t.name: types[t.name]["overall"]["js"] for t in ATTENTION_TYPES if t.name in types},
        "overall_sparsity": attention.get("overall_sparsity"),
        "aer": alignment and {key: alignment[key] for key in ("best_normal", "best_shifted")},
    }


def _plots(task: Task, systems: list[str], analyses: dict, out_dir: str) -> list[str]:
    from ..analyze import load_model, plots

    labelled = {LABELS[s]: analyses[s]["attention"] for s in systems}
    written = []
    for metric in ("sparsity", "null_rate", "near_null_rate"):
        written += plots.layer_head_stats(labelled, os.path.join(out_dir, f"{metric}.png"), metric)
    alignments = {LABELS[s]: analyses[s]["alignment"] for s in systems if analyses[s]["alignment"]}
    if alignments:
        written += plots.aer_curves(alignments, os.path.join(out_dir, "aer_by_layer.png"))
    sentences = sorted(set((task.get("compare") or {}).get("heatmap_sentences", [0])))
    maps: dict[int, dict] = {}
    for system in systems:
        checkpoint = os.path.join(task.checkpoint_dir(system), read_json(task.result_path(system))["checkpoint"])
        model, fairseq_task = load_model(checkpoint, task.bin_dir, "test")
        for sentence_id, (src, tgt, layers) in _cross_attention(model, fairseq_task, sentences).items():
            maps.setdefault(sentence_id, {"src": src, "tgt": tgt, "systems": {}})["systems"][LABELS[system]] = layers
    for sentence_id, entry in sorted(maps.items()):
        layers = sorted(next(iter(entry["systems"].values())))
        for layer in layers:
            weights = {label: by_layer[layer] for label, by_layer in entry["systems"].items()}
            path = os.path.join(out_dir, f"cross_sentence{sentence_id}_layer{layer + 1}.png")
            written += plots.heatmap_grid(weights, entry["src"], entry["tgt"], path,
                                          f"{task.name}: cross-attention, test sentence {sentence_id}, "
                                          f"layer {layer + 1}")
    return written


def _cross_attention(model, fairseq_task, sentence_ids: list[int]) -> dict:
    """{sentence id: (source tokens, target tokens, {layer: weights [H, T, S]})} for the wanted test sentences."""
    from ..analyze import forced_batches, sentence_maps

    wanted, found = set(sentence_ids), {}
    for batch in forced_batches(model, fairseq_task, "test"):
        for b, sid in enumerate(batch.ids.tolist()):
            if sid in wanted:
                maps, tgt, src = sentence_maps(batch, b, "cross", fairseq_task.source_dictionary,
                                               fairseq_task.target_dictionary)
                found[sid] = (src, tgt, maps)
        if len(found) == len(wanted):
            break
    return found
