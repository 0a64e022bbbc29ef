"""Fused ReLA kernels (``--rela-kernel``): the attention core from projected q, k, v to the head outputs, and the
gated RMSNorm, each one kernel per direction.

* CPU: ``rela_cpu.cpp``, a C++ extension (ATen, OpenMP through ``at::parallel_for``) compiled by PyTorch's extension
  tooling on first use and cached (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``); nothing is
  built at install time.
* ``--rela-kernel auto`` (the default) uses the kernels where they are available and the inputs suit them (float32 on
  a CPU, no attention weights asked for), and the eager implementation (``rela.py``) everywhere else; where the
  kernels cannot be built (no C++ compiler, no ninja) it says so once, in one line, and runs eagerly.
* ``fused`` insists: an unavailable kernel is an error. ``eager`` never uses them.

The eager path stays the reference: the tests check the kernels against it (outputs, gradients, masks, incremental
decoding, dropout statistics).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Optional

import torch
from torch import Tensor

from ..errors import RelaFairseqError

logger = logging.getLogger(__name__)
KERNELS = ("auto", "fused", "eager")
_cpu_extension = None
_cpu_failure: Optional[str] = None


class KernelUnavailable(RelaFairseqError):
    pass


def cpu_extension():
    """The compiled CPU extension (built on first use, then loaded from the cache), or None with the reason kept."""
    global _cpu_extension, _cpu_failure
    if _cpu_extension is not None or _cpu_failure is not None:
        return _cpu_extension
    compiler = os.environ.get("CXX", "c++")
    try:
        from torch.utils import cpp_extension

        if shutil.which(compiler) is None:
            raise KernelUnavailable(f"no C++ compiler ({compiler!r} is not on PATH)")
        if not cpp_extension.is_ninja_available():
            raise KernelUnavailable("ninja is not installed (pip install ninja)")
        source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rela_cpu.cpp")
        logger.info("loading the fused ReLA CPU kernels (compiled once, on first use: about a minute)")
        _cpu_extension = cpp_extension.load(name="rela_fairseq_cpu", sources=[source],
                                            extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                            verbose=False)
    except Exception as exc:  # the extension tooling raises many kinds (RuntimeError, OSError, CalledProcessError)
        _cpu_failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning(f"rela_fairseq: the fused ReLA CPU kernels are unavailable ({_cpu_failure}); "
                       "using the eager implementation")
    return _cpu_extension


def extension_for(x: Tensor, kernel: str):
    """The kernels to use for ``x`` under ``--rela-kernel kernel``, or None for the eager path."""
    if kernel == "eager":
        return None
    suitable = x.device.type == "cpu" and x.dtype == torch.float32
    if not suitable:
        if kernel == "fused":
            raise KernelUnavailable(f"--rela-kernel fused: the fused kernels take float32 CPU tensors, not "
                                    f"{x.dtype} on {x.device}; use --rela-kernel auto or eager")
        return None
    ext = cpu_extension()
    if ext is None and kernel == "fused":
        raise KernelUnavailable(f"--rela-kernel fused: the fused ReLA CPU kernels are unavailable ({_cpu_failure}); "
                                "use --rela-kernel auto or eager")
    return ext


class FusedAttention(torch.autograd.Function):
    """O = dropout(act(Q Kᵀ + masks)) V per (batch × head) block, without storing the scores (``rela_cpu.cpp``)."""

    @staticmethod
    def forward(ctx, ext, q: Tensor, k: Tensor, v: Tensor, padding: Optional[Tensor], additive: Optional[Tensor],
                heads: int, squared: bool, p: float, seed: int) -> Tensor:
        out = ext.attention_forward(q, k, v, padding, additive, heads, squared, p, seed)
        ctx.save_for_backward(q, k, v)
        ctx.ext, ctx.masks, ctx.args = ext, (padding, additive), (heads, squared, p, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = ctx.ext.attention_backward(grad_out, q, k, v, *ctx.masks, *ctx.args)
        return None, dq, dk, dv, None, None, None, None, None, None


def fused_attention(ext, q: Tensor, k: Tensor, v: Tensor, padding: Optional[Tensor], additive: Optional[Tensor],
                    heads: int, squared: bool, dropout: float) -> Tensor:
    """q [B*H, T, d_h] (scaled), k, v [KB*H, S, d_h]; padding [KB, S] bool (True = pad); additive [T, S] (0 / -inf).
    With ``dropout`` > 0 the seed comes from torch's generator, so that ``torch.manual_seed`` reproduces a run."""
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout > 0 else 0
    padding = padding.to(torch.bool).contiguous() if padding is not None else None
    additive = additive.to(torch.float32).contiguous() if additive is not None else None
    return FusedAttention.apply(ext, q.contiguous(), k.contiguous(), v.contiguous(), padding, additive, heads,
                                squared, float(dropout), seed)


class FusedGatedRMSNorm(torch.autograd.Function):
    """y = g ⊙ z / sqrt(mean(z²) + ε) [⊙ σ(w ⊙ z)] over rows of ``width``: one pass each way (``rela_cpu.cpp``)."""

    @staticmethod
    def forward(ctx, ext, z: Tensor, gain: Tensor, gate: Optional[Tensor], width: int, eps: float) -> Tensor:
        y, rstd = ext.norm_forward(z, gain, gate, width, eps)
        ctx.save_for_backward(z, gain, gate if gate is not None else torch.empty(0), rstd)
        ctx.ext, ctx.width, ctx.gated = ext, width, gate is not None
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, gain, gate, rstd = ctx.saved_tensors
        dz, dgain, dgate = ctx.ext.norm_backward(grad, z, gain, gate if ctx.gated else None, rstd, ctx.width)
        return None, dz, dgain, (dgate if ctx.gated else None), None, None
