"""tune: every system tuned the same way, on the validation set only.

The task config's ``tune.grid`` names the values to try: ``train`` values are trained (one run per combination, each
in a folder of its own, ``Task.run_name``: ``rela_g@lr=0.002``), ``evaluate`` values only change the decoding of
each run (the length penalty). Every run is scored on the validation set (its last checkpoints averaged, as
evaluate does for the test set): SacreBLEU, and fairseq's validation loss at the last update. The best combination per
system (highest validation BLEU, mean over the seeds; ties: lower validation loss, then the grid's order) is written to
RESULTS_ROOT/<task>/tune/tuned.json, where compare.sh, train.sh and evaluate.sh pick it up (``Task.setting``). A key
the config's ``systems`` pins for a system is not tuned for it. The test set is never read.

Re-running reuses finished work as compare does (``records.py``). QUICK=1 keeps two grid points (the first two
combinations of the training values, the first value of each decoding key) for a smoke run.

Outputs, in RESULTS_ROOT/<task>/tune/: ``tune.md`` (the grid per system), ``tune.json`` (every point and run),
``tuned.json`` (the choice), and ``valid/`` (each run's validation result and hypotheses).
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os

from ..errors import RelaConfigError
from ..files import atomic_open, write_json
from ..systems import LABELS
from .config import TUNED_FILE, Setting, Task, format_value
from .curves import run_valid_losses
from .evaluate import evaluate_if_needed
from .prepare import prepare
from .records import data_record, newer
from .tables import HEAD_OFF_RATE, mean_sd, tune_table
from .train import share_runs, train_if_needed

logger = logging.getLogger(__name__)


def grid_points(task: Task, system: str) -> tuple[list[dict], list[dict]]:
    """The training combinations and the decoding combinations tried for ``system``, in the grid's order (the last
    key varies fastest), without the keys the config's ``systems`` pins for it."""
    grid = (task.get("tune") or {}).get("grid") or {}
    if not grid.get("train") and not grid.get("evaluate"):
        raise RelaConfigError(f"the config of {task.name} has no tune.grid: give the values to try, e.g. "
                              "tune: {grid: {train: {lr: [0.001, 0.002]}, evaluate: {lenpen: [0.6, 1.0]}}}")
    pinned = (task.get("systems") or {}).get(system) or {}
    points = []
    for section in ("train", "evaluate"):
        values = {key: vals for key, vals in (grid.get(section) or {}).items()
                  if key not in (pinned.get(section) or {})}
        points.append([dict(zip(values, combination)) for combination in itertools.product(*values.values())])
    train_points, evaluate_points = points
    if task.quick:  # a smoke run: two points
        train_points, evaluate_points = train_points[:2], evaluate_points[:1]
    return train_points, evaluate_points


