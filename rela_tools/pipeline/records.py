"""records: what the pipeline has made and whether it is still valid, decided in one place.

Three kinds of record, each a JSON file with the types below:

* **the prepared data** (``DataRecord``): the fingerprint of the settings it was made from (prepare.py's steps) and
  a digest of the dictionaries and sentencepiece model it holds; a run records it, and its checkpoints fit the data
  while both agree (``data_changed``);
* **a training run** (``RunRecord``, ``run.json`` beside the checkpoints): task, data, tokens per update, the
  training settings and every start's hardware and batch. A resume must fit it (``resume_record``); a run is finished
  once ``checkpoint_last.pt`` holds ``max_update`` updates (``training_complete``, ``finished_updates``), after
  repairing what a kill during fairseq's checkpoint copies leaves behind (``repair_interrupted_copies``);
* **a result** (``ResultRecord``, one JSON per run and split, ``result_path``): scores, the checkpoints decoded and
  the evaluate settings; it is reused while it is newer than the checkpoints and was made under the same evaluate
  settings (``reusable_result``).

Whatever is redone says why, by naming the settings that changed (``describe_changes``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from typing import Any, TypedDict

from ..averaging import checkpoint_updates
from ..errors import RelaConfigError, RelaFairseqError
from ..files import atomic_path, read_json
from .commands import BatchSplit, fairseq_option
from .config import Setting, Task, data_files_digest, data_fingerprint, format_value

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"


class DataRecord(TypedDict):
    data: str | None  # prepare's fingerprint: what the data was made from
    data_files: str | None  # the digest of the binarised dictionaries and the sentencepiece model: what it is


class RunSettings(TypedDict):
    train: dict  # Setting.identity(): what makes the weights
    evaluate: dict
    overrides: dict
    source: str


class RunRecord(TypedDict, total=False):
    task: str
    quick: bool
    data: str | None
    data_files: str | None
    tokens_per_update: int
    settings: RunSettings
    history: list[dict]  # one entry per start: date, hardware, batch


class ResultRecord(TypedDict, total=False):
    task: str
    system: str
    label: str
    seed: int
    quick: bool
    split: str  # test or valid
    test_set: str
    langpair: str
    sentences: int
    sacrebleu: dict  # score, signature, text
    chrf: dict
    tokenized_bleu: dict  # WMT14 En-De only
    checkpoint: str  # the checkpoint decoded: the average of ``checkpoints``
    checkpoints: list[str]
    generation: dict
    evaluate_settings: dict  # all of them: a result is reused only under the same ones
    setting: dict
    generate_speed: Any
    versions: dict
    date: str


# --------------------------------------------------------------------------- what changed

def describe_changes(old: Any, new: Any, where: str = "") -> str:
    """``vocab_size: 8000 -> 10000, model_type: bpe -> unigram``: the settings that differ, by dotted key."""
    if old is None:
        return "no record of the earlier settings"
    if isinstance(old, dict) and isinstance(new, dict):
        parts = [describe_changes(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
                 if k in old and k in new else f"{f'{where}.{k}' if where else k}: "
                 + (f"{old[k]!r} -> (removed)" if k in old else f"(new) {new[k]!r}")
                 for k in sorted(set(old) | set(new), key=str) if old.get(k, ...) != new.get(k, ...)]
        return ", ".join(p for p in parts if p)
    return f"{where or 'value'}: {old!r} -> {new!r}" if old != new else ""

# --------------------------------------------------------------------------- the data

def data_record(task: Task) -> DataRecord:
    """What run.json records of the data a run was trained on."""
    return {"data": data_fingerprint(task), "data_files": data_files_digest(task)}


def data_changed(task: Task, record: RunRecord, current: DataRecord | None = None) -> bool:
    """Whether the task's data (``current``, its ``data_record`` if already computed) differs from what ``record``
    (run.json) was trained on. Records written before ``data_files`` existed are judged by the fingerprint alone."""
    current = current or data_record(task)
    if record.get("data") != current["data"]:
        return True
    return record.get("data_files") is not None and record.get("data_files") != current["data_files"]


def check_data_unchanged(task: Task, checkpoint_dir: str, record: RunRecord, start_over: str,
                         current: DataRecord | None = None) -> None:
    """Refuse checkpoints trained on other data than the task's now (``record``: their run.json; ``current``: the
    task's ``data_record``, if already computed)."""
    if data_changed(task, record, current):
        raise RelaConfigError(f"the data of {task.name} changed since the checkpoints in {checkpoint_dir} were "
                              "trained (it was prepared again, with other settings or into another vocabulary): they "
                              f"no longer fit it; {start_over}")

