"""fairseq-train under torchrun: one process per device, on one node or many.

fairseq reads torchrun's environment itself only on GPUs (it computes ``rank % cuda.device_count()``); this entry
point passes the rank, world size and local device explicitly instead, so the same command also runs on CPUs with the
gloo backend (tests) and on GPUs with NCCL:

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        -m rela_fairseq.pipeline.distributed_train DATA --arch transformer_rela ...
"""

import os
import sys


def distributed_args(env=os.environ, cuda=None):
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise SystemExit(f"distributed_train: {', '.join(missing)} not set; start it with torchrun")
    args = ["--distributed-world-size", env["WORLD_SIZE"], "--distributed-rank", env["RANK"],
            "--distributed-init-method", "env://", "--distributed-no-spawn", "--device-id", env["LOCAL_RANK"]]
    if not cuda:
        # gloo, and fairseq's own all-reduce: torch's DDP refuses device ids for CPU modules
        args += ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--cpu"]
    return args


def main():
    from fairseq_cli.train import cli_main

    sys.argv = ["fairseq-train", *sys.argv[1:], *distributed_args()]
    cli_main()


if __name__ == "__main__":
    main()
