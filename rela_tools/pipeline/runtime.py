"""What the pipeline's steps share about the machine: the plugin's folder, fairseq's command-line tools, the devices."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ..errors import RelaConfigError

# the value of fairseq's --user-dir: the rela_fairseq package beside rela_tools (in a checkout and in site-packages)
USER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "rela_fairseq")


def tool(name: str) -> str:
    """A console script installed beside this Python (fairseq-train, torchrun, ...), else the bare name."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name


@dataclass(frozen=True)
class Hardware:
    gpus: int  # on this node
    fp16: bool  # every GPU supports fp16 training (compute capability >= 7.0)
    nodes: int  # NNODES
    procs_per_node: int  # NPROC_PER_NODE, else one per GPU (one on a CPU)

    @property
    def devices(self) -> int:
        """Training processes in all: the data-parallel world size."""
        return self.nodes * self.procs_per_node

    def describe(self) -> str:
        where = f"{self.gpus} GPU(s) per node" if self.gpus else "CPU"
        return f"{self.procs_per_node} process(es) x {self.nodes} node(s) on {where}"

    def fairseq_args(self) -> list[str]:
        return ["--fp16"] if self.fp16 else ([] if self.gpus else ["--cpu"])


def hardware() -> Hardware:
    import torch

    gpus = torch.cuda.device_count()
    fp16 = gpus > 0 and torch.cuda.get_device_capability(0)[0] >= 7
    return Hardware(gpus, fp16, env_int("NNODES", 1), env_int("NPROC_PER_NODE", max(gpus, 1)))


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        raise RelaConfigError(f"{name}={value!r}: expected a positive integer")
    return int(value)