def tune(task: Task, systems: list[str], seeds: int = 1, mirror: str | None = None) -> dict:
    """Train and score the grid for ``systems`` (see the module's docstring); returns the tune.json report."""
    from .compare import _Stages, check_report_dependencies

    check_report_dependencies("tune.sh")
    grids = {system: grid_points(task, system) for system in systems}
    first_seed = task["train"]["seed"]
    seed_list = list(range(first_seed, first_seed + seeds))
    runs = sum(len(train_points) for train_points, _ in grids.values()) * len(seed_list)
    stage = _Stages(1 + 2 * runs + 1, "tune")
    stage("prepare the data")
    prepare(task, mirror=mirror)

    # a training point's setting: its training values, the decoding left as it is
    trained_at = {(system, index): task.setting(system, point={"train": train_point, "evaluate": {}})
                  for system, (train_points, _) in grids.items() for index, train_point in enumerate(train_points)}

    def score(unit: tuple[str, int, int]) -> list[dict]:  # (system, index of the training point, seed)
        system, index, seed = unit
        train_point, setting = grids[system][0][index], trained_at[(system, index)]
        run = task.run_name(system, seed, setting)
        values = ", ".join(f"{key} {format_value(value)}" for key, value in train_point.items()) or "shared"
        stage(f"{LABELS[system]} {values}, seed {seed}: train ({run})")
        trained_now = train_if_needed(task, system, seed, setting)
        stage(f"{LABELS[system]} {values}, seed {seed}: validation BLEU, heads switched off")
        losses = run_valid_losses(task.checkpoint_dir(system, seed, setting))
        heads_off = heads_off_if_needed(task, system, seed, setting, force=trained_now)
        scored = []
        for evaluate_point in grids[system][1]:
            decoding = task.setting(system, point={"train": train_point, "evaluate": evaluate_point})
            result = evaluate_if_needed(task, system, seed, decoding, force=trained_now, split="valid")
            scored.append({"seed": seed, "run": run, "evaluate": evaluate_point,
                           "valid_bleu": result["sacrebleu"]["score"],
                           "valid_loss": losses[max(losses)] if losses else None,
                           "heads_off": heads_off, "updates": max(losses) if losses else None})
        return scored

    units = [(system, index, seed) for system in systems for index in range(len(grids[system][0]))
             for seed in seed_list]
    # a second tune.sh of these systems started beside this one takes the runs this one is not on (train.py)
    scored_units = dict(zip(units, share_runs(task, units, lambda u: (u[0], u[2], trained_at[u[:2]]), score)))

    report_systems = {}
    for system in systems:
        train_points, evaluate_points = grids[system]
        points = []
        for index, train_point in enumerate(train_points):
            scored_runs = [entry for seed in seed_list for entry in scored_units[(system, index, seed)]]
            for evaluate_point in evaluate_points:
                these = [r for r in scored_runs if r["evaluate"] == evaluate_point]
                point = {"train": train_point, "evaluate": evaluate_point}
                points.append(_point(task.setting(system, point=point), point, these))
        chosen = max(enumerate(points), key=lambda ip: (ip[1]["valid_bleu"]["mean"],
                                                       -(ip[1]["valid_loss"]["mean"] or 0), -ip[0]))[1]
        chosen["chosen"] = True
        report_systems[system] = {"label": LABELS[system], "points": points,
                                  "chosen": {"train": chosen["train"], "evaluate": chosen["evaluate"]}}
        logger.info(f"{LABELS[system]}: chose {chosen['describe']} (validation BLEU {chosen['valid_bleu']['mean']})")

    stage("table and choice")
    report = {"task": task.name, "quick": task.quick, "seeds": seed_list, "grid": task["tune"]["grid"],
              "systems": report_systems, **data_record(task),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(task.tune_dir, exist_ok=True)
    write_json(os.path.join(task.tune_dir, "tune.json"), report)
    write_tuned(task, report)
    table = tune_table(report)
    with atomic_open(os.path.join(task.tune_dir, "tune.md")) as f:
        f.write(table + "\n")
    print(table)
    print(f"\nwritten to {task.tune_dir}: tune.md, tune.json and {TUNED_FILE} (the choice compare.sh uses)")
    return report


def _point(setting: Setting, point: dict, runs: list[dict]) -> dict:
    """One grid point's entry: its values, the setting they make and its runs' validation BLEU and loss (mean ± sd
    over the seeds)."""
    values = [f"{key} {format_value(value)}" for section in ("train", "evaluate")
              for key, value in point[section].items()]
    return {"train": point["train"], "evaluate": point["evaluate"], "overrides": setting.overrides,
            "describe": ", ".join(values) or setting.describe(), "runs": runs,
            "valid_bleu": mean_sd([r["valid_bleu"] for r in runs]),
            "valid_loss": mean_sd([r["valid_loss"] for r in runs]),
            "heads_off": mean_sd([r["heads_off"] for r in runs]), "chosen": False}




def heads_off(attention: dict) -> float:
    """The share of a model's attention heads (every type, layer and head) that are off, attending to (almost)
    nothing, for more than HEAD_OFF_RATE of their queries (``AttentionStats.summary()``): rows whose weights sum to
    less than the near-null mass (``near_null_rate``, ReLA's exact null rows included), so that a soft switch-off
    (sigmoid, softmax's null slot) counts as ReLA's exact one does; softmax's heads cannot. Summaries without the
    near-null rate count exact null rows."""
    rates = [head.get("near_null_rate", head["null_rate"]) for entry in attention["types"].values()
             for layer in entry["layers"] for head in layer["heads"]]
    rates = [rate for rate in rates if rate is not None]
    return round(sum(rate > HEAD_OFF_RATE for rate in rates) / len(rates), 4) if rates else 0.0


def heads_off_if_needed(task: Task, system: str, seed: int, setting: Setting, force: bool) -> float:
    """``heads_off`` of the run's averaged checkpoint on the validation set (teacher-forced), cached beside its
    validation results."""
    from ..analyze import analyse, load_model
    from ..files import read_json
    from .evaluate import averaged_checkpoint

    path = os.path.join(task.tune_dir, "attention", f"{task.run_name(system, seed, setting)}.json")
    last = os.path.join(task.checkpoint_dir(system, seed, setting), "checkpoint_last.pt")
    if not force and newer(path, last):
        return heads_off(read_json(path)["attention"])  # from the summary: the definition of the day
    checkpoint, _ = averaged_checkpoint(task, system, seed, setting)
    model, fairseq_task = load_model(checkpoint, task.bin_dir, "valid")
    attention = analyse(model, fairseq_task, "valid", progress=False).attention
    write_json(path, {"heads_off": heads_off(attention), "attention": attention})
    return heads_off(attention)


def write_tuned(task: Task, report: dict) -> None:
    """tuned.json: the chosen overrides per system, merged into the systems tuned before (tune.sh softmax, then
    tune.sh rela_g, keeps both choices)."""
    from ..files import exclusive_lock, read_json

    path = os.path.join(task.tune_dir, TUNED_FILE)
    with exclusive_lock(path + ".lock"):  # two tuning lanes that finish together both keep their choice
        tuned = read_json(path) if os.path.exists(path) else {"systems": {}}
        for system, entry in report["systems"].items():
            best = next(p for p in entry["points"] if p["chosen"])
            tuned["systems"][system] = {**entry["chosen"], "valid_bleu": best["valid_bleu"]["mean"],
                                        "seeds": report["seeds"], "date": report["date"]}
        tuned["task"], tuned["quick"] = task.name, task.quick
        write_json(path, tuned)
    task._tuned = None  # read again on the next Task.setting


