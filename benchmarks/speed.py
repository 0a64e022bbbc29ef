#!/usr/bin/env python
"""Training and decoding speed, and peak memory, of every attention function against fairseq's stock Transformer.

One process measures all systems on the same synthetic batches, interleaving them (the order rotates every
repeat) and reporting medians, and ratios to softmax as the median of the ratios within each round. The softmax
reference is fairseq's own ``transformer`` with its fastest path (fused kernels included), not softmax routed through
rela_fairseq; every other system is ``transformer_rela`` with the same sizes and dropout (0.1 everywhere, as in the
paper).

* training: target tokens per second over forward + backward + Adam step (label-smoothed loss);
* decoding: sentences per second with fairseq's SequenceGenerator, beam 4, every output exactly --decode-length
  tokens long (min = max length, so all systems decode the same number of steps);
* peak memory: during a training step; on CUDA the allocator's peak, on CPU the peak growth of the process's resident
  memory (sampled every millisecond; freed heap is returned with malloc_trim before each measurement).

* ``--end-to-end TASK``: ``fairseq-train`` and ``fairseq-generate`` themselves on a prepared, trained task, words/s
  and sentences/s from their own logs (the figures users see).

    python benchmarks/speed.py                  # transformer_rela_small and Transformer-base, lengths 16-512 (an hour)
    python benchmarks/speed.py --quick          # transformer_rela_tiny, seconds (CI)
    python benchmarks/speed.py --sizes transformer_rela --lengths 16 48 --systems rela_g --extra rela_g_eager
    python benchmarks/speed.py --measure decode --lengths 16 48 128 --systems rela_g rela_i
    python benchmarks/speed.py --end-to-end multi30k_de_en --systems rela_g --extra rela_g_eager
    python benchmarks/speed.py --json out.json --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from typing import Any, Iterable, Literal, Optional, Sequence

import torch

from rela_tools.systems import PAPER_SYSTEMS
from rela_tools.systems import SYSTEMS as ALL_SYSTEMS

# model sizes: the dimensions (width, FFN, heads, layers) of these transformer_rela architectures, for every system
SIZES = ("transformer_rela_tiny", "transformer_rela_small", "transformer_rela_iwslt_de_en", "transformer_rela",
         "transformer_rela_big")
DIMENSIONS = tuple(f"{side}_{key}" for side in ("encoder", "decoder")
                   for key in ("embed_dim", "ffn_embed_dim", "attention_heads", "layers"))
VOCAB = {"transformer_rela_tiny": 1000}  # synthetic vocabulary size; 8,000 for the others
# the paper's systems (rela_tools/systems.py) -> (model, options); softmax is fairseq's stock Transformer, its fastest
# path (fused kernels included), not softmax routed through the plugin
SYSTEMS = {name: ("transformer", {}) if name == "softmax" else ("transformer_rela", system.options)
           for name, system in ALL_SYSTEMS.items()}
EXTRA_SYSTEMS = {  # rela_g and rela_i above run --rela-kernel auto: the fused kernels where they build
    "softmax_plugin": ("transformer_rela", ALL_SYSTEMS["softmax"].options),  # --attn-fn softmax through the plugin
    # a second, identical copy of the stock model: its ratio to softmax (1.00 on a quiet machine) is the run's noise
    # floor; on a shared 2-core VM two copies of one model have differed by 5% in decoding
    "softmax_control": ("transformer", {}),
    "rela_g_eager": ("transformer_rela", {**ALL_SYSTEMS["rela_g"].options, "rela_kernel": "eager"}),
    "rela_i_eager": ("transformer_rela", {**ALL_SYSTEMS["rela_i"].options, "rela_kernel": "eager"}),
}
MEASURES = ("train", "decode", "memory")
E2E_VARIANTS = {"rela_g_eager": ("rela_g", {"RELA_FAIRSEQ_KERNEL": "eager"}),
                "rela_i_eager": ("rela_i", {"RELA_FAIRSEQ_KERNEL": "eager"})}


class Dictionary:
    """What fairseq's models and SequenceGenerator need from a vocabulary."""

    def __init__(self, size: int) -> None:
        from fairseq.data import Dictionary as FairseqDictionary

        self.d = FairseqDictionary()
        for i in range(size - self.d.nspecial):
            self.d.add_symbol(f"w{i}")


