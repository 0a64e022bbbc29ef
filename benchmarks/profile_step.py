#!/usr/bin/env python
"""Where the time of one training step (or of beam search) goes: an attention function against fairseq's stock
softmax, op by op.

Builds both models exactly as ``speed.py`` does (same sizes, same synthetic batch), warms them up, then profiles
``--steps`` training steps of each with torch.profiler, alternating the two, and prints the operators whose self time
differs most, with the wall time per step of each. Operators with the same shapes in both models (the matrix
products) differ only by noise; the ones that exist in one model only are the attention function's own cost:
``FusedAttention*`` and ``FusedGatedRMSNorm*`` (the fused kernels, ``--rela-kernel auto``) or ``relu``, ``sigmoid_``
and ``GatedRMSNorm*`` (``--system rela_g_eager``) for ReLA-g, ``_softmax`` and the fused softmax attention for softmax;
in decoding ``rela_fairseq::attention_step`` and ``rela_fairseq::norm_forward`` (the kernels called outside autograd).

    python benchmarks/profile_step.py                       # ReLA-g vs softmax, Transformer-base, 48 tokens
    python benchmarks/profile_step.py --system rela_i --length 16 --json profile.json
    python benchmarks/profile_step.py --mode decode --length 48         # beam search, 16 sentences
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402  the same models and batches as the benchmark


def profiled(work: Callable[[], object], device: torch.device, totals: collections.defaultdict[str, float]) -> float:
    """Runs ``work()`` under torch.profiler; adds each operator's self CPU time (ms) to ``totals``; returns wall
    seconds."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        work()
        speed.sync(device)
        elapsed = time.perf_counter() - started
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total / 1e3
    return elapsed


class NamedKernels:
    """The loaded fused kernels, each call named in the profile (``rela_fairseq::attention_step``). In decoding they
    run outside autograd, so no operator names them, and their time would count as the self time of whatever scope
    called them (``EnsembleModel: forward_decoder``)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __getattr__(self, name: str) -> Callable[..., Any]:
        kernel = getattr(self.module, name)

        def named(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(f"rela_fairseq::{name}"):
                return kernel(*args, **kwargs)

        return named


def name_kernel_calls(device: torch.device) -> None:
    from rela_fairseq import kernels

    backend = kernels.BACKENDS.get(device.type)
    if backend is not None and backend.load() is not None and not isinstance(backend.module, NamedKernels):
        backend.module = NamedKernels(backend.module)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.mode == "decode":  # in training, the kernels' autograd functions name them (FusedAttention, ...)
        name_kernel_calls(device)
    dictionary = speed.vocabulary(args.size)
    batch = speed.make_batch(dictionary, args.train_tokens, args.length, device, seed=args.length)
    systems = ["softmax", args.system]
    models = {s: speed.build(s, args.size, dictionary, device) for s in systems}
    optimizers = {s: torch.optim.Adam(m.parameters(), lr=1e-4) for s, m in models.items()}
    sample = {"net_input": {k: v[: args.decode_sentences] for k, v in batch["net_input"].items()
                            if k != "prev_output_tokens"}}

    def work(system: str) -> Callable[[], object]:
        if args.mode == "train":
            models[system].train()
            return lambda: speed.train_step(models[system], optimizers[system], batch)
        return lambda: speed.time_decoding(models[system], dictionary, sample, args.length, device)

    for system in systems:  # warm-up, and Adam's state
        work(system)()
    totals: dict[str, collections.defaultdict[str, float]] = {s: collections.defaultdict(float) for s in systems}
    wall = {s: 0.0 for s in systems}
    for step in range(args.steps):
        for system in systems if step % 2 == 0 else systems[::-1]:
            wall[system] += profiled(work(system), device, totals[system])
    per_step = {s: {op: ms / args.steps for op, ms in totals[s].items()} for s in systems}
    ops = sorted(set(per_step["softmax"]) | set(per_step[args.system]),
                 key=lambda op: -abs(per_step[args.system].get(op, 0.0) - per_step["softmax"].get(op, 0.0)))
    rows = [{"op": op, "softmax_ms": per_step["softmax"].get(op, 0.0), "system_ms": per_step[args.system].get(op, 0.0)}
            for op in ops]
    return {"settings": vars(args), "ntokens": batch["ntokens"] if args.mode == "train" else None,
            "decoded_sentences": len(sample["net_input"]["src_tokens"]) if args.mode == "decode" else None,
            "seconds_per_step": {s: wall[s] / args.steps for s in systems},
            "self_ms_per_step": {s: sum(per_step[s].values()) for s in systems}, "ops": rows}


def report(result: dict[str, Any], top: int) -> str:
    system = result["settings"]["system"]
    sec = result["seconds_per_step"]
    settings = result["settings"]
    what = (f"one training step, {result['ntokens']} target tokens" if settings["mode"] == "train" else
            f"decoding {result['decoded_sentences']} sentences of {settings['length']} tokens, beam 4")
    lines = [f"{what}, profiled: softmax {sec['softmax']:.3f} s, "
             f"{system} {sec[system]:.3f} s ({sec['softmax'] / sec[system]:.3f}x softmax's speed)",
             "", f"| operator | softmax ms | {system} ms | difference ms |", "|---|---|---|---|"]
    for row in result["ops"][:top]:
        lines.append(f"| {row['op'][:60]} | {row['softmax_ms']:.1f} | {row['system_ms']:.1f} | "
                     f"{row['system_ms'] - row['softmax_ms']:+.1f} |")
    self_ms = result["self_ms_per_step"]
    lines.append(f"| all operators | {self_ms['softmax']:.1f} | {self_ms[system]:.1f} | "
                 f"{self_ms[system] - self_ms['softmax']:+.1f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", default="rela_g", choices=[s for s in {**speed.SYSTEMS, **speed.EXTRA_SYSTEMS}
                                                          if s != "softmax"],
                   help="compared with fairseq's stock softmax Transformer (default rela_g)")
    p.add_argument("--mode", default="train", choices=("train", "decode"),
                   help="a training step (default), or beam search on --decode-sentences sentences")
    p.add_argument("--decode-sentences", type=int, default=16, help="sentences decoded (--mode decode, default 16)")
    p.add_argument("--size", default="transformer_rela", choices=speed.SIZES, metavar="ARCH",
                   help="model size: the dimensions of this architecture (default transformer_rela: Transformer-base)")
    p.add_argument("--length", type=int, default=48, help="sequence length (default 48)")
    p.add_argument("--train-tokens", type=int, default=2048, help="target tokens per batch (default 2048)")
    p.add_argument("--steps", type=int, default=2, help="profiled steps per system (default 2)")
    p.add_argument("--top", type=int, default=25, help="operators shown (default 25)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", help="write the whole profile to this file")
    args = p.parse_args(argv)
    speed.check_arguments(p, args, {"length": 2, "train_tokens": 1, "steps": 1, "top": 1, "decode_sentences": 1})
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    speed.quiet_logging()
    speed.ignore_kernel_override()
    torch.manual_seed(1)
    result = run(args)
    print(report(result, args.top))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
