"""Training and decoding throughput as fairseq itself reports it, for systems compared in one run.

Training: ``fairseq-train`` from scratch for a few updates on the task's real data (nothing saved, no validation),
target words per second from its own ``train_inner`` log line of the last interval (the first one holds the start-up).
Decoding: ``fairseq-generate`` on a shard of the test set's batches with a trained checkpoint, sentences per second from
its own "Translated N sentences ... (x sentences/s)" line. The systems are measured round after round, each round in
another order, and a system's ratio to softmax is the median over rounds of the ratio within the round: this machine's
speed drifts between rounds, not within one. Nothing else should run meanwhile (on 2 cores two processes' thread
pools thrash and a system can look 3x slower than it is).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from typing import Any

from ..errors import RelaFairseqError
from .commands import generate_command, generation_speed, length_limits, run_fairseq, train_command, train_inner_wps
from .config import Task
from .fairseq_tool import command as fairseq_command
from .runtime import hardware

logger = logging.getLogger(__name__)


def train_words_per_second(task: Task, system: str, updates: int, env: dict[str, str] | None = None) -> float:
    """Target words per second of ``fairseq-train`` over the last half of ``updates`` updates (``env`` added to its
    environment)."""
    with tempfile.TemporaryDirectory() as save_dir:
        args, _ = train_command(task, system, ["--max-update", str(updates), "--log-interval",
                                               str(max(1, updates // 2)), "--no-save", "--disable-validation",
                                               "--save-dir", save_dir, "--no-progress-bar"], hardware())
        proc = run_fairseq([*fairseq_command("fairseq-train"), *args], "fairseq-train", env)
        out = proc.stdout + proc.stderr
    rates = train_inner_wps(out)
    if not rates:
        raise RelaFairseqError(f"fairseq-train printed no train_inner line for {system}:\n{out[-2000:]}")
    return rates[-1]


def generate_speed(task: Task, checkpoint: str, sentences: int, env: dict[str, str] | None = None) -> dict:
    """fairseq-generate's own speed line (``commands.generation_speed``) on about ``sentences`` test sentences, with
    the task's beam, length penalty and limits: batches of at most 50 sentences (sorted by length, as fairseq makes
    them), every ceil(test size / sentences)-th of them. fairseq-generate shards its batches by
    ``--distributed-world-size`` and ``--distributed-rank`` (``fairseq_cli/generate.py``, 0.12.2 and fairseq-fixed);
    its ``--num-shards`` is read by ``eval_lm`` only, and decoded the whole test set."""
    batch = min(50, sentences)
    shards = max(1, -(-_test_size(task) // sentences))
    settings = task["evaluate"]
    cmd = generate_command(task, checkpoint, hardware(), settings["beam"], settings["lenpen"], "--batch-size",
                           str(batch), "--distributed-world-size", str(shards), "--distributed-rank", "0",
                           *length_limits(settings))
    proc = run_fairseq(cmd, "fairseq-generate", env)
    speed = generation_speed(proc.stdout + proc.stderr)
    if speed is None:
        raise RelaFairseqError(f"fairseq-generate reported no speed for {checkpoint}")
    return speed


def _test_size(task: Task) -> int:
    with open(task.path("raw", "test.ref"), encoding="utf-8") as f:
        return sum(1 for _ in f)


def measure(task: Task, checkpoints: dict[str, str], updates: int, sentences: int, rounds: int,
            reference: str = "softmax", progress=None, variants: dict[str, tuple[str, dict]] | None = None) -> dict:
    """{system: {train_wps: [...], decode_sps: [...], train_ratio, decode_ratio}} over ``rounds`` rounds; ratios to
    ``reference`` (which must be among ``checkpoints``: system -> a trained checkpoint to decode with). ``variants``
    adds measured entries {name: (system, environment)}: a system run with other environment variables
    (``RELA_FAIRSEQ_KERNEL=eager``)."""
    if reference not in checkpoints:
        raise RelaFairseqError(f"speed ratios need the reference system {reference!r} among the systems measured")
    entries: dict[str, tuple[str, dict]] = {s: (s, {}) for s in checkpoints}
    for name, (system, env) in (variants or {}).items():
        if system not in checkpoints:
            raise RelaFairseqError(f"speed variant {name!r} runs {system!r}, which is not among the systems measured")
        entries[name] = (system, env)
    names = list(entries)
    raw: dict[str, dict[str, Any]] = {name: {"train_wps": [], "decode_sps": [], "decoded_sentences": 0}
                                      for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            system, env = entries[name]
            if progress:
                progress(f"speed round {r + 1}/{rounds}: {name}")
            raw[name]["train_wps"].append(train_words_per_second(task, system, updates, env))
            speed = generate_speed(task, checkpoints[system], sentences, env)
            raw[name]["decode_sps"].append(speed["sentences_per_s"])
            raw[name]["decoded_sentences"] = speed["sentences"]
    for system in names:
        for key, ratio in (("train_wps", "train_ratio"), ("decode_sps", "decode_ratio")):
            ratios = [a / b for a, b in zip(raw[system][key], raw[reference][key])]
            raw[system][ratio] = round(statistics.median(ratios), 3)
            raw[system][key + "_median"] = round(statistics.median(raw[system][key]), 2)
    return {"rounds": rounds, "updates": updates, "sentences": sentences, "reference": reference, "systems": raw}
