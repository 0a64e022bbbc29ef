"""Fused ReLA kernels (``--rela-kernel``): the attention core from projected q, k, v to the head outputs, the attention
step of incremental decoding, and the gated RMSNorm, each one kernel per direction.

* CPU (float32): ``rela_cpu.cpp``, a C++ extension (ATen, OpenMP through ``at::parallel_for``) compiled by PyTorch's
  extension tooling on first use (about half a minute) and cached (``TORCH_EXTENSIONS_DIR``, by default
  ``~/.cache/torch_extensions``); nothing is built at install time. It needs a C++ compiler and ninja
  (``pip install ninja``, or ``rela-fairseq[kernels]``).
* GPU (float32, fp16, bf16): ``rela_triton.py``, the same functions in Triton (which CUDA builds of PyTorch bring).
* ``--rela-kernel auto`` (the default) uses the kernels where they can be loaded; where they cannot (no compiler, no
  ninja, no Triton) it says why once, in one line, and runs the eager implementation (``rela.py``). ``fused`` makes
  that an error. Both run tensors the kernels do not take (float64, fp16 on a CPU) eagerly. ``eager`` never uses them.
* ``RELA_FAIRSEQ_KERNEL=eager|fused|auto`` in the environment overrides the option, checkpoints' included (a model
  trained with ``fused`` and decoded where no compiler exists; the test suite runs under each).

The eager path stays the reference: ``tests/unit/test_kernels.py`` checks both kernels against it (outputs, gradients,
masks, incremental decoding, dropout statistics), the Triton ones in Triton's interpreter where there is no GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from rela_tools.errors import RelaConfigError, RelaFairseqError

logger = logging.getLogger(__name__)
KERNELS = ("auto", "fused", "eager")
# the element-wise attention functions the kernels compute (their code is the index): ReLA's ReLU and squared ReLU,
# ReLU / n (--attn-fn relu_len) and sigmoid(x - log n + b) (--attn-fn sigmoid), n a row's unmasked keys
ACTIVATIONS = ("relu", "relu2", "relu_len", "sigmoid")
ENV_VAR = "RELA_FAIRSEQ_KERNEL"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rela_cpu.cpp")


class KernelUnavailable(RelaFairseqError):
    pass


class _Backend:
    """One device's kernels, loaded on first use; or why they are unavailable (said once, in one line)."""

    module: Any = None
    failure: Optional[str] = None
    dtypes: tuple = ()
    _load: Callable[[], Any]  # each backend's loader (a static method)

    @classmethod
    def load(cls) -> Any:
        if cls.module is None and cls.failure is None:
            try:
                cls.module = cls._load()
            except Exception as exc:  # the extension tooling raises many kinds (RuntimeError, OSError, ...)
                text = str(exc).strip()
                cls.failure = text.splitlines()[0] if text else type(exc).__name__
                logger.warning(f"rela_fairseq: the fused ReLA kernels are unavailable ({cls.failure}); "
                               "running the eager implementation")
        return cls.module


class _CpuExtension(_Backend):
    """``rela_cpu.cpp``, compiled on first use (or loaded from torch's extension cache)."""

    dtypes = (torch.float32,)

    @staticmethod
    def _load() -> Any:
        return _build()


class _TritonKernels(_Backend):
    """``rela_triton.py`` on CUDA devices (Triton compiles each kernel on first use and caches it)."""

    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    @staticmethod
    def _load() -> Any:
        try:
            from .rela_triton import TritonKernels
        except ImportError as exc:
            raise KernelUnavailable(f"Triton is not installed ({exc})") from exc
        return TritonKernels()


BACKENDS = {"cpu": _CpuExtension, "cuda": _TritonKernels}