# --------------------------------------------------------------------------- training runs

def resume_record(task: Task, checkpoint_dir: str, split: BatchSplit, setting: Setting | None = None) -> RunRecord:
    """The run record of ``checkpoint_dir``: a new one, or the one being resumed after checking that its checkpoints
    still fit the task's data, the training settings and the tokens per update (a new device count is logged)."""
    path = os.path.join(checkpoint_dir, RUN_RECORD)
    data = data_record(task)  # hashes the dictionaries and sentencepiece model: once
    record: RunRecord = {"task": task.name, "quick": task.quick, **data, "tokens_per_update": split.tokens_per_update,
                         "history": []}
    if setting is not None:
        record["settings"] = {"train": setting.identity(), "evaluate": setting.evaluate,
                              "overrides": setting.overrides, "source": setting.source}
    has_checkpoint = os.path.exists(os.path.join(checkpoint_dir, "checkpoint_last.pt"))
    if not os.path.exists(path) or not has_checkpoint:
        return record
    previous: RunRecord = read_json(path)
    start_over = (f"remove {checkpoint_dir} (or set CHECKPOINT_ROOT elsewhere) to train from scratch, or restore "
                  "the earlier settings to resume")
    check_data_unchanged(task, checkpoint_dir, previous, start_over, data)
    recorded_settings = previous.get("settings")
    trained_with = recorded_settings["train"] if recorded_settings else None
    if setting is not None and trained_with is not None and trained_with != setting.identity():
        raise RelaConfigError(f"the training settings changed since the checkpoints in {checkpoint_dir} were trained "
                              f"({describe_changes(trained_with, setting.identity())}); {start_over}")
    if previous.get("tokens_per_update") != split.tokens_per_update:
        raise RelaConfigError(f"tokens_per_update is {split.tokens_per_update} in the config but the checkpoints in "
                              f"{checkpoint_dir} were trained with {previous.get('tokens_per_update')}; {start_over}")
    last = previous["history"][-1]["batch"] if previous.get("history") else None
    if last and (last["devices"], last["max_tokens"], last["update_freq"]) != (
            split.devices, split.max_tokens, split.update_freq):
        logger.warning(f"resuming on {split.devices} device(s) (trained so far on {last['devices']}): "
                       f"{last['max_tokens']} x {last['update_freq']} x {last['devices']} becomes "
                       f"{split.max_tokens} x {split.update_freq} x {split.devices}; tokens per update stay at "
                       f"{split.tokens_per_update} ({100 * split.deviation:+.2f}%)")
    history = previous.get("history", [])
    previous.update(record)
    previous["history"] = history
    return previous


def finished_updates(task: Task, system: str, seed: int, setting: Setting) -> int | None:
    """The updates of a finished run on the current data, or None if it must (still) be trained."""
    checkpoint_dir = task.checkpoint_dir(system, seed, setting)
    last = os.path.join(checkpoint_dir, "checkpoint_last.pt")
    record = os.path.join(checkpoint_dir, RUN_RECORD)
    if not (os.path.exists(last) and os.path.exists(record)):
        return None
    if data_changed(task, read_json(record)):
        return None  # train() explains that the data changed
    repair_interrupted_copies(checkpoint_dir)
    updates = checkpoint_updates(last)
    return updates if updates >= setting.train["max_update"] else None


