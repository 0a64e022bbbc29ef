"""The fairseq command lines the pipeline runs, built in one place, and what it reads back from their logs.

The batch: see ``split_batch``. The official runs update on 25K tokens: 6,250 tokens per step, gradients accumulated
over 4 steps on one GPU (bzhangGo/zero docs/rela_sparse_attention/README.md: token_size=6250, update_cycle=4,
gpus=[0]). ``tokens_per_update = max_tokens × update_freq × devices`` is kept within 2% of the config's
``tokens_per_update`` on any number of devices, never above it: ``update_freq = ceil(T / (max_tokens × devices))``,
then ``max_tokens`` is lowered to ``floor(T / (update_freq × devices))`` (on 1 GPU: 6,250 × 4; on 16: 1,562 × 1 =
24,992).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import dataclass

from ..errors import RelaConfigError, RelaFairseqError
from ..systems import get_system
from .config import Setting, Task
from .fairseq_tool import command as fairseq_command
from .fairseq_tool import dies_with_this_process
from .runtime import USER_DIR, Hardware

MAX_BATCH_DEVIATION = 0.02

# config key -> fairseq-train option
OPTIONS = {
    "arch": "--arch",
    "lr": "--lr",
    "warmup_updates": "--warmup-updates",
    "warmup_init_lr": "--warmup-init-lr",
    "max_update": "--max-update",
    "dropout": "--dropout",
    "attention_dropout": "--attention-dropout",
    "activation_dropout": "--activation-dropout",
    "label_smoothing": "--label-smoothing",
    "weight_decay": "--weight-decay",
    "clip_norm": "--clip-norm",
    "attn_qkv_bias_init": "--attn-qkv-bias-init",
    "save_interval_updates": "--save-interval-updates",
    "keep_interval_updates": "--keep-interval-updates",
    "keep_last_epochs": "--keep-last-epochs",
    "validate_interval_updates": "--validate-interval-updates",
    "log_interval": "--log-interval",
}


@dataclass(frozen=True)
class BatchSplit:
    """How the tokens of one update are spread: ``max_tokens`` per step and device, ``update_freq`` steps."""

    tokens_per_update: int  # what the config asks for
    max_tokens: int
    update_freq: int
    devices: int

    @property
    def actual(self) -> int:
        return self.max_tokens * self.update_freq * self.devices

    @property
    def deviation(self) -> float:
        return self.actual / self.tokens_per_update - 1

    def describe(self) -> str:
        return (f"{self.max_tokens} tokens x {self.update_freq} step(s) x {self.devices} device(s) = {self.actual} "
                f"tokens per update (config: {self.tokens_per_update}, {100 * self.deviation:+.2f}%)")


def split_batch(tokens_per_update: int, max_tokens: int, devices: int, min_tokens: int = 1) -> BatchSplit:
    """The split of ``tokens_per_update`` over ``devices`` with at most ``max_tokens`` per step and device (see the
    module's docstring); ``min_tokens``: the longest training example, which every step must hold."""
    if tokens_per_update < 1 or max_tokens < 1 or devices < 1:
        raise RelaConfigError(f"tokens_per_update ({tokens_per_update}), max_tokens ({max_tokens}) and the number of "
                              f"devices ({devices}) must be positive")
    update_freq = math.ceil(tokens_per_update / (max_tokens * devices))
    per_step = tokens_per_update // (update_freq * devices)
    split = BatchSplit(tokens_per_update, per_step, update_freq, devices)
    if per_step < min_tokens:
        raise RelaConfigError(f"{devices} devices would get {per_step} tokens per step each, fewer than the longest "
                              f"training example ({min_tokens}): raise tokens_per_update or use fewer devices")
    if abs(split.deviation) > MAX_BATCH_DEVIATION:
        raise RelaConfigError(f"no split of {tokens_per_update} tokens per update over {devices} devices comes within "
                              f"{100 * MAX_BATCH_DEVIATION:.0f}% ({split.describe()})")
    return split


def batch_for(task: Task, devices: int, setting: Setting | None = None) -> BatchSplit:
    settings = setting.train if setting is not None else task["train"]
    longest = (task.get("clean") or {}).get("max_tokens", 250) + 1  # + </s>
    return split_batch(settings["tokens_per_update"], settings["max_tokens"], devices, longest)


def train_command(task: Task, system: str, extra_args=(), hw: Hardware | None = None,
                  seed: int | None = None, setting: Setting | None = None) -> tuple[list[str], BatchSplit]:
    """The fairseq-train options (list) for ``system`` on ``task`` at ``setting`` (default: the system's own,
    ``Task.setting``), and the batch split they use."""
    hw = hw or Hardware(gpus=0, fp16=False, nodes=1, procs_per_node=1)
    setting = setting or task.setting(system)
    settings = setting.train
    split = batch_for(task, hw.devices, setting)
    cmd = [task.bin_dir, "--user-dir", USER_DIR, "--task", "translation",
           "--source-lang", task.src, "--target-lang", task.tgt, *get_system(system).fairseq_args(),
           "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--adam-eps", "1e-08",
           "--lr-scheduler", "inverse_sqrt", "--criterion", "label_smoothed_cross_entropy",
           "--max-tokens", str(split.max_tokens), "--update-freq", str(split.update_freq),
           "--seed", str(seed if seed is not None else settings["seed"]),
           "--save-dir", task.checkpoint_dir(system, seed, setting), "--log-format", "simple", "--num-workers", "2"]
    for key, option in OPTIONS.items():
        if settings.get(key) is not None:
            cmd += [option, str(settings[key])]
    cmd += [str(x) for x in settings.get("extra", [])]
    cmd += hw.fairseq_args()
    cmd += list(extra_args)  # the user's own options come last and win
    return cmd, split


def fairseq_option(args: list[str], option: str) -> str | None:
    """The value of a fairseq option in a command line (``--option VALUE`` or ``--option=VALUE``; the last one wins,
    as in fairseq's parser), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def overridden_batch(extra_args, split: BatchSplit) -> BatchSplit | None:
    """The split when the user's extra options set --max-tokens or --update-freq themselves (they win)."""
    args = list(extra_args)
    values = {option: value for option in ("--max-tokens", "--update-freq")
              if (value := fairseq_option(args, option)) is not None}
    if not values:
        return None
    try:
        max_tokens = int(values.get("--max-tokens", split.max_tokens))
        update_freq = int(str(values.get("--update-freq", split.update_freq)).split(",")[0])
    except ValueError:
        return None
    return BatchSplit(split.tokens_per_update, max_tokens, update_freq, split.devices)


def generate_command(task: Task, checkpoint: str, hw: Hardware, beam: int, lenpen: float, *extra: str,
                     subset: str = "test") -> list[str]:
    """fairseq-generate on the test set (or another ``subset``); ``extra`` options come last."""
    return [*fairseq_command("fairseq-generate"), task.bin_dir, "--user-dir", USER_DIR, "--path", checkpoint,
            "--gen-subset", subset, "--source-lang", task.src, "--target-lang", task.tgt, "--beam", str(beam),
            "--lenpen", str(lenpen),
            # fairseq otherwise drops the last batch when its size is not a multiple of 8 (fairseq#5036)
            "--required-batch-size-multiple", "1", "--no-progress-bar", *hw.fairseq_args(), *extra]


def length_limits(settings: dict) -> list[str]:
    """fairseq-generate's output length limit (max_len_a × source length + max_len_b) where the config sets it."""
    return [arg for key in ("max_len_a", "max_len_b") if settings.get(key) is not None
            for arg in (f"--{key.replace('_', '-')}", str(settings[key]))]


_GENERATE_SPEED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
                             r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)")
