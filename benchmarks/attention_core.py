#!/usr/bin/env python
"""The attention core alone (from projected q, k, v to the head outputs) of every element-wise attention function
against PyTorch's own fused attention, ``torch.nn.functional.scaled_dot_product_attention`` (softmax; on a CPU its
flash kernel, which applies without a mask or dropout).

One process, the same tensors for every system, the systems interleaved (the order rotating every round); speeds are
reported as the median over rounds of the ratio to SDPA within the round (> 1: faster than SDPA), beside a second,
identical SDPA call (``sdpa_control``), whose ratio shows how far two identical systems differ in this run.

* ``train``: forward + backward of O = f(scale · Q Kᵀ) V, [batch × heads, length, d_h], no mask, no dropout;
* ``decode``: one query against ``length`` cached keys, the step of incremental decoding (no gradients);
* peak memory of ``train``: the most tensor memory held at once during forward + backward, counted from every
  allocation and release of PyTorch's CPU allocator (its profiler's memory events: exact, the same in every run).
  Both SDPA and the fused kernels take their per-thread scratch from that allocator on the calling thread; BLAS's own
  packing buffers are outside it for both. The process's resident growth (benchmarks/speed.py) moved by as much as
  the differences at these sizes.

``ceiling``: the machine's own matrix-product rate (a large float32 ``torch.mm``, the best of the rounds) over SDPA's
rate in ``train`` (its seven products' arithmetic per second): no core that computes these products, however fused,
can run faster than that against SDPA.

``products`` times the matrix products alone (2 forward, 5 backward with the scores recomputed, as the fused core and
flash attention's backward compute them), without any attention function: how close each core runs to the arithmetic
it cannot avoid.

Each element-wise function (ReLA's ReLU and squared ReLU, ReLU/n, sigmoid) runs through the fused kernels
(``--rela-kernel auto``), and ReLA's ReLU also through PyTorch operators (``rela_eager``, the eager route). The
``route`` column says which.

    python benchmarks/attention_core.py                    # lengths 128-4096, d_h 32 and 64 (minutes)
    python benchmarks/attention_core.py --quick            # tiny, seconds (CI)
    python benchmarks/attention_core.py --lengths 1024 --head-dims 64 --json core.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402  the environment

# name -> (route, the element-wise function on the scaled scores, or None for SDPA); the fused routes use the kernels
SYSTEMS: dict[str, tuple[str, Optional[str]]] = {
    "sdpa": ("torch SDPA (softmax)", None),
    "sdpa_control": ("torch SDPA (softmax)", None),
    "rela": ("fused", "relu"),
    "relu2": ("fused", "relu2"),
    "relu_len": ("fused", "relu_len"),
    "sigmoid": ("fused", "sigmoid"),
    "rela_eager": ("eager", "relu"),
    # the matrix products alone (2 forward, 5 backward, as every route and flash attention's backward do), no function:
    # the floor that no core with these products can beat without skipping some of them
    "products": ("products only", None),
}
REFERENCE = "sdpa"


def core(system: str, ext: Any, heads: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """f(q, k, v) -> O for q [B·H, T, d_h], k, v [B·H, S, d_h]."""
    from rela_fairseq import kernels
    from rela_fairseq.rela import rectify

    route, function = SYSTEMS[system]
    if route == "products only":
        return lambda q, k, v: _Products.apply(q, k, v, q.size(-1) ** -0.5)
    if function is None:
        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            shape = (-1, heads, *q.shape[1:])
            return F.scaled_dot_product_attention(q.reshape(shape), k.reshape(-1, heads, *k.shape[1:]),
                                                  v.reshape(-1, heads, *v.shape[1:])).reshape(q.shape)
        return sdpa
    if route == "fused":
        def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return kernels.fused_attention(ext, q, k, v, heads=heads, scale=q.size(-1) ** -0.5, activation=function)
        return fused

    def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # ReLA's eager route
        scores = torch.bmm(q * q.size(-1) ** -0.5, k.transpose(1, 2))
        return torch.bmm(rectify(scores, function), v)
    return eager


class _Products(torch.autograd.Function):
    """O = (scale · Q Kᵀ) V and its gradients, recomputing the scores in the backward pass as the fused core does:
    the seven matrix products of an attention core and nothing else."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return torch.bmm(torch.bmm(q * scale, k.transpose(1, 2)), v)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        q, k, v = ctx.saved_tensors
        scaled_q = q * ctx.scale
        scores = torch.bmm(scaled_q, k.transpose(1, 2))
        grad_v = torch.bmm(scores.transpose(1, 2), grad)
        grad_scores = torch.bmm(grad, v.transpose(1, 2))
        return torch.bmm(grad_scores, k) * ctx.scale, torch.bmm(grad_scores.transpose(1, 2), scaled_q), grad_v, None


