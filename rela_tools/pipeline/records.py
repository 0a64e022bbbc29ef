"""records: whether a run's finished work may be reused, decided in one place for compare and tune.

A run (a system at one setting and seed, ``Task.run_name``) is **trained** once its ``checkpoint_last.pt`` reached the
setting's ``max_update`` on the task's current data; its **result** on a split is reused while it is newer than the
checkpoints and was made under the same evaluate settings (``evaluate_settings`` in the result). Anything else is
trained or scored (again), with a log line that says why.
"""

from __future__ import annotations

import logging
import os

from ..averaging import checkpoint_updates
from ..files import read_json
from .config import Setting, Task, data_changed
from .evaluate import evaluate, result_path
from .prepare import describe_changes
from .train import repair_interrupted_copies, train

logger = logging.getLogger(__name__)


def finished_updates(task: Task, system: str, seed: int, setting: Setting) -> int | None:
    """The updates of a finished run on the current data, or None if it must (still) be trained."""
    checkpoint_dir = task.checkpoint_dir(system, seed, setting)
    last = os.path.join(checkpoint_dir, "checkpoint_last.pt")
    record = os.path.join(checkpoint_dir, "run.json")
    if not (os.path.exists(last) and os.path.exists(record)):
        return None
    if data_changed(task, read_json(record)):
        return None  # train() explains that the data changed
    repair_interrupted_copies(checkpoint_dir)
    updates = checkpoint_updates(last)
    return updates if updates >= setting.train["max_update"] else None


def train_if_needed(task: Task, system: str, seed: int, setting: Setting) -> bool:
    """Train (or resume) the run unless it is finished; whether it trained."""
    updates = finished_updates(task, system, seed, setting)
    if updates is not None:
        logger.info(f"{task.run_name(system, seed, setting)}: trained already ({updates} updates), reusing it")
        return False
    train(task, system, seed=seed, setting=setting)
    return True


def evaluate_if_needed(task: Task, system: str, seed: int, setting: Setting, force: bool = False,
                       split: str = "test") -> dict:
    """The run's result on ``split``: the stored one while it is newer than the checkpoints and made under the same
    evaluate settings (and ``force`` is off: the run was just trained), else a new one."""
    path = result_path(task, system, seed, setting, split)
    last = os.path.join(task.checkpoint_dir(system, seed, setting), "checkpoint_last.pt")
    run = task.run_name(system, seed, setting)
    if not force and os.path.exists(path) and os.path.getmtime(path) > os.path.getmtime(last):
        previous = read_json(path)
        recorded = previous.get("evaluate_settings")
        if recorded == setting.evaluate:
            logger.info(f"{run}: evaluated already on {split}, reusing {path}")
            return previous
        changes = describe_changes(recorded, setting.evaluate) if recorded is not None else "not recorded"
        logger.info(f"{run}: evaluating again, the evaluate settings changed ({changes})")
    return evaluate(task, system, seed=seed, setting=setting, split=split)