class Task:
    def __init__(self, dictionary: Any) -> None:
        self.source_dictionary = self.target_dictionary = dictionary


def dimensions(size: str) -> dict[str, int]:
    """The width, FFN width, heads and layers that the architecture ``size`` sets."""
    from fairseq.models import ARCH_CONFIG_REGISTRY

    import rela_fairseq  # noqa: F401  registers transformer_rela and its architectures

    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[size](args)
    return {key: getattr(args, key) for key in DIMENSIONS}


def vocabulary(size: str) -> Any:
    return Dictionary(VOCAB.get(size, 8000)).d


def build(system: str, size: str, dictionary: Any, device: torch.device, seed: int = 1) -> torch.nn.Module:
    """``system`` at the dimensions of the architecture ``size``, dropout 0.1 everywhere (as in the paper)."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    arch, options = {**SYSTEMS, **EXTRA_SYSTEMS}[system]
    args = argparse.Namespace(**dimensions(size), dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
                              share_decoder_input_output_embed=True, **options)
    ARCH_CONFIG_REGISTRY[arch](args)
    torch.manual_seed(seed)
    return ARCH_MODEL_REGISTRY[arch].build_model(args, Task(dictionary)).to(device)


def make_batch(dictionary: Any, tokens: int, length: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Source and target batches of about ``tokens`` target tokens, lengths between length/2 and length."""
    gen = torch.Generator().manual_seed(seed)
    n = max(1, tokens // length)
    lengths = torch.randint(max(2, length // 2), length + 1, (n,), generator=gen)
    pad, eos, low = dictionary.pad(), dictionary.eos(), dictionary.nspecial

    def pad_batch(left: bool) -> torch.Tensor:
        out = torch.full((n, length), pad, dtype=torch.long)
        for i, m in enumerate(lengths.tolist()):
            words = torch.cat([torch.randint(low, len(dictionary), (m - 1,), generator=gen), torch.tensor([eos])])
            if left:
                out[i, length - m:] = words
            else:
                out[i, :m] = words
        return out

    src = pad_batch(left=True)
    target = pad_batch(left=False)
    prev = torch.full_like(target, pad)
    prev[:, 0] = eos
    prev[:, 1:] = target[:, :-1]
    prev[prev == eos] = pad
    prev[:, 0] = eos
    return {"net_input": {"src_tokens": src.to(device), "src_lengths": lengths.to(device),
                          "prev_output_tokens": prev.to(device)},
            "target": target.to(device), "ntokens": int(target.ne(pad).sum())}


class PeakMemory:
    """Peak memory growth during a block: CUDA allocator peak, or sampled resident memory on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        _malloc_trim()
        self.base = _rss()
        self.max = self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.max = max(self.max, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> Literal[False]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.max, _rss()) - self.base
        return False


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> None:
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    logits = model(**batch["net_input"])[0]
    lprobs = torch.log_softmax(logits.float(), dim=-1).view(-1, logits.size(-1))
    target = batch["target"].view(-1)
    loss, _ = label_smoothed_nll_loss(lprobs, target, 0.1, ignore_index=1, reduce=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any],
                       device: torch.device) -> float:
    model.train()
    sync(device)
    t = time.perf_counter()
    train_step(model, optimizer, batch)
    sync(device)
    return batch["ntokens"] / (time.perf_counter() - t)


def peak_training_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any],
                         device: torch.device) -> int:
    model.train()
    with PeakMemory(device) as mem:
        train_step(model, optimizer, batch)
    return mem.peak


def time_decoding(model: torch.nn.Module, dictionary: Any, sample: dict[str, Any], length: int,
                  device: torch.device) -> float:
    from fairseq.sequence_generator import SequenceGenerator

    model.eval()
    generator = SequenceGenerator([model], dictionary, beam_size=4, max_len_a=0, max_len_b=length,
                                  min_len=length)
    with torch.no_grad():
        sync(device)
        t = time.perf_counter()
        hypos = generator.generate([model], sample)
        sync(device)
        elapsed = time.perf_counter() - t
    lengths = {len(h[0]["tokens"]) for h in hypos}
    assert lengths == {length + 1}, f"output lengths differ: {lengths}"  # + EOS
    return len(hypos) / elapsed


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, dict[str, dict[str, list[float]]]]]:
    device = torch.device(args.device)
    systems = ["softmax"] + [s for s in args.systems if s != "softmax"] + list(args.extra)
    results: list[dict[str, Any]] = []
    raw: dict[str, dict[str, dict[str, list[float]]]] = {}  # "size/Llength" -> system -> measure -> values
    for size in args.sizes:
        dictionary = vocabulary(size)
        models = {s: build(s, size, dictionary, device, seed=args.seed) for s in systems}
        optimizers = {s: torch.optim.Adam(m.parameters(), lr=1e-4) for s, m in models.items()}
        params = {s: sum(p.numel() for p in m.parameters()) for s, m in models.items()}
        memory_only = [n for n in args.memory_lengths if n not in args.lengths] if "memory" in args.measure else []
        for length in args.lengths + memory_only:
            timed = length in args.lengths
            kinds = [k for k in ("train", "decode") if k in args.measure
                     and (k == "train" or length <= args.max_decode_length)] if timed else []
            # --seed draws other weights and batches (the same for every system)
            batch = make_batch(dictionary, args.train_tokens, length, device, seed=1000 * args.seed + length)
            decode_sample = make_batch(dictionary, args.decode_sentences * length, length, device,
                                       seed=1000 * args.seed + length + 1)
            decode_sample = {"net_input": {k: v[: args.decode_sentences] for k, v in decode_sample["net_input"].items()
                                           if k != "prev_output_tokens"}}
            cell = raw.setdefault(f"{size}/L{length}", {s: {"train": [], "decode": [], "memory": []}
                                                        for s in systems})
            for system in systems:  # warm-up (and Adam's state)
                if "train" in kinds or "memory" in args.measure:
                    time_training_step(models[system], optimizers[system], batch, device)
                if "decode" in kinds:
                    time_decoding(models[system], dictionary, decode_sample, length, device)
            # one step per system per round, the order rotating: a burst of noise hits every system alike
            for kind in kinds:
                for repeat in range(args.repeats):
                    for system in systems[repeat % len(systems):] + systems[: repeat % len(systems)]:
                        if kind == "train":
                            value = time_training_step(models[system], optimizers[system], batch, device)
                        else:
                            value = time_decoding(models[system], dictionary, decode_sample, length, device)
                        cell[system][kind].append(value)
                    print(f"  {size} L={length} {kind} round {repeat + 1}/{args.repeats}: " + "  ".join(
                        f"{s} {cell[s][kind][-1]:.1f}" for s in systems), file=sys.stderr, flush=True)
            for system in systems if "memory" in args.measure else []:
                cell[system]["memory"].append(peak_training_memory(models[system], optimizers[system], batch, device))
            results += summarize(cell, size, length, params)
        del models, optimizers
        gc.collect()
    return results, raw


def summarize(cell: dict[str, dict[str, list[float]]], size: str, length: int,
              params: dict[str, int]) -> list[dict[str, Any]]:
    """One row per system: median throughputs, and ratios to softmax as the median of the per-round ratios (None
    where not measured: decoding above --max-decode-length, timing at --memory-lengths).

    Each round runs every system back to back, so a ratio within a round compares measurements taken under the same
    machine load; the median over rounds then discards the rounds that a burst of load hit unevenly."""
    def median(system: str, kind: str) -> Optional[float]:
        return statistics.median(cell[system][kind]) if cell[system][kind] else None

    def ratio(system: str, kind: str) -> Optional[float]:
        pairs = [mine / ref for mine, ref in zip(cell[system][kind], cell["softmax"][kind]) if ref > 0]
        return statistics.median(pairs) if pairs else None

    rows = []
    ref_memory = median("softmax", "memory")
    for system in cell:
        memory = median(system, "memory")
        rows.append({
            "size": size, "length": length, "system": system, "parameters": params[system],
            "train_tokens_per_s": median(system, "train"), "train_ratio": ratio(system, "train"),
            "decode_sentences_per_s": median(system, "decode"), "decode_ratio": ratio(system, "decode"),
            "peak_memory_mb": memory / 2**20 if memory is not None else None,
            "memory_ratio": memory / ref_memory if memory is not None and ref_memory else None,
        })
    return rows


def markdown(results: Iterable[dict[str, Any]]) -> str:
    def show(value: Optional[float], digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| size | length | system | train tok/s | train × softmax | decode sent/s | decode × softmax "
             "| peak MB | memory × softmax |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['size']} | {r['length']} | {r['system']} | {show(r['train_tokens_per_s'], 0)} | "
                     f"{show(r['train_ratio'], 2)} | {show(r['decode_sentences_per_s'], 2)} | "
                     f"{show(r['decode_ratio'], 2)} | {show(r['peak_memory_mb'], 0)} | {show(r['memory_ratio'], 2)} |")
    return "\n".join(lines)


def end_to_end(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``--end-to-end TASK``: fairseq-train and fairseq-generate themselves on a prepared task (rela_tools.pipeline
    .throughput), words/s and sentences/s read from their own logs, round after round; the ReLA systems also with
    RELA_FAIRSEQ_KERNEL=eager (``--extra``). Decoding uses the task's trained checkpoints (scripts/compare.sh)."""
    from rela_tools.files import read_json
    from rela_tools.pipeline.config import load_task
    from rela_tools.pipeline.throughput import measure

    task = load_task(args.end_to_end)  # QUICK=1: the quick variant scripts/compare.sh trained
    systems = ["softmax"] + [s for s in args.systems if s != "softmax"]
    checkpoints = {}
    for system in systems:
        result = task.result_path(system)
        if not os.path.exists(result):
            raise SystemExit(f"--end-to-end {args.end_to_end}: {system} has no trained checkpoint ({result} is "
                             f"missing); train it first: bash scripts/compare.sh {args.end_to_end}")
        checkpoints[system] = os.path.join(task.checkpoint_dir(system), read_json(result)["checkpoint"])
    variants = {}
    for name in args.extra:
        if name not in E2E_VARIANTS:
            raise SystemExit(f"--end-to-end takes --extra {' '.join(E2E_VARIANTS)}, not {name!r}")
        variants[name] = E2E_VARIANTS[name]
    speed = measure(task, checkpoints, updates=args.e2e_updates, sentences=args.e2e_sentences, rounds=args.repeats,
                    variants=variants, progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True))
    lines = ["| system | fairseq-train words/s | train × softmax | fairseq-generate sentences/s | decode × softmax |",
             "|---|---|---|---|---|"]
    for name, row in speed["systems"].items():
        lines.append(f"| {name} | {row['train_wps_median']:.0f} | {row['train_ratio']:.2f} | "
                     f"{row['decode_sps_median']:.1f} | {row['decode_ratio']:.2f} |")
    return "\n".join(lines), speed


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import fairseq

    from rela_fairseq import kernels

    kernel = "fused" if kernels._CpuExtension.load() is not None else f"eager ({kernels._CpuExtension.failure})"
    env = {"python": platform.python_version(), "torch": torch.__version__, "fairseq": fairseq.__version__,
           "device": args.device, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "rela_kernel_auto": kernel if args.device == "cpu" else "eager (the kernels are CPU only)"}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: seconds")
    p.add_argument("--sizes", nargs="+", choices=SIZES, metavar="ARCH",
                   help="model sizes: the dimensions of these architectures (default: transformer_rela_small "
                        f"transformer_rela; --quick: transformer_rela_tiny); one of {', '.join(SIZES)}")
    p.add_argument("--lengths", nargs="+", type=int, help="sequence lengths (default: 16 48 128 256 512)")
    p.add_argument("--max-decode-length", type=int, help="decoding is timed up to this length (default 256)")
    p.add_argument("--memory-lengths", nargs="*", type=int,
                   help="lengths at which only peak training memory is measured (default: 1024)")
    p.add_argument("--measure", nargs="+", choices=MEASURES, default=list(MEASURES),
                   help="what to measure (default: all): training speed, decoding speed, peak training memory")
    p.add_argument("--repeats", type=int, help="interleaved rounds of one step (or decode) per system (default 5)")
    p.add_argument("--train-tokens", type=int, help="target tokens per training batch (default 2048)")
    p.add_argument("--decode-sentences", type=int, help="sentences per decoding batch (default 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--systems", nargs="+", default=list(PAPER_SYSTEMS), choices=list(SYSTEMS),
                   help="systems to measure (default: the paper's six; softmax, the reference, is always measured)")
    p.add_argument("--extra", nargs="*", default=[], choices=list(EXTRA_SYSTEMS),
                   help="also measure these variants: softmax through the plugin, ReLA-g or ReLA-i with --rela-kernel "
                        "eager (rela_g and rela_i run auto: the fused kernels where they build), or a second copy of "
                        "the stock model (softmax_control: the ratio that means 'no difference' in this run)")
    p.add_argument("--end-to-end", metavar="TASK",
                   help="time fairseq-train and fairseq-generate themselves on this prepared task (configs/TASK.yaml, "
                        "trained by scripts/compare.sh TASK), from their own logs, instead of the model in process")
    p.add_argument("--e2e-updates", type=int, default=40, help="fairseq-train updates per measurement (end to end)")
    p.add_argument("--e2e-sentences", type=int, default=500,
                   help="test sentences per fairseq-generate measurement (end to end)")
    p.add_argument("--seed", type=int, default=1,
                   help="the models' initial weights, the batches and dropout (default 1; the same for every system)")
    p.add_argument("--json", help="write all measurements and ratios to this file")
    args = p.parse_args(argv)
    quick = dict(sizes=["transformer_rela_tiny"], lengths=[8, 16], repeats=1, train_tokens=256, decode_sentences=4,
                 max_decode_length=16, memory_lengths=[32])
    full = dict(sizes=["transformer_rela_small", "transformer_rela"], lengths=[16, 48, 128, 256, 512], repeats=5,
                train_tokens=2048, decode_sentences=16, max_decode_length=256, memory_lengths=[1024])
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_arguments(p, args, {"repeats": 1, "train_tokens": 1, "decode_sentences": 1, "lengths": 2,
                              "e2e_updates": 2, "e2e_sentences": 1})
    return args


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Reject a number (or any number of a list) below its minimum, and --device cuda without a GPU, naming them."""
    for key, minimum in minimums.items():
        value = getattr(args, key)
        if min(value if isinstance(value, list) else [value]) < minimum:
            parser.error(f"--{key.replace('_', '-')} must be at least {minimum}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is available")


def quiet_logging() -> None:
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, force=True)  # fairseq's imports leave the root logger chatty
    warnings.filterwarnings("ignore", category=UserWarning)


def ignore_kernel_override() -> None:
    """Each system names its kernel (rela_g: auto, rela_g_eager: eager); RELA_FAIRSEQ_KERNEL would mislabel them."""
    from rela_fairseq import kernels

    if os.environ.pop(kernels.ENV_VAR, None):
        print(f"ignoring {kernels.ENV_VAR} (--extra rela_g_eager measures the eager path)", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    ignore_kernel_override()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.time()
    if args.end_to_end:
        table, speed = end_to_end(args)
        reference = "fairseq-train/fairseq-generate with --attn-fn softmax (fairseq's own attention code)"
        results, raw = speed["systems"], speed
    else:
        results, raw = run(args)
        table = markdown(results)
        reference = "fairseq's stock softmax Transformer"
    print(table)
    print(f"\n{environment(args)}; medians of {args.repeats} interleaved rounds; ratios: median over "
          f"rounds of the ratio to {reference} in that round; {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            sizes = {} if args.end_to_end else {size: dimensions(size) for size in args.sizes}
            json.dump({"environment": environment(args), "settings": {k: v for k, v in vars(args).items()},
                       "sizes": sizes, "results": results, "raw": raw}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
