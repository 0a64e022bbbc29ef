"""train: the paper's fairseq-train settings for one task and system, on whatever devices are present.

**The batch** stays at the config's ``tokens_per_update`` (25K, as the official runs) on any number of devices
(``commands.split_batch``). The split is printed at the start and recorded with the checkpoints (``run.json``); a
resume on another number of devices keeps the tokens per update, logs the new split, and refuses to continue on other
data or another tokens_per_update.

fp16 on GPUs that support it (compute capability 7.0 and newer); ``--cpu`` where there is no GPU. Re-running resumes
from ``checkpoint_last.pt`` (fairseq's own restore), after repairing what a kill during fairseq's checkpoint copies
leaves behind (``repair_interrupted_copies``). One node: fairseq starts one process per GPU itself. Several
nodes: start this on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set; it runs fairseq through torchrun
(NCCL). NPROC_PER_NODE forces torchrun with that many processes per node (on CPUs: gloo, for tests).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict

from ..errors import RelaConfigError, RelaFairseqError
from ..files import atomic_path, read_json, write_json
from .commands import BatchSplit, fairseq_option, overridden_batch, train_command
from .config import Setting, Task, data_changed, data_record
from .fairseq_tool import command as fairseq_command
from .fairseq_tool import prefix as tool_prefix
from .prepare import describe_changes
from .runtime import hardware, tool

logger = logging.getLogger(__name__)
class TrainingFailed(RelaFairseqError):
    def __init__(self, returncode: int, log: str):
        self.returncode = returncode
        super().__init__(f"fairseq-train exited with code {returncode}; its output is in {log}")


def train(task: Task, system: str, extra_args=(), seed: int | None = None, setting: Setting | None = None) -> str:
    """Train (or resume) one system at ``setting`` (default: its own, ``Task.setting``); returns the checkpoint
    folder."""
    if not os.path.exists(os.path.join(task.bin_dir, f"dict.{task.tgt}.txt")):
        raise RelaFairseqError(f"no binarised data for {task.name} in {task.bin_dir}: run "
                               f"scripts/prepare.sh {task.name} first")
    hw = hardware()
    setting = setting or task.setting(system)
    args, split = train_command(task, system, extra_args, hw, seed, setting)
    checkpoint_dir = task.checkpoint_dir(system, seed, setting)
    os.makedirs(checkpoint_dir, exist_ok=True)
    repair_interrupted_copies(checkpoint_dir)
    overridden = overridden_batch(extra_args, split)
    # a resume compares the batch it will run (the user's, where extra options set it) with the one recorded
    record = _check_resume(task, checkpoint_dir, overridden or split, setting)
    if training_complete(checkpoint_dir, args):
        return checkpoint_dir
    logger.info(f"{task.name}/{task.run_name(system, seed, setting)}: {hw.describe()}, fp16={hw.fp16}; "
                f"settings: {setting.describe()} ({setting.source})")
    logger.info(f"batch: {split.describe()}")
    if overridden is not None and overridden.actual != split.actual:
        logger.warning(f"your extra options set the batch: {overridden.describe()}")
    record["history"].append({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "hardware": asdict(hw), "batch": asdict(overridden or split)})
    write_json(os.path.join(checkpoint_dir, "run.json"), record)

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


def training_complete(checkpoint_dir: str, args: list[str]) -> bool:
    """Whether checkpoint_last.pt already holds ``--max-update`` updates; then the removals of old checkpoints that a
    kill may have cut short are done here, and fairseq-train must not run again: it trains one update before it
    checks max_update (``fairseq_cli.train.train``), so every re-run after the last save (a kill during evaluation,
    during fairseq's removals or its exit) would train past max_update."""
    max_update = int(fairseq_option(args, "--max-update") or 0)
    last = os.path.join(checkpoint_dir, "checkpoint_last.pt")
    if max_update <= 0 or not os.path.exists(last):
        return False
    from ..averaging import checkpoint_updates

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


def check_data_unchanged(task: Task, checkpoint_dir: str, record: dict, start_over: str,
                         current: dict | None = None) -> None:
    """Refuse checkpoints trained on other data than the task's now (``record``: their run.json; ``current``: the
    task's ``data_record``, if already computed)."""
    if data_changed(task, record, current):
        raise RelaConfigError(f"the data of {task.name} changed since the checkpoints in {checkpoint_dir} were "
                              "trained (it was prepared again, with other settings or into another vocabulary): they "
                              f"no longer fit it; {start_over}")


def _check_resume(task: Task, checkpoint_dir: str, split: BatchSplit, setting: Setting | None = None) -> dict:
    """The run record of ``checkpoint_dir`` (new, or the one being resumed after checking that it still fits)."""
    path = os.path.join(checkpoint_dir, "run.json")
    data = data_record(task)  # hashes the dictionaries and sentencepiece model: once
    record = {"task": task.name, "quick": task.quick, **data, "tokens_per_update": split.tokens_per_update,
              "history": []}
    if setting is not None:
        record["settings"] = {"train": setting.identity(), "evaluate": setting.evaluate,
                              "overrides": setting.overrides, "source": setting.source}
    has_checkpoint = os.path.exists(os.path.join(checkpoint_dir, "checkpoint_last.pt"))
    if not os.path.exists(path) or not has_checkpoint:
        return record
    previous = read_json(path)
    start_over = (f"remove {checkpoint_dir} (or set CHECKPOINT_ROOT elsewhere) to train from scratch, or restore "
                  "the earlier settings to resume")
    check_data_unchanged(task, checkpoint_dir, previous, start_over, data)
    trained_with = (previous.get("settings") or {}).get("train")
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
    previous.update(record, history=previous.get("history", []))
    return previous


def run_logged(cmd: list[str], log_path: str) -> int:
    """Run ``cmd``, its output shown as it comes and appended to ``log_path`` (after the command line)."""
    logger.info("running: " + " ".join(cmd))
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()  # a killed run's log keeps its last lines, and `tail -f` shows them as they come
        return proc.wait()
