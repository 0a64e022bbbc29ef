"""train: the paper's fairseq-train settings for one task and system, on whatever devices are present.

**The batch** stays at the config's ``tokens_per_update`` (25K, as the official runs) on any number of devices
(``commands.split_batch``). The split is printed at the start and recorded with the checkpoints (``run.json``); a
resume on another number of devices keeps the tokens per update, logs the new split, and refuses to continue on other
data or another tokens_per_update.

fp16 on GPUs that support it (compute capability 7.0 and newer); ``--cpu`` where there is no GPU. Re-running resumes
from ``checkpoint_last.pt`` (fairseq's own restore), after repairing what a kill during fairseq's checkpoint copies
leaves behind (``records.repair_interrupted_copies``). One node: fairseq starts one process per GPU itself. Several
nodes: start this on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set; it runs fairseq through torchrun
(NCCL). NPROC_PER_NODE forces torchrun with that many processes per node (on CPUs: gloo, for tests).

**One process at a time works on a run** (``run_lock``: ``run.lock`` in its checkpoint folder): two fairseq-trains in
one folder would write over each other's checkpoints. train.sh and evaluate.sh wait for the other process; tune.sh
and compare.sh go on to the next run and come back to the busy one last (``share_runs``), so that the same tune.sh or
compare.sh started twice, one thread each, shares the runs between the two (docs/usage.md).
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import TypeVar

from ..errors import RelaFairseqError
from ..files import LockHeld, exclusive_lock, write_json
from .commands import overridden_batch, train_command
from .config import Setting, Task
from .fairseq_tool import command as fairseq_command
from .fairseq_tool import dies_with_this_process
from .fairseq_tool import prefix as tool_prefix
from .records import RUN_RECORD, finished_updates, repair_interrupted_copies, resume_record, training_complete
from .runtime import hardware, tool

logger = logging.getLogger(__name__)
RUN_LOCK = "run.lock"
_held_runs: set[str] = set()  # the run locks this process holds: a holder asking again goes on (train in tune)
Unit = TypeVar("Unit")
Done = TypeVar("Done")


class TrainingFailed(RelaFairseqError):
    def __init__(self, returncode: int, log: str):
        self.returncode = returncode
        super().__init__(f"fairseq-train exited with code {returncode}; its output is in {log}")


@contextmanager
def run_lock(task: Task, system: str, seed: int | None, setting: Setting, wait: bool = True) -> Iterator[None]:
    """Work on one run alone: another process holding it is waited for (``wait``) or raises ``files.LockHeld``. A
    process holding the lock already goes on."""
    path = run_lock_path(task, system, seed, setting)
    if path in _held_runs:
        yield
        return
    run = task.run_name(system, seed, setting)
    with exclusive_lock(path, wait=wait, on_wait=lambda holder: logger.info(
            f"{run}: another process ({holder}) is working on this run; waiting for it")):
        _held_runs.add(path)
        try:
            yield
        finally:
            _held_runs.discard(path)


def run_lock_path(task: Task, system: str, seed: int | None, setting: Setting) -> str:
    return os.path.join(task.checkpoint_dir(system, seed, setting), RUN_LOCK)


def share_runs(task: Task, units: Sequence[Unit], run_of: Callable[[Unit], tuple[str, int, Setting]],
               work: Callable[[Unit], Done]) -> list[Done]:
    """``work(unit)`` for every unit, in order, each under the lock of its run (``run_of(unit)``: system, seed,
    setting); a unit whose run another process holds (the same tune.sh or compare.sh started beside this one) comes
    last, waited for then, so that side-by-side processes each take other runs and train none twice. Returns the
    results in the units' order."""
    done: dict[int, Done] = {}
    busy = []
    for i, unit in enumerate(units):
        try:
            with run_lock(task, *run_of(unit), wait=False):
                done[i] = work(unit)
        except LockHeld as held:
            if held.path != run_lock_path(task, *run_of(unit)):
                raise  # another lock, taken inside the work
            logger.info(f"{task.run_name(*run_of(unit))}: another process ({held.holder}) is working on "
                        "this run; taking the next one and coming back to it last")
            busy.append(i)
    for i in busy:
        with run_lock(task, *run_of(units[i])):
            done[i] = work(units[i])
    return [done[i] for i in range(len(units))]


def train(task: Task, system: str, extra_args=(), seed: int | None = None, setting: Setting | None = None) -> str:
    """Train (or resume) one system at ``setting`` (default: its own, ``Task.setting``); returns the checkpoint
    folder. Another process training the same run is waited for (``run_lock``)."""
    if not os.path.exists(os.path.join(task.bin_dir, f"dict.{task.tgt}.txt")):
        raise RelaFairseqError(f"no binarised data for {task.name} in {task.bin_dir}: run "
                               f"scripts/prepare.sh {task.name} first")
    setting = setting or task.setting(system)
    with run_lock(task, system, seed, setting):
        return _train(task, system, extra_args, seed, setting)


def _train(task: Task, system: str, extra_args, seed: int | None, setting: Setting) -> str:
    hw = hardware()
    args, split = train_command(task, system, extra_args, hw, seed, setting)
    checkpoint_dir = task.checkpoint_dir(system, seed, setting)
    os.makedirs(checkpoint_dir, exist_ok=True)
    repair_interrupted_copies(checkpoint_dir)
    overridden = overridden_batch(extra_args, split)
    # a resume compares the batch it will run (the user's, where extra options set it) with the one recorded
    record = resume_record(task, checkpoint_dir, overridden or split, setting)
    if training_complete(checkpoint_dir, args):
        return checkpoint_dir
    logger.info(f"{task.name}/{task.run_name(system, seed, setting)}: {hw.describe()}, fp16={hw.fp16}; "
                f"settings: {setting.describe()} ({setting.source})")
    logger.info(f"batch: {split.describe()}")
    if overridden is not None and overridden.actual != split.actual:
        logger.warning(f"your extra options set the batch: {overridden.describe()}")
    record["history"].append({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "hardware": asdict(hw), "batch": asdict(overridden or split)})
    write_json(os.path.join(checkpoint_dir, RUN_RECORD), record)

    if hw.nodes > 1 or "NPROC_PER_NODE" in os.environ:
        cmd = [*tool_prefix(), tool("torchrun"), f"--nnodes={hw.nodes}",
               f"--node_rank={os.environ.get('NODE_RANK', '0')}",
               f"--nproc_per_node={hw.procs_per_node}", f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
               f"--master_port={os.environ.get('MASTER_PORT', '29500')}",
               *fairseq_command("fairseq-train-torchrun"), *args]
    else:
        cmd = [*fairseq_command("fairseq-train"), *args]
    log = os.path.join(checkpoint_dir, "train.log")
    returncode = run_logged(cmd, log)
    if returncode != 0:
        raise TrainingFailed(returncode, log)
    return checkpoint_dir


def train_if_needed(task: Task, system: str, seed: int, setting: Setting) -> bool:
    """Train (or resume) the run unless it is finished; whether it trained."""
    updates = finished_updates(task, system, seed, setting)
    if updates is not None:
        logger.info(f"{task.run_name(system, seed, setting)}: trained already ({updates} updates), reusing it")
        return False
    train(task, system, seed=seed, setting=setting)
    return True


def run_logged(cmd: list[str], log_path: str) -> int:
    """Run ``cmd``, its output shown as it comes and appended to ``log_path`` (after the command line)."""
    logger.info("running: " + " ".join(cmd))
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), preexec_fn=dies_with_this_process())
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()  # a killed run's log keeps its last lines, and `tail -f` shows them as they come
        return proc.wait()