def extension_name() -> str:
    """The CPU extension's name in torch's extension cache: one build per Python, torch and instruction set (a
    TORCH_EXTENSIONS_DIR shared by several environments, or machines sharing a home directory, must never load
    another's build). The row loops (ReLU, dropout, norm, gate) are vectorised by the compiler: AVX2 where this CPU
    has it."""
    name = re.sub(r"\W", "_", f"rela_fairseq_cpu_py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}")
    return name + ("_avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "")


def _build() -> Any:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C++ compiler: {compiler!r} is not on PATH")
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        try:  # pip's ninja (rela-fairseq[kernels]) in an environment that is not activated: its bin is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    if not cpp_extension.is_ninja_available():
        raise KernelUnavailable("ninja is not installed: pip install ninja (or rela-fairseq[kernels])")
    flags = ["-O3", "-fopenmp", "-fno-trapping-math"]  # the last lets the compiler vectorise exp_approx
    name = extension_name()
    if name.endswith("_avx2"):
        flags += ["-mavx2", "-mfma"]
    logger.info("rela_fairseq: loading the fused ReLA CPU kernels (compiled on first use, about half a minute, then "
                "cached; --rela-kernel eager skips them)")
    with _one_build_at_a_time(cpp_extension._get_build_directory(name, verbose=False)):
        return cpp_extension.load(name=name, sources=[SOURCE], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                  verbose=False)


@contextlib.contextmanager
def _one_build_at_a_time(directory: str) -> Iterator[None]:
    """torch's own build lock (``lock`` in the build folder, a file created exclusively and removed when the build
    ends) outlives a process killed while building, and every later process then waits for it forever, after the
    line "loading the fused ReLA CPU kernels" (seen when a pre-empted job was killed during its first build). An fcntl
    lock on a file beside it is released by the kernel when its process dies: holding it, this process is the only
    one of the plugin's building or loading there, so a ``lock`` file found is a dead build's and is removed. Where
    fcntl is missing (Windows), torch's lock alone."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "rela_fairseq_build.flock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        stale = os.path.join(directory, "lock")
        if os.path.exists(stale):
            logger.warning(f"rela_fairseq: removing {stale}, left by a build of the kernels that was killed")
            os.remove(stale)
        yield


def selected(kernel: str) -> str:
    """The kernel choice in force: ``RELA_FAIRSEQ_KERNEL`` if set, else the option's."""
    choice = os.environ.get(ENV_VAR) or kernel
    if choice not in KERNELS:
        source = f"{ENV_VAR}={choice}" if os.environ.get(ENV_VAR) else f"--rela-kernel {choice}"
        raise RelaConfigError(f"unknown kernel {source!r}; choose one of {', '.join(KERNELS)}")
    return choice


def extension_for(x: Tensor, kernel: str) -> Any:
    """The fused kernels to run on ``x`` under ``--rela-kernel kernel``, or None for the eager path.

    ``auto`` and ``fused`` both run tensors the kernels do not take (float64 anywhere, fp16 and bf16 on a CPU) eagerly,
    and so everything under autocast (fairseq's ``--amp``), where ``x`` is float32 but the projections that feed the
    kernels are not; ``fused`` differs in refusing to run when this device's kernels cannot be loaded."""
    choice = selected(kernel)
    if choice == "eager":
        return None
    backend = BACKENDS.get(x.device.type)
    if backend is None or x.dtype not in backend.dtypes or _autocast_enabled(x.device.type):
        return None
    ext = backend.load()
    if ext is None and choice == "fused":
        raise KernelUnavailable(f"--rela-kernel fused: the fused ReLA kernels are unavailable ({backend.failure}); "
                                f"use --rela-kernel auto or eager (or set {ENV_VAR}=eager)")
    return ext


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def attention_supported(ext: Any, batch_heads: int, head_dim: int) -> bool:
    """Whether ``ext``'s attention core takes ``batch_heads`` blocks of ``head_dim`` (the CPU kernel: any; Triton:
    within its launch limits, ``TritonKernels.max_batch_heads`` and ``max_head_dim``)."""
    return (batch_heads <= getattr(ext, "max_batch_heads", batch_heads)
            and head_dim <= getattr(ext, "max_head_dim", head_dim))


def activation_supported(ext: Any, activation: str) -> bool:
    """Whether ``ext`` computes ``activation`` (the CPU kernels: all of ACTIVATIONS; Triton's: ``activations``)."""
    return activation in getattr(ext, "activations", ACTIVATIONS)


def norm_supported(ext: Any, width: int, embed_dim: int) -> bool:
    """Whether ``ext`` fuses an RMSNorm over rows of ``width`` (the CPU kernel: any; Triton: the full width)."""
    return width == embed_dim or "head" in getattr(ext, "norm_scopes", ("all", "head"))


class FusedAttention(torch.autograd.Function):
    """O = dropout(act(scale · Q Kᵀ + masks)) V per (batch × head) block, without storing the scores."""

    @staticmethod
    def forward(ctx: Any, ext: Any, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], padding: Optional[Tensor],
                additive: Optional[Tensor], heads: int, scale: float, kind: int, p: float, seed: int) -> Tensor:
        ctx.save_for_backward(q, k, v, bias)
        ctx.ext, ctx.masks, ctx.args = ext, (padding, additive), (heads, scale, kind)
        ctx.dropout = (p, seed)
        return ext.attention_forward(q, k, v, padding, additive, heads, scale, kind, bias, p, seed)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:
        q, k, v, bias = ctx.saved_tensors
        heads = ctx.args[0]
        dq, dk, dv, dbias = ctx.ext.attention_backward(grad_out, q, k, v, *ctx.masks, *ctx.args, bias, *ctx.dropout)
        dbias = dbias.view(-1, heads).sum(0) if bias is not None else None  # the blocks of each head
        return None, dq, dk, dv, dbias, None, None, None, None, None, None, None