def step(system: str, ext: Any, heads: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """One decoding step, q [B·H, 1, d_h] against the cached k, v [B·H, S, d_h], as the plugin runs it: fairseq's
    scores, then the step kernel (fused) or the function and A·V (eager); SDPA whole."""
    from rela_fairseq import kernels

    route, function = SYSTEMS[system]
    if function is None or route != "fused":
        return core(system, ext, heads)

    def fused_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = torch.bmm(q * q.size(-1) ** -0.5, k.transpose(1, 2)).contiguous()
        return kernels.attention_step(ext, scores, v, heads, function)
    return fused_step


def inputs(batch: int, heads: int, length: int, head_dim: int, queries: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch * heads, n, head_dim, generator=gen) for n in (queries, length, length)]


def time_train(fn: Callable, tensors: list[torch.Tensor], grad: torch.Tensor) -> float:
    leaves = [t.detach().requires_grad_() for t in tensors]
    start = time.perf_counter()
    fn(*leaves).backward(grad)
    return time.perf_counter() - start


def time_decode(fn: Callable, tensors: list[torch.Tensor]) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        fn(*tensors)
        return time.perf_counter() - start


def peak_allocated_mb(work: Callable[[], Any]) -> float:
    """The most memory (MiB) that PyTorch's CPU allocator had handed out at once during ``work()``, counted from
    ``work``'s start: the running sum of the profiler's allocation and release events, in time order. Allocations made
    on threads the profiler does not follow (a kernel's own OpenMP workers) are not seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak / 2**20


def peak_train_memory(fn: Callable, tensors: list[torch.Tensor], grad: torch.Tensor) -> float:
    leaves = [t.detach().requires_grad_() for t in tensors]
    return peak_allocated_mb(lambda: fn(*leaves).backward(grad))


PRODUCTS = 7  # matrix products of a core: 2 forward, 5 backward (the scores recomputed), each 2·T·S·d_h per head


def gemm_rate(size: int, repeats: int) -> float:
    """GFLOP/s of a ``size``-square float32 ``torch.mm``, the best of ``repeats`` after a warm-up: the rate that no
    core's matrix products beat on this machine."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def significant(x: float) -> float:
    """x to 4 significant digits: ratios and rates of every size keep the digits that checks of them need."""
    return float(f"{x:.4g}")


def interleaved(fns: dict[str, Callable], tensors: list[torch.Tensor], grad: torch.Tensor, mode: str, repeats: int,
                label: str) -> dict[str, list[float]]:
    """Seconds per call of every system, one call each per round after a warm-up, the order rotating every round."""
    def timer(system: str) -> float:
        if mode == "train":
            return time_train(fns[system], tensors, grad)
        return time_decode(fns[system], tensors)

    systems = list(fns)
    for system in systems:  # warm-up
        timer(system)
    times: dict[str, list[float]] = {system: [] for system in systems}
    for r in range(repeats):
        for system in systems[r % len(systems):] + systems[:r % len(systems)]:
            times[system].append(timer(system))
        print(f"  {label} round {r + 1}/{repeats}", file=sys.stderr, flush=True)
    return times


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from rela_fairseq import kernels

    # the CPU kernels themselves, whatever RELA_FAIRSEQ_KERNEL says: they are what is measured
    ext = kernels.BACKENDS["cpu"].load()
    systems = [REFERENCE] + [s for s in args.systems if s != REFERENCE]
    if ext is None:
        missing = [s for s in systems if SYSTEMS[s][0] == "fused"]
        if missing:
            raise SystemExit(f"the fused kernels are unavailable ({kernels.BACKENDS['cpu'].failure}): measure "
                             f"without {', '.join(missing)} (--systems)")
    rows, raw = [], {}
    gemm = gemm_rate(args.gemm_size, args.repeats)
    print(f"  matrix products: {gemm:.0f} GFLOP/s ({args.gemm_size}-square torch.mm)", file=sys.stderr, flush=True)
    for head_dim in args.head_dims:
        for length in args.lengths:
            for mode in args.modes:
                queries = length if mode == "train" else 1
                tensors = inputs(args.batch, args.heads, length, head_dim, queries, args.seed)
                grad = torch.randn_like(tensors[0])
                fns = {s: (core if mode == "train" else step)(s, ext, args.heads) for s in systems}
                times = interleaved(fns, tensors, grad, mode, args.repeats, f"d_h {head_dim} L={length} {mode}")
                memory = ({s: peak_train_memory(fns[s], tensors, grad) for s in systems}
                          if mode == "train" and "memory" in args.measure else {})
                raw[f"d{head_dim}/L{length}/{mode}"] = times
                flops = PRODUCTS * 2 * length * length * head_dim * args.batch * args.heads
                for s in systems:
                    ratios = [ref / t for ref, t in zip(times[REFERENCE], times[s])]
                    gflops = flops / statistics.median(times[s]) / 1e9 if mode == "train" else None
                    rows.append({"head_dim": head_dim, "length": length, "mode": mode, "system": s,
                                 "route": SYSTEMS[s][0], "ms": significant(1000 * statistics.median(times[s])),
                                 "speed_vs_sdpa": significant(statistics.median(ratios)),
                                 "gflops": significant(gflops) if gflops is not None else None,
                                 "ceiling_vs_sdpa": significant(gemm / gflops) if gflops and s == REFERENCE else None,
                                 "peak_mb": significant(memory[s]) if s in memory else None,
                                 "memory_vs_sdpa": (significant(memory[s] / memory[REFERENCE])
                                                    if s in memory and memory[REFERENCE] > 0 else None)})
    return rows, {"gemm_gflops": significant(gemm), **raw}