_TRAIN_INNER_WPS = re.compile(r"\| train_inner \|.*?wps=([\d.]+)")
_DONE_TRAINING = re.compile(r"done training in ([\d.]+) seconds")


def generation_speed(log: str) -> dict | None:
    """fairseq-generate's own speed line: sentences, tokens, seconds, sentences/s, tokens/s."""
    match = _GENERATE_SPEED.search(log)
    if not match:
        return None
    sentences, tokens, seconds, per_s, tok_s = match.groups()
    return {"sentences": int(sentences.replace(",", "")), "tokens": int(tokens.replace(",", "")),
            "seconds": float(seconds), "sentences_per_s": float(per_s), "tokens_per_s": float(tok_s)}


def train_inner_wps(log: str) -> list[float]:
    """The words per second of every ``train_inner`` line of a fairseq-train log."""
    return [float(x) for x in _TRAIN_INNER_WPS.findall(log)]


def training_seconds(log: str) -> float | None:
    """fairseq-train's own "done training in N seconds" (the last one in a log of several runs)."""
    found = _DONE_TRAINING.findall(log)
    return float(found[-1]) if found else None


def run_fairseq(cmd: list[str], tool: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a fairseq command line (``generate_command``, ``train_command``) to the end, its output captured, with
    ``env`` added to the environment; a failure is an error naming ``tool`` and ending with its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env} if env else None,
                          preexec_fn=dies_with_this_process())
    if proc.returncode != 0:
        raise RelaFairseqError(f"{tool} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc
