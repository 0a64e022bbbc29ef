"""The reproduction pipeline: ``python -m rela_fairseq.pipeline {prepare,train,evaluate,reproduce,results} ...``.

scripts/prepare.sh, train.sh, evaluate.sh, reproduce.sh and results.sh call this; see their --help.
"""

import argparse
import logging
import sys

from ..errors import RelaFairseqError
from ..systems import SYSTEMS

EPILOG = """environment:
  DATA_ROOT, CHECKPOINT_ROOT, RESULTS_ROOT   where data, checkpoints and results go (default: work/ in the project)
  RELA_DOWNLOAD_MIRROR                       fetch every download from this base URL or local folder instead
  QUICK=1                                    a smoke run of a minute or two on CPU, in folders of its own
  NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node training (train.sh on every node)
"""


def _tasks_help():
    from .config import available_tasks

    try:
        return ", ".join(available_tasks())
    except RelaFairseqError as exc:
        return str(exc)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m rela_fairseq.pipeline", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tasks, systems = _tasks_help(), ", ".join(SYSTEMS)

    def add(name, help, system=True, extra=False):
        p = sub.add_parser(name, help=help, description=help, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("task", metavar="TASK", help=f"one of: {tasks}")
        if system:
            p.add_argument("system", metavar="SYSTEM", help=f"one of: {systems}")
        if extra:
            p.add_argument("fairseq_args", nargs=argparse.REMAINDER, metavar="...",
                           help="extra fairseq-train options, appended last (they win)")
        return p

    p = add("prepare", "download (with checksums, resumable), normalise, clean, sentencepiece, binarise", system=False)
    p.add_argument("--mirror", help="base URL or local folder holding the downloads (overrides RELA_DOWNLOAD_MIRROR)")
    p.add_argument("--workers", type=int, help="processes for encoding and binarising (default: CPUs, at most 8)")
    add("train", "train SYSTEM on TASK with the paper's settings; resumes from the last checkpoint", extra=True)
    add("evaluate", "average the last checkpoints, decode the test set, score with SacreBLEU and chrF")
    p = add("reproduce", "prepare, train and evaluate in a row", extra=True)
    p.add_argument("--mirror", help="as for prepare")
    p = sub.add_parser("toy-report", help="softmax and ReLA-g side by side on the toy task, with plots "
                                          "(after reproduce toy softmax / rela_g)")
    p = sub.add_parser("results", help="all JSON results as a Markdown table beside the paper's numbers")
    p.add_argument("--output", help="also write the table to this file")
    return parser


def main(argv=None):
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stderr, force=True)  # fairseq's imports may have set the root logger to DEBUG
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    from .config import check_system, load_task

    if args.command == "results":
        from .results import main_results

        return main_results(args.output)
    if args.command == "toy-report":
        from .report import toy_report

        toy_report(load_task("toy"))
        return 0
    task = load_task(args.task)
    if getattr(args, "system", None):
        check_system(args.system)
    extra = [a for a in getattr(args, "fairseq_args", []) if a != "--"]
    if args.command in ("prepare", "reproduce"):
        from .prepare import prepare

        prepare(task, mirror=args.mirror, workers=getattr(args, "workers", None))
    if args.command in ("train", "reproduce"):
        from .train import train

        train(task, args.system, extra)
    if args.command in ("evaluate", "reproduce"):
        from .evaluate import evaluate

        evaluate(task, args.system)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RelaFairseqError as exc:  # one line, no traceback
        sys.stderr.write(f"rela_fairseq: error: {exc}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; run the same command again to resume\n")
        sys.exit(130)