def training_complete(checkpoint_dir: str, args: list[str]) -> bool:
    """Whether checkpoint_last.pt already holds ``--max-update`` updates; then the removals of old checkpoints that a
    kill may have cut short are done here, and fairseq-train must not run again: it trains one update before it
    checks max_update (``fairseq_cli.train.train``), so every re-run after the last save (a kill during evaluation,
    during fairseq's removals or its exit) would train past max_update."""
    max_update = int(fairseq_option(args, "--max-update") or 0)
    last = os.path.join(checkpoint_dir, "checkpoint_last.pt")
    if max_update <= 0 or not os.path.exists(last):
        return False
    updates = checkpoint_updates(last)
    if updates < max_update:
        return False
    removed = remove_old_checkpoints(checkpoint_dir, args)
    logger.info(f"{last} holds {updates} updates, max_update is {max_update}: training is complete"
                + (f" (removed {', '.join(removed)}, as fairseq-train would have after its last save)"
                   if removed else ""))
    return True


def remove_old_checkpoints(checkpoint_dir: str, args: list[str]) -> list[str]:
    """What fairseq's ``save_checkpoint`` removes after each save (``--keep-interval-updates``, its pattern,
    ``--keep-last-epochs``, ``--keep-best-checkpoints``), for a save that was killed before its removals; returns the
    names removed. fairseq keeps each kind at its limit after every save, so applying the limits now removes exactly
    what that save would have."""
    suffix = re.escape(fairseq_option(args, "--checkpoint-suffix") or "")
    names = os.listdir(checkpoint_dir)

    def numbered(pattern: str) -> list[tuple[float, str]]:  # (number, name), the highest first, as fairseq sorts
        return sorted(((float(m.group(1)), m.group(0)) for m in map(re.compile(pattern).fullmatch, names) if m),
                      reverse=True)

    doomed = []
    keep_interval = int(fairseq_option(args, "--keep-interval-updates") or -1)
    if keep_interval > 0:
        interval_saves = numbered(rf"checkpoint_\d+_(\d+){suffix}\.pt")
        pattern = int(fairseq_option(args, "--keep-interval-updates-pattern") or -1)
        if pattern != -1:
            interval_saves = [(n, name) for n, name in interval_saves if n % pattern != 0]
        doomed += [name for _, name in interval_saves[keep_interval:]]
    keep_epochs = int(fairseq_option(args, "--keep-last-epochs") or -1)
    if keep_epochs > 0:
        doomed += [name for _, name in numbered(rf"checkpoint(\d+){suffix}\.pt")[keep_epochs:]]
    keep_best = int(fairseq_option(args, "--keep-best-checkpoints") or -1)
    if keep_best > 0:
        metric = re.escape(fairseq_option(args, "--best-checkpoint-metric") or "loss")
        best = numbered(rf"checkpoint\.best_{metric}_(\d+\.?\d*){suffix}\.pt")
        if "--maximize-best-checkpoint-metric" not in args:
            best = best[::-1]
        doomed += [name for _, name in best[keep_best:]]
    for name in doomed:
        os.remove(os.path.join(checkpoint_dir, name))
    return doomed


# the files fairseq's checkpoint_utils.save_checkpoint writes: checkpoint{epoch}.pt, checkpoint_{epoch}_{updates}.pt,
# checkpoint_best.pt, checkpoint.best_{metric}_{value}.pt and checkpoint_last.pt (not ours, e.g. checkpoint_avg2.pt)
FAIRSEQ_CHECKPOINT = re.compile(r"checkpoint(\d+|_\d+_\d+|_best|\.best_.+|_last)\.pt")


def copy_order(name: str) -> int:
    """Where one of fairseq's names comes in a save (``save_checkpoint``'s order): 0 for the numbered file, which is
    only ever written directly; checkpoint_best.pt, the checkpoint.best_* files and checkpoint_last.pt (1-3) can be
    copies of the save's first file."""
    if name == "checkpoint_best.pt":
        return 1
    if name.startswith("checkpoint.best_"):
        return 2
    return 3 if name == "checkpoint_last.pt" else 0


