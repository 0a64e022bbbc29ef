"""Average the parameters of the last N checkpoints (fairseq's ``scripts/average_checkpoints.py``, which pip installs
do not ship and which cannot load checkpoints on torch >= 2.6).

Checkpoints are read with ``weights_only=True`` through the plugin's allow-list, so averaging needs no trust in the
files beyond what ``fairseq-generate`` needs. Float tensors are averaged, integer tensors floor-divided (as fairseq
does); the attention settings each module records must agree across the inputs. Everything else (config, optimizer
history) comes from the newest input.

    rela-average-checkpoints --inputs CHECKPOINT_DIR --num-update-checkpoints 5 --output averaged.pt
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from typing import Any, Optional

import torch

from .errors import RelaFairseqError
from .files import atomic_path

CHECKPOINT_NAMES = {  # kind -> file name pattern; group 1 is the epoch or update number in the name
    "update": re.compile(r"checkpoint_\d+_(\d+)\.pt$"),
    "epoch": re.compile(r"checkpoint(\d+)\.pt$"),
    "last": re.compile(r"checkpoint_last\.pt$"),
}


def checkpoint_updates(path: str) -> int:
    """The number of updates a checkpoint was saved at (memory-mapped: the weights are not read)."""
    state = _load(path, mmap=True)
    return int(state["optimizer_history"][-1]["num_updates"])


def newest_checkpoints(directory: str, n: int, kinds=("update", "epoch", "last"), upper_bound: int | None = None,
                       at_least: int | None = None, every: int | None = None) -> list[str]:
    """The ``n`` checkpoints of the given kinds with the most updates, newest first (ranked by the number of updates
    stored in each: fairseq writes no update checkpoint at an epoch end, so the newest states may be in epoch
    checkpoints or only in checkpoint_last.pt; each state counts once). ``upper_bound`` ignores checkpoints whose name
    carries a larger update or epoch number; ``every`` keeps only states saved at a multiple of that many updates.
    Fewer than ``at_least`` (default ``n``) found is an error."""
    by_updates: dict[int, str] = {}
    for name in sorted(os.listdir(directory)):
        for kind in kinds:
            match = CHECKPOINT_NAMES[kind].fullmatch(name)
            if not match:
                continue
            if upper_bound is not None and match.groups() and int(match.group(1)) > upper_bound:
                continue
            path = os.path.join(directory, name)
            updates = checkpoint_updates(path)
            if not every or updates % every == 0:
                by_updates.setdefault(updates, path)
    paths = [by_updates[u] for u in sorted(by_updates, reverse=True)[:n]]
    if len(paths) < (n if at_least is None else at_least):
        found = ", ".join(os.path.basename(p) for p in paths) or "none"
        raise RelaFairseqError(f"{directory} holds {len(paths)} {'/'.join(kinds)} checkpoint(s)"
                               f"{f' saved at a multiple of {every} updates' if every else ''}, fewer than the {n} to "
                               f"average (found: {found})")
    return paths


def _load(path: str, mmap: bool = False) -> dict:
    # weights_only through the plugin's allow-list (importing this package set it up)
    from rela_fairseq import compat

    compat.allow_fairseq_checkpoints()
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def average_checkpoints(paths):
    """The state of ``paths[0]`` with its model parameters replaced by the mean over all ``paths``."""
    if not paths:
        raise RelaFairseqError("no checkpoints to average")
    first: Optional[dict] = None
    sums: collections.OrderedDict[str, Any] = collections.OrderedDict()
    for path in paths:
        state = _load(path)
        model = state["model"]
        if first is None:
            first = state
            keys = list(model)
        elif list(model) != keys:
            raise RelaFairseqError(f"{path} has other parameters than {paths[0]}: they come from different models")
        for key, value in model.items():
            if not torch.is_tensor(value):  # recorded attention settings
                if key in sums and sums[key] != value:
                    raise RelaFairseqError(f"{path}: {key} = {value} differs from {paths[0]}'s {sums[key]}")
                sums[key] = value
                continue
            value = value.float() if value.is_floating_point() else value
            sums[key] = value.clone() if key not in sums else sums[key] + value
    assert first is not None  # paths is not empty
    averaged = collections.OrderedDict()
    for key, value in sums.items():
        if not torch.is_tensor(value):
            averaged[key] = value
        elif value.is_floating_point():
            averaged[key] = (value / len(paths)).to(first["model"][key].dtype)
        else:
            averaged[key] = value // len(paths)
    first["model"] = averaged
    return first


def save_atomically(state: dict, output: str) -> None:
    with atomic_path(output) as tmp:  # never a half-written file under the final name
        torch.save(state, tmp)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="rela-average-checkpoints", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", required=True,
                        help="checkpoint files, or one directory with --num-update-checkpoints/--num-epoch-checkpoints")
    parser.add_argument("--output", required=True)
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--num-update-checkpoints", type=int, help="average the last N checkpoint_E_U.pt")
    count.add_argument("--num-epoch-checkpoints", type=int, help="average the last N checkpointE.pt")
    parser.add_argument("--checkpoint-upper-bound", type=int, help="ignore checkpoints after this update/epoch")
    args = parser.parse_args(argv)

    n = args.num_update_checkpoints or args.num_epoch_checkpoints
    if n is not None:
        if len(args.inputs) != 1 or not os.path.isdir(args.inputs[0]):
            parser.error(f"--num-*-checkpoints needs one directory as --inputs, got {args.inputs}")
        if n < 1:
            parser.error(f"the number of checkpoints must be at least 1, got {n}")
        kind = "update" if args.num_update_checkpoints else "epoch"
        paths = newest_checkpoints(args.inputs[0], n, (kind,), args.checkpoint_upper_bound)
    else:
        missing = [p for p in args.inputs if not os.path.isfile(p)]
        if missing:
            parser.error(f"no such checkpoint file(s): {', '.join(missing)}")
        paths = args.inputs
    print(f"averaging {len(paths)} checkpoints: {', '.join(os.path.basename(p) for p in paths)}", file=sys.stderr)
    save_atomically(average_checkpoints(paths), args.output)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
