"""Average the parameters of the last N checkpoints (fairseq's ``scripts/average_checkpoints.py``, which pip installs
do not ship and which cannot load checkpoints on torch >= 2.6).

Checkpoints are read with ``weights_only=True`` through the plugin's allow-list, so averaging needs no trust in the
files beyond what ``fairseq-generate`` needs. Float tensors are averaged, integer tensors floor-divided (as fairseq
does); the attention settings each module records must agree across the inputs. Everything else (config, optimizer
history) comes from the newest input.

    rela-average-checkpoints --inputs CHECKPOINT_DIR --num-update-checkpoints 5 --output averaged.pt
"""

import argparse
import collections
import os
import re
import sys

import torch

from .errors import RelaFairseqError


def last_checkpoints(directory, n, kind="update", upper_bound=None):
    """The newest ``n`` epoch (``checkpointE.pt``) or update (``checkpoint_E_U.pt``) checkpoints, newest first."""
    pattern = re.compile(r"checkpoint(\d+)\.pt$" if kind == "epoch" else r"checkpoint_\d+_(\d+)\.pt$")
    found = []
    for name in os.listdir(directory):
        match = pattern.fullmatch(name)
        if match and (upper_bound is None or int(match.group(1)) <= upper_bound):
            found.append((int(match.group(1)), os.path.join(directory, name)))
    found.sort(reverse=True)
    if len(found) < n:
        raise RelaFairseqError(f"{directory} holds {len(found)} {kind} checkpoints, fewer than the {n} to average "
                               f"(found: {', '.join(os.path.basename(p) for _, p in found) or 'none'})")
    return [path for _, path in found[:n]]


def _load(path):
    # weights_only through the plugin's allow-list (importing this package set it up)
    from . import compat

    compat.allow_fairseq_checkpoints()
    return torch.load(path, map_location="cpu", weights_only=True)


def average_checkpoints(paths):
    """The state of ``paths[0]`` with its model parameters replaced by the mean over all ``paths``."""
    if not paths:
        raise RelaFairseqError("no checkpoints to average")
    first, sums = None, collections.OrderedDict()
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


def save_atomically(state, output):
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, output)  # never a half-written file under the final name


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
        paths = last_checkpoints(args.inputs[0], n, kind, args.checkpoint_upper_bound)
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