def markdown(rows: list[dict[str, Any]]) -> str:
    systems = list(dict.fromkeys(r["system"] for r in rows))
    others = [s for s in systems if s != REFERENCE]
    routes = {r["system"]: r["route"] for r in rows}
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        train = mode == "train"
        header = ["d_h", "keys", "sdpa ms", *(["sdpa GFLOP/s", "ceiling"] if train else []),
                  *(f"{s} ({routes[s]})" for s in others)]
        with_memory = any(r["peak_mb"] is not None for r in rows if r["mode"] == mode)
        if with_memory:
            header += ["sdpa MB", *(f"{s} mem" for s in others)]
        what = "forward + backward" if mode == "train" else "one query against the cached keys, no gradients"
        lines += [f"**{mode}** ({what}): speed × SDPA (> 1: faster)"
                  + (", and peak memory × SDPA's" if with_memory else "")
                  + ("; ceiling: the machine's matrix-product rate over SDPA's" if train else ""), "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        cells: dict[tuple[int, int], dict[str, dict[str, Any]]] = {
            (r["head_dim"], r["length"]): {} for r in rows if r["mode"] == mode}
        for r in rows:
            if r["mode"] == mode:
                cells[(r["head_dim"], r["length"])][r["system"]] = r
        for (head_dim, length), by_system in cells.items():
            ref = by_system[REFERENCE]
            row = [str(head_dim), str(length), f"{ref['ms']:.2f}",
                   *([f"{ref['gflops']:.0f}", f"{ref['ceiling_vs_sdpa']:.2f}"] if train else []),
                   *(f"{by_system[s]['speed_vs_sdpa']:.2f}" for s in others)]
            if with_memory:
                row += [f"{ref['peak_mb']:.1f}", *(f"{by_system[s]['memory_vs_sdpa']:.2f}"
                                                   if by_system[s]["memory_vs_sdpa"] is not None else "–"
                                                   for s in others)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines).strip()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: seconds")
    p.add_argument("--lengths", nargs="+", type=int, help="keys (and queries in training; default 128-4096)")
    p.add_argument("--head-dims", nargs="+", type=int, help="head widths (default 32 64)")
    p.add_argument("--batch", type=int, help="sentences (default 2)")
    p.add_argument("--heads", type=int, help="heads (default 8)")
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 5)")
    p.add_argument("--modes", nargs="+", choices=("train", "decode"), default=["train", "decode"])
    p.add_argument("--measure", nargs="+", choices=("speed", "memory"), default=["speed", "memory"])
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS),
                   help="default: all (sdpa, the reference, is always measured)")
    p.add_argument("--gemm-size", type=int, help="the square torch.mm that measures the machine's matrix-product "
                   "rate (default 2048)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write every measurement and ratio to this file")
    args = p.parse_args(argv)
    quick = dict(lengths=[32, 64], head_dims=[8], batch=1, heads=2, repeats=1, gemm_size=128)
    full = dict(lengths=[128, 256, 512, 1024, 2048, 4096], head_dims=[32, 64], batch=2, heads=8, repeats=5,
                gemm_size=2048)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("lengths", "head_dims", "batch", "heads", "repeats", "gemm_size"):
        value = getattr(args, key)
        if min(value if isinstance(value, list) else [value]) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.time()
    rows, raw = run(args)
    print(markdown(rows))
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": speed.platform.processor()
                   or speed.platform.machine()}
    print(f"\n{environment}; batch {args.batch} x {args.heads} heads; medians of {args.repeats} interleaved rounds; "
          f"{time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": environment, "settings": vars(args), "results": rows, "raw": raw}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
