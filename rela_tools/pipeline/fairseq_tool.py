"""Run one of fairseq's command-line tools as the pipeline does: the installed tool itself, with the known harmless
warnings silenced (``rela_tools/quiet.py``) and fairseq's own log format.

    python rela_tools/pipeline/fairseq_tool.py fairseq-train DATA --arch transformer_rela ...
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        rela_tools/pipeline/fairseq_tool.py fairseq-train-torchrun DATA --arch transformer_rela ...

It runs as a script as well as with ``python -m rela_tools.pipeline.fairseq_tool``: rela_tools imports neither torch
nor fairseq, so the logging below is set up before fairseq is first imported (one of its speech tasks otherwise sets
every logger to DEBUG).

``fairseq-train-torchrun`` is fairseq-train under torchrun, one process per device on one node or many. fairseq reads
torchrun's environment itself only on GPUs (it computes ``rank % cuda.device_count()``); the rank, world size and
local device are passed explicitly instead, so the same command also runs on CPUs with the gloo backend (tests) and on
GPUs with NCCL.

``RELA_TOOL_PREFIX`` names a command the pipeline puts before each of these tools (torchrun included): ``nice -n 10``,
``numactl --cpunodebind=0 --membind=0``, ... (the test suite forks the tools from a server this way,
tests/support/tool_client.py).
"""

import ctypes
import importlib
import logging
import os
import shlex
import signal
import sys
import threading
from typing import Callable

TOOLS = {  # console script -> the module whose cli_main it runs (fairseq's setup.py entry points)
    "fairseq-preprocess": "fairseq_cli.preprocess",
    "fairseq-train": "fairseq_cli.train",
    "fairseq-train-torchrun": "fairseq_cli.train",
    "fairseq-generate": "fairseq_cli.generate",
    "fairseq-interactive": "fairseq_cli.interactive",
}
HERE = os.path.dirname(os.path.abspath(__file__))


PREFIX_VAR = "RELA_TOOL_PREFIX"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def prefix(env=os.environ):
    """The command $RELA_TOOL_PREFIX puts before each tool the pipeline starts (none when unset)."""
    return shlex.split(env.get(PREFIX_VAR, ""))


def command(tool):
    """The command line that runs ``tool`` this way, with this Python and $RELA_TOOL_PREFIX (for torchrun: the
    arguments after its own; the prefix goes before torchrun)."""
    if tool not in TOOLS:
        raise ValueError(f"unknown fairseq tool {tool!r}; choose one of {', '.join(TOOLS)}")
    script = os.path.join(HERE, "fairseq_tool.py")
    return [script, tool] if tool.endswith("-torchrun") else [*prefix(), sys.executable, script, tool]


def dies_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` for the tools this process starts: each gets SIGTERM when this process dies, however it dies
    (``kill PID``, SIGKILL, a crash), so that a killed pipeline leaves no fairseq-train running on into its run's
    folder; by then the pipeline has stopped reading its output, and fairseq logs on past the closed pipe. Linux's
    PR_SET_PDEATHSIG, set in the child before exec (exec keeps it; so do ``nice`` and ``numactl`` prefixes, which
    exec the tool); a child whose parent died before that exits at once. None (nothing to set) off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it
    parent = os.getpid()

    def set_death_signal() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(128 + signal.SIGTERM)
    return set_death_signal


def forked_children_die_with_this_process() -> None:
    """Every process this one forks from its main thread, and those forked from theirs (fairseq-preprocess's
    ``--workers`` pool, fairseq-train's data-loader workers), gets SIGTERM when its parent dies. The pipeline's death
    signal reaches the tool it started only: a killed fairseq-preprocess left its pool workers waiting for work
    forever, and their chunk files of a cut binarisation could be written beside the re-run's. A fork from another
    thread is left alone: the signal follows the forking thread, and such a thread may end before its process.
    Linux only, as ``dies_with_this_process``."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    main_thread = threading.main_thread().ident
    forker = {"pid": os.getpid()}

    def before_fork() -> None:
        forker["pid"] = os.getpid()

    def in_child() -> None:
        if threading.get_ident() != main_thread:
            return
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != forker["pid"]:  # the parent died before the prctl
            os._exit(128 + signal.SIGTERM)

    os.register_at_fork(before=before_fork, after_in_child=in_child)


def distributed_args(env=os.environ, cuda=None):
    """fairseq-train's options for the process torchrun started (RANK, WORLD_SIZE, LOCAL_RANK in ``env``)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise SystemExit(f"fairseq-train-torchrun: {', '.join(missing)} not set; start it with torchrun")
    args = ["--distributed-world-size", env["WORLD_SIZE"], "--distributed-rank", env["RANK"],
            "--distributed-init-method", "env://", "--distributed-no-spawn", "--device-id", env["LOCAL_RANK"]]
    if not cuda:
        # gloo, and fairseq's own all-reduce: torch's DDP refuses device ids for CPU modules
        args += ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--cpu"]
    return args


def main():
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
        # run as a script: this folder's modules (config, train, ...) must not shadow others; the folder that holds
        # rela_tools takes its place, as for python -m
        sys.path[0] = os.path.dirname(os.path.dirname(HERE))
    if len(sys.argv) < 2 or sys.argv[1] not in TOOLS:
        sys.exit(f"usage: {os.path.basename(__file__)} {{{','.join(TOOLS)}}} ARGS...")
    tool, args = sys.argv[1], sys.argv[2:]
    # what fairseq_cli/train.py does before it imports fairseq
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stdout)
    from rela_tools.quiet import quiet_known_warnings

    quiet_known_warnings()
    forked_children_die_with_this_process()
    if tool.endswith("-torchrun"):
        args += distributed_args()
    sys.argv = [tool.replace("-torchrun", ""), *args]
    importlib.import_module(TOOLS[tool]).cli_main()


if __name__ == "__main__":
    main()