def is_truncated(path: str) -> bool:
    """Whether ``path`` is a torch.save zip archive cut short (empty, or without its central directory at the end).
    Files in torch's legacy (pre-zip) format are not judged: fairseq's own load reports those."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"" or (head == b"PK\x03\x04" and not zipfile.is_zipfile(path))


def repair_interrupted_copies(checkpoint_dir: str) -> list[str]:
    """Complete the checkpoint copies a killed fairseq-train left truncated; returns the repaired names.

    fairseq writes the first file of a save atomically (``<name>.tmp``, then a rename), then copies it in place to
    the save's other names: checkpoint_best.pt, checkpoint.best_* (``--keep-best-checkpoints``) and
    checkpoint_last.pt (``save_checkpoint``, ``PathManager.copy``). A kill during a copy (preemption, Ctrl-C twice)
    leaves that file cut short, and fairseq's restore then fails on it. The copy's source is the newest complete
    checkpoint written before it: the truncated file is kept as ``<name>.truncated`` and replaced by a copy of that
    source."""
    names = sorted((name for name in os.listdir(checkpoint_dir) if FAIRSEQ_CHECKPOINT.fullmatch(name)), key=copy_order)
    repaired = []
    for target in (name for name in names if copy_order(name) > 0):
        path = os.path.join(checkpoint_dir, target)
        if not is_truncated(path):
            continue
        written = os.path.getmtime(path)
        sources = [os.path.join(checkpoint_dir, name) for name in names if name != target]
        sources = [s for s in sources if os.path.getmtime(s) <= written and not is_truncated(s)]
        if not sources:
            raise RelaFairseqError(
                f"{path} is truncated (fairseq-train was stopped while copying it) and no complete checkpoint "
                f"written before it is left in {checkpoint_dir} to complete it from; remove it to train from scratch "
                "or put a complete checkpoint in its place")
        source = max(sources, key=os.path.getmtime)
        with atomic_path(path) as tmp:  # the cut file moves aside only once its replacement is complete
            shutil.copyfile(source, tmp)
            os.replace(path, path + ".truncated")
        logger.warning(f"{target} was truncated (fairseq-train was stopped while copying it): replaced by a copy of "
                       f"{os.path.basename(source)}, the save it was copied from; the cut file is kept as "
                       f"{target}.truncated")
        repaired.append(target)
    return repaired

# --------------------------------------------------------------------------- results

def result_path(task: Task, system: str, seed: int | None, setting: Setting, split: str = "test") -> str:
    """Where ``evaluate`` writes a run's result: the test set's beside the others (Task.result_path), the validation
    set's under tune/valid/, named after the run and the evaluate settings that differ from the shared ones."""
    if split == "test":
        return task.result_path(system, seed, setting)
    decoding = ",".join(f"{key}={format_value(value)}" for key, value in sorted(setting.overrides["evaluate"].items()))
    name = task.run_name(system, seed, setting) + (f"@{decoding}" if decoding else "")
    return os.path.join(task.tune_dir, "valid", f"{name}.json")


def reusable_result(task: Task, system: str, seed: int | None, setting: Setting, split: str = "test",
                    force: bool = False) -> ResultRecord | None:
    """The run's stored result on ``split`` if it may be reused: newer than the run's last checkpoint and made under
    the same evaluate settings (and ``force`` is off: the run was just trained); else None, logging why."""
    path = result_path(task, system, seed, setting, split)
    last = os.path.join(task.checkpoint_dir(system, seed, setting), "checkpoint_last.pt")
    if force or not os.path.exists(path) or not newer(path, last):
        return None
    previous: ResultRecord = read_json(path)
    recorded = previous.get("evaluate_settings")
    if recorded == setting.evaluate:
        return previous
    changes = describe_changes(recorded, setting.evaluate) if recorded is not None else "not recorded"
    logger.info(f"{task.run_name(system, seed, setting)}: evaluating again, the evaluate settings changed "
                f"({changes})")
    return None


def newer(path: str, *inputs: str) -> bool:
    """Whether ``path`` exists and was written after every one of ``inputs`` (what it was made from)."""
    return os.path.exists(path) and all(os.path.getmtime(path) > os.path.getmtime(i) for i in inputs)
