"""train: the paper's fairseq-train settings for one task and system, scaled to the GPUs present.

Tokens per update stay at the config's ``tokens_per_update`` (about 25K for the WMT tasks) whatever the hardware:
``--update-freq = ceil(tokens_per_update / (max_tokens × GPUs × nodes))``. fp16 on GPUs that support it (compute
capability 7.0 and newer); ``--cpu`` where there is no GPU. Re-running resumes from ``checkpoint_last.pt`` (fairseq's
own restore). One node: fairseq starts one process per GPU itself. Several nodes: start this on every node with
NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set; it runs fairseq through torchrun (NCCL). NPROC_PER_NODE forces
torchrun with that many processes per node (on CPUs: gloo, for tests).
"""

import logging
import math
import os
import subprocess
import sys

from ..systems import system_args
from .prepare import tool

logger = logging.getLogger("rela_fairseq.pipeline")
USER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# config key -> fairseq-train option
OPTIONS = {
    "arch": "--arch",
    "lr": "--lr",
    "warmup_updates": "--warmup-updates",
    "warmup_init_lr": "--warmup-init-lr",
    "max_update": "--max-update",
    "max_tokens": "--max-tokens",
    "dropout": "--dropout",
    "attention_dropout": "--attention-dropout",
    "activation_dropout": "--activation-dropout",
    "label_smoothing": "--label-smoothing",
    "weight_decay": "--weight-decay",
    "clip_norm": "--clip-norm",
    "save_interval_updates": "--save-interval-updates",
    "keep_interval_updates": "--keep-interval-updates",
    "keep_last_epochs": "--keep-last-epochs",
    "validate_interval_updates": "--validate-interval-updates",
    "log_interval": "--log-interval",
    "seed": "--seed",
}
DEFAULTS = {"warmup_init_lr": 1e-07, "label_smoothing": 0.1, "seed": 1, "log_interval": 100, "weight_decay": 0.0,
            "keep_last_epochs": 5}


def hardware():
    """(GPUs on this node, fp16 supported, nodes, processes per node)."""
    import torch

    gpus = torch.cuda.device_count()
    fp16 = gpus > 0 and torch.cuda.get_device_capability(0)[0] >= 7
    nodes = _env_int("NNODES", 1)
    procs = _env_int("NPROC_PER_NODE", max(gpus, 1))
    return gpus, fp16, nodes, procs


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        from ..errors import RelaConfigError

        raise RelaConfigError(f"{name}={value!r}: expected a positive integer")
    return int(value)


def train_command(task, system, extra_args=(), gpus=0, fp16=False, nodes=1, procs=1):
    """The fairseq-train options (list) for ``system`` on ``task``, and the update frequency they use."""
    settings = dict(DEFAULTS, **task["train"])
    devices = procs * nodes
    update_freq = max(1, math.ceil(settings["tokens_per_update"] / (settings["max_tokens"] * devices)))
    cmd = [task.bin_dir, "--user-dir", USER_DIR, "--task", "translation",
           "--source-lang", task.src, "--target-lang", task.tgt, *system_args(system),
           "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--adam-eps", "1e-08",
           "--lr-scheduler", "inverse_sqrt", "--criterion", "label_smoothed_cross_entropy",
           "--update-freq", str(update_freq), "--save-dir", task.checkpoint_dir(system),
           "--log-format", "simple", "--num-workers", "2"]
    for key, option in OPTIONS.items():
        if settings.get(key) is not None:
            cmd += [option, str(settings[key])]
    cmd += [str(x) for x in settings.get("extra", [])]
    cmd += ["--fp16"] if fp16 else ([] if gpus else ["--cpu"])
    cmd += list(extra_args)  # the user's own options come last and win
    return cmd, update_freq


def train(task, system, extra_args=()):
    if not os.path.exists(os.path.join(task.bin_dir, f"dict.{task.tgt}.txt")):
        from ..errors import RelaFairseqError

        raise RelaFairseqError(f"no binarised data for {task.name} in {task.bin_dir}: run "
                               f"scripts/prepare.sh {task.name} first")
    gpus, fp16, nodes, procs = hardware()
    args, update_freq = train_command(task, system, extra_args, gpus, fp16, nodes, procs)
    os.makedirs(task.checkpoint_dir(system), exist_ok=True)
    where = f"{procs} process(es) x {nodes} node(s) on " + (f"{gpus} GPU(s) per node" if gpus else "CPU")
    logger.info(f"{task.name}/{system}: {where}, update-freq {update_freq} "
                f"({task['train']['tokens_per_update']} tokens per update), fp16={fp16}")
    if nodes > 1 or "NPROC_PER_NODE" in os.environ:
        cmd = [tool("torchrun"), f"--nnodes={nodes}", f"--node_rank={os.environ.get('NODE_RANK', '0')}",
               f"--nproc_per_node={procs}", f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
               f"--master_port={os.environ.get('MASTER_PORT', '29500')}",
               "-m", "rela_fairseq.pipeline.distributed_train", *args]
    else:
        cmd = [tool("fairseq-train"), *args]
    logger.info("running: " + " ".join(cmd))
    with open(os.path.join(task.checkpoint_dir(system), "train.log"), "a", encoding="utf-8") as log:
        log.write("# " + " ".join(cmd) + "\n")
    result = subprocess.run(cmd)
    if result.returncode != 0:
        sys.exit(result.returncode)
