"""The reproduction pipeline: ``python -m rela_tools.pipeline COMMAND ...``.

scripts/prepare.sh, train.sh, evaluate.sh, reproduce.sh, results.sh, compare.sh and tune.sh call this; see their
--help.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import RelaFairseqError
from ..systems import PAPER_SYSTEMS, SYSTEMS

EPILOG = """environment:
  DATA_ROOT, CHECKPOINT_ROOT, RESULTS_ROOT   where data, checkpoints and results go (default: work/ in the project)
  RELA_DOWNLOAD_MIRROR                       fetch every download from this base URL or local folder instead
  QUICK=1                                    a smoke run of a minute or two on CPU, in folders of its own
  NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node training (train.sh on every node)
  RELA_TOOL_PREFIX                           a command put before each fairseq tool started (nice -n 10, numactl ...)
"""


SET_HELP = ("SECTION.KEY=VALUE: a train or evaluate setting for every system, on top of the config and tune.sh's "
            "choice (e.g. train.max_update=3000); runs with other training settings go to folders of their own "
            "(SYSTEM@max_update=3000). Repeatable")


def _tasks_help() -> str:
    from .config import available_tasks

    try:
        return ", ".join(available_tasks())
    except RelaFairseqError as exc:
        return str(exc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rela_tools.pipeline", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tasks, systems = _tasks_help(), ", ".join(SYSTEMS)

    def add(name: str, help: str, system: bool = True, extra: bool = False, seed: bool = False):
        p = sub.add_parser(name, help=help, description=help, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("task", metavar="TASK", help=f"one of: {tasks}")
        if system:
            p.add_argument("system", metavar="SYSTEM", help=f"one of: {systems}")
        if system:
            p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)
        if seed:
            p.add_argument("--seed", type=int, help=(
                "evaluate the run trained with this seed (SYSTEM-seedN)" if name == "evaluate" else
                "train with this seed instead of the config's (checkpoints and results then go to SYSTEM-seedN); "
                "also taken from among the extra options"))
        if extra:
            p.add_argument("fairseq_args", nargs=argparse.REMAINDER, metavar="...",
                           help="extra fairseq-train options, appended last (they win); '--' may separate them")
        return p

    p = add("prepare", "download (with checksums, resumable), normalise, clean, sentencepiece, binarise; each step "
                       "re-runs when its settings change", system=False)
    p.add_argument("--mirror", help="base URL or local folder holding the downloads (overrides RELA_DOWNLOAD_MIRROR)")
    p.add_argument("--workers", type=int, help="processes for encoding and binarising (default: CPUs, at most 8)")
    p.add_argument("--check", action="store_true",
                   help="prepare nothing: check that every address answers and that checksums and archive members "
                        "match the config, fetching only what that needs")
    p.add_argument("--check-max-mb", type=float, default=64.0, metavar="MB",
                   help="with --check: stream files up to this size whole to verify checksum and members (default 64)")
    add("train", "train SYSTEM on TASK with the paper's settings; resumes from the last checkpoint", extra=True,
        seed=True)
    add("evaluate", "average the last checkpoints, decode the test set, score with SacreBLEU and chrF", seed=True)
    p = add("reproduce", "prepare, train and evaluate in a row", extra=True, seed=True)
    p.add_argument("--mirror", help="as for prepare")
    def several_systems(name: str, help: str, description: str, seeds_help: str) -> argparse.ArgumentParser:
        """compare and tune: a task, the systems (the paper's six by default), seeds, --set and --mirror."""
        p = sub.add_parser(name, help=help, description=description, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("task", metavar="TASK", help=f"one of: {tasks}")
        p.add_argument("systems", metavar="SYSTEM", nargs="*",
                       help=f"one or more of: {systems} (default: the paper's six, {', '.join(PAPER_SYSTEMS)})")
        p.add_argument("--seeds", type=int, default=1, help=seeds_help)
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)
        p.add_argument("--mirror", help="as for prepare")
        return p

    p = several_systems("compare", "train, evaluate and analyse several systems on one task; one table",
                        "train what is missing, evaluate, analyse attention, measure speed against softmax, and "
                        "print one table (written with a JSON and plots beside it)",
                        "train each system with this many seeds and report mean ± standard deviation (default 1)")
    p.add_argument("--shared-setting", action="store_true",
                   help="ignore tune.sh's choices: every system at the config's settings (its systems block applies)")
    several_systems("tune", "tune every system the same way on the validation set: the config's tune.grid",
                    "train each system at every point of the config's tune.grid (each in a folder of its own), score "
                    "every run on the validation set only, choose the best point per system and write it where "
                    "compare.sh, train.sh and evaluate.sh pick it up (RESULTS_ROOT/TASK/tune/tuned.json); prints "
                    "the grid's table (tune.md, tune.json). QUICK=1: two points",
                    "train every point with this many seeds; the choice takes their mean (default 1)")
    p = sub.add_parser("results", help="all JSON results as a Markdown table beside the paper's numbers")
    p.add_argument("--output", help="also write the table to this file")
    return parser


def fairseq_extra_args(remainder: list[str]) -> list[str]:
    """The extra fairseq options after TASK SYSTEM: a leading '--' separates them and is dropped, no other one."""
    return remainder[1:] if remainder[:1] == ["--"] else list(remainder)


OWN_OPTIONS = {"seed": int, "mirror": str, "set": str}  # the pipeline's options that the extra fairseq options may hold
LIST_OPTIONS = ("set",)  # repeatable: each one is added


def take_own_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Move the pipeline's own options (``--seed``, ``--mirror``) out of the extra fairseq options: argparse gives
    everything after SYSTEM to fairseq-train, where ``--seed 2`` would train seed 2 into SYSTEM/ (and, once seed 1
    finished there, resume it and train nothing), and ``--mirror`` would fail."""
    kept, rest = [], list(args.fairseq_args)
    while rest:
        arg = rest.pop(0)
        option, has_value, value = arg.partition("=")
        dest = option[2:] if option.startswith("--") else None
        if dest not in OWN_OPTIONS or not hasattr(args, dest):
            kept.append(arg)
            continue
        if not has_value:
            if not rest:
                parser.error(f"argument {option}: expected one argument")
            value = rest.pop(0)
        try:
            if dest in LIST_OPTIONS:
                getattr(args, dest).append(value)
            else:
                setattr(args, dest, OWN_OPTIONS[dest](value))
        except ValueError:
            parser.error(f"argument {option}: invalid {OWN_OPTIONS[dest].__name__} value: {value!r}")
    args.fairseq_args = kept


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, unparsed = parser.parse_known_args(argv)
    if unparsed and args.command in ("compare", "tune") and not any(a.startswith("-") for a in unparsed):
        args.systems += unparsed  # SYSTEMs after an option (TASK --seeds 2 softmax rela_g): argparse stops there
    elif unparsed:
        parser.error(f"unrecognized arguments: {' '.join(unparsed)}")
    if getattr(args, "fairseq_args", None):
        take_own_options(args, parser)
    return args


def main(argv: list[str] | None = None) -> int:
    from ..quiet import quiet_known_warnings

    quiet_known_warnings()
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stderr, force=True)  # fairseq's imports may have set the root logger to DEBUG
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    args = parse_args(argv)
    from ..systems import get_system
    from .config import load_task

    if args.command == "results":
        from .results import main_results

        return main_results(args.output)
    task = load_task(args.task)
    from .config import parse_set_option

    for text in getattr(args, "set", None) or []:
        section, key, value = parse_set_option(text)
        task.command_line[section][key] = value
    if args.command in ("compare", "tune"):
        for system in args.systems:
            get_system(system)
            if args.systems.count(system) > 1:  # it would count as a second seed of itself
                raise RelaFairseqError(f"{system} is given twice; name each system once (--seeds N for seeds)")
        if args.seeds < 1:
            raise RelaFairseqError(f"--seeds must be at least 1, got {args.seeds}")
        if args.command == "tune":
            from .tune import grid_points, tune

            for system in args.systems or list(PAPER_SYSTEMS):
                grid_points(task, system)  # a task without a grid: an error before anything runs
            tune(task, args.systems or list(PAPER_SYSTEMS), seeds=args.seeds, mirror=args.mirror)
            return 0
        from .compare import compare

        task.use_tuned = not args.shared_setting
        compare(task, args.systems or list(PAPER_SYSTEMS), seeds=args.seeds, mirror=args.mirror)
        return 0
    if getattr(args, "system", None):
        get_system(args.system)
    if args.command == "prepare" and args.check:
        from .check import check

        return 0 if check(task, mirror=args.mirror, max_mb=args.check_max_mb) else 1
    extra = fairseq_extra_args(getattr(args, "fairseq_args", []))
    seed = getattr(args, "seed", None)
    if args.command in ("prepare", "reproduce"):
        from .prepare import prepare

        prepare(task, mirror=args.mirror, workers=getattr(args, "workers", None))
    if args.command in ("train", "reproduce"):
        from .train import train

        train(task, args.system, extra, seed=seed)
    if args.command in ("evaluate", "reproduce"):
        from .evaluate import evaluate

        evaluate(task, args.system, seed=seed)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RelaFairseqError as exc:  # one line, no traceback
        sys.stderr.write(f"rela_fairseq: error: {exc}\n")
        sys.exit(getattr(exc, "returncode", 1) or 1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; run the same command again to resume\n")
        sys.exit(130)