def fused_attention(ext: Any, q: Tensor, k: Tensor, v: Tensor, *, heads: int, scale: float,
                    padding: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None, activation: str = "relu",
                    bias: Optional[Tensor] = None, dropout: float = 0.0) -> Tensor:
    """Steps 2-6 of docs/method.md with ``activation`` (one of ACTIVATIONS) as the attention function. q [B·H, T, d_h]
    (unscaled), k, v [B·H, S, d_h], any layout whose last dimension is contiguous (fairseq's time-major views need no
    copy); padding [B, S] (True = pad); attn_mask [T, S], added to the scores (fairseq's causal mask, 0 / -inf) or
    bool (True = masked); ``bias`` [H]: sigmoid's learned bias per head (it gets a gradient). Returns O [B·H, T, d_h]
    as a view of a [T, B·H, d_h] tensor. With ``dropout`` > 0 the seed comes from torch's generator:
    ``torch.manual_seed`` reproduces a run."""
    if not q.size(-1) == k.size(-1) == v.size(-1):  # the CPU kernel reads v with q's head width
        raise ValueError(f"rela fused attention: q, k and v need one head width, got {q.size(-1)}, {k.size(-1)}, "
                         f"{v.size(-1)}")
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout > 0 else 0
    if padding is not None:
        padding = padding.to(torch.bool).contiguous()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill_(attn_mask, float("-inf"))
        attn_mask = attn_mask.to(torch.float32).contiguous()
    if activation not in ACTIVATIONS:
        raise ValueError(f"rela fused attention: unknown activation {activation!r}; choose one of "
                         f"{', '.join(ACTIVATIONS)}")
    return FusedAttention.apply(ext, q, k, v, bias, padding, attn_mask, heads, float(scale),
                                ACTIVATIONS.index(activation), float(dropout), seed)


def attention_step(ext: Any, scores: Tensor, v: Tensor, heads: int, activation: str = "relu",
                   bias: Optional[Tensor] = None) -> Tensor:
    """One decoding step: fairseq's scores [B·H, T, S] (masked keys at the function's masked score) become the weights
    in place; returns O [T, B·H, d_h] (beam search's shared values: see rela_cpu.cpp)."""
    return ext.attention_step(scores, v, heads, ACTIVATIONS.index(activation),
                              None if bias is None else bias.detach().float())


class FusedGatedRMSNorm(torch.autograd.Function):
    """y = g ⊙ z / sqrt(mean(z²) + ε) [⊙ σ(w ⊙ z)] over rows of ``width``: one pass each way."""

    @staticmethod
    def forward(ctx: Any, ext: Any, z: Tensor, gain: Tensor, gate: Optional[Tensor], width: int,
                eps: float) -> Tensor:
        y, rstd = ext.norm_forward(z, gain, gate, width, eps)
        ctx.save_for_backward(z, gain, gate, rstd)
        ctx.ext, ctx.width = ext, width
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        z, gain, gate, rstd = ctx.saved_tensors
        dz, dgain, dgate = ctx.ext.norm_backward(grad, z, gain, gate, rstd, ctx.width)
        return None, dz, dgain, (dgate if gate is not None else None), None, None


def fused_gated_rms_norm(ext: Any, z: Tensor, gain: Tensor, gate: Optional[Tensor], width: int,
                         eps: float) -> Tensor:
    """Step 7 (RMSNorm, ReLA-g's gate if ``gate`` is given) in one kernel per direction; without gradients (decoding)
    the forward kernel alone, no autograd bookkeeping."""
    if torch.is_grad_enabled():
        return FusedGatedRMSNorm.apply(ext, z, gain, gate, width, eps)
    return ext.norm_forward(z, gain, gate, width, eps)[0]
