"""Rectified Linear Attention (Zhang, Titov & Sennrich, EMNLP 2021): the math in one module.

The steps of docs/method.md, for one attention module of width d with H heads of width d_h = d / H:

    1. Q = X W_q + b_q,  K = M W_k + b_k,  V = M W_v + b_v, split into H heads
    2. S_h = (Q_h / sqrt(d_h)) K_hᵀ                       same scaling as softmax attention
    3. masked scores become 0                              padding keys, future positions
    4. A_h = ReLU(S_h)                                     no normalisation over keys; a row may be all 0
    5. Ã_h = dropout(A_h)                                  weights reported for analysis are A_h
    6. O = concat_h(Ã_h V_h)                               heads concatenated *before* the norm
    7. RMSNorm(z) = g ⊙ z / sqrt(mean_k z_k² + 1e-8)       over the full width d, in fp32
       ReLA-g: RMSNorm(O) ⊙ σ(w ⊙ O)                       w a length-d vector, g initialised to ones
       ReLA-i: RMSNorm(O), no gate                         g initialised uniform in ±sqrt(3/d)
    8. Y = Norm(O) W_o + b_o

``rela_attention`` is the plain reference of those eight lines (used by the tests); the model runs the same math
through ``rectify`` (steps 3-4) and ``RelaNorm`` (step 7, ``rela_norm_reference``) inside fairseq's
``MultiheadAttention``, which already does steps 1, 2, 5, 6 and 8 and the key/value caching for incremental decoding.
Where ``--rela-kernel`` allows (``kernels``), steps 2-6 and step 7 run as compiled kernels instead, tested against
these functions.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rela_tools.errors import RelaConfigError

from . import kernels

EPS = 1e-8  # inside the square root, as in the official code
# the choices of each switch (settings.AttentionSettings offers them as options, with their defaults and help)
VARIANTS = ("gated", "init")  # ReLA-g, ReLA-i
ACTIVATIONS = ("relu", "relu2")
NORMS = ("rms", "layer", "none")
NORM_SCOPES = ("all", "head")
GAIN_INITS = ("ones", "xavier")


def rectify(scores: Tensor, activation: str = "relu") -> Tensor:
    """Steps 3-4: ReLU of the scores.

    Masked scores arrive as exactly 0 (padding and the causal mask, set in place by ``RelaMultiheadAttention``) or,
    in incremental decoding, as -inf (fairseq fills the padding of the cached keys itself, replacing the score, so no
    inf - inf arises); ReLU maps both to exactly 0 with gradient 0: the spec's "masked score := 0, then ReLU".
    ``relu2`` is the squared ReLU of the ablations.
    """
    weights = F.relu(scores)
    if activation == "relu2":
        weights = weights * weights
    return weights


class RelaNorm(nn.Module):
    """Step 7: the normalisation of the concatenated head outputs, with the ReLA-g gate.

    ``scope="all"`` normalises over the full width d (the paper); ``scope="head"`` over each head's d_h slice (an
    ablation). ``norm="none"`` keeps only the gate (if any). The gain g is always a length-d vector.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, norm: str, scope: str, gate: bool, gain_init: str,
                 kernel: str = "auto"):
        super().__init__()
        for name, value, choices in (
            ("norm", norm, NORMS),
            ("norm scope", scope, NORM_SCOPES),
            ("gain init", gain_init, GAIN_INITS),
        ):
            if value not in choices:
                raise RelaConfigError(f"unknown ReLA {name} {value!r}; choose one of {', '.join(choices)}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.norm, self.scope, self.gain_init, self.kernel = norm, scope, gain_init, kernel
        self.width = embed_dim if scope == "all" else embed_dim // num_heads
        self.weight = nn.Parameter(torch.ones(embed_dim)) if norm != "none" else None
        self.bias = nn.Parameter(torch.zeros(embed_dim)) if norm == "layer" else None
        self.gate_weight = nn.Parameter(torch.zeros(embed_dim)) if gate else None
        self.reset_parameters(private_generator())

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Gain: ones (ReLA-g) or uniform ±sqrt(3/d) (ReLA-i); gate w: uniform ±sqrt(3/d).

        ``generator`` lets a model draw these from a private stream, so that a ReLA model and a softmax model built
        with the same seed share every other initial weight.
        """
        bound = math.sqrt(3.0 / self.embed_dim)
        with torch.no_grad():
            if self.weight is not None:
                if self.gain_init == "ones":
                    self.weight.fill_(1.0)
                else:
                    self.weight.uniform_(-bound, bound, generator=generator)
            if self.bias is not None:
                self.bias.zero_()
            if self.gate_weight is not None:
                self.gate_weight.uniform_(-bound, bound, generator=generator)

    def forward(self, heads: Tensor) -> Tensor:
        """``heads``: [..., d], the concatenated head outputs O. Computed in fp32, returned in the input dtype; RMSNorm
        through the fused kernel where ``--rela-kernel`` and the input allow (``kernels``)."""
        ext = kernels.extension_for(heads, self.kernel) if self.norm == "rms" else None
        if ext is not None and kernels.norm_supported(ext, self.width, self.embed_dim):
            assert self.weight is not None  # RMSNorm has a gain
            return kernels.fused_gated_rms_norm(ext, heads, self.weight, self.gate_weight, self.width, EPS)
        return rela_norm(heads, self.weight, self.bias, self.gate_weight, self.norm, self.width)

    def extra_repr(self) -> str:
        gate = "gated" if self.gate_weight is not None else "no gate"
        return f"{self.embed_dim}, norm={self.norm}, scope={self.scope}, {gate}"  # the kernel is no model property


def rela_norm_reference(heads: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], gate_weight: Optional[Tensor],
                        norm: str, width: int) -> Tensor:
    """Step 7 on O = ``heads`` [..., d], as written: Norm(z) (⊙ σ(w ⊙ z) for ReLA-g), z = O in fp32; ``width`` is
    d, or d_h for a per-head norm. Returned in the dtype of ``heads``."""
    z = at_least_fp32(heads)
    y = z
    if norm != "none":
        parts = z.reshape(*z.shape[:-1], -1, width)
        if norm == "rms":
            parts = parts * torch.rsqrt(parts.pow(2).mean(-1, keepdim=True) + EPS)
        else:
            parts = F.layer_norm(parts, (width,), eps=EPS)
        assert weight is not None  # a norm has a gain
        y = parts.reshape(z.shape) * weight.to(z.dtype)
        if bias is not None:
            y = y + bias.to(z.dtype)
    if gate_weight is not None:
        y = y * torch.sigmoid(z * gate_weight.to(z.dtype))
    return y.to(heads.dtype)


def rela_norm(heads: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], gate_weight: Optional[Tensor],
              norm: str, width: int) -> Tensor:
    """``rela_norm_reference``; for RMSNorm through ``GatedRMSNorm``, which keeps one tensor for the backward pass
    instead of about seven (same values and gradients), or, without gradients (decoding), its in-place forward."""
    if norm != "rms":
        return rela_norm_reference(heads, weight, bias, gate_weight, norm, width)
    assert weight is not None  # RMSNorm has a gain
    if torch.is_grad_enabled():
        return GatedRMSNorm.apply(heads, weight, gate_weight, width)
    y, _ = GatedRMSNorm.compute(heads, weight, gate_weight, width)
    return y


class GatedRMSNorm(torch.autograd.Function):
    """y = g ⊙ z / sqrt(mean(z²) + ε) [⊙ σ(w ⊙ z)], computed in fp32, over rows of ``width``.

    Saves only the input and the per-row rsqrt; the backward pass recomputes the normalised rows and the gate (cheap
    elementwise work) rather than storing them: ReLA-g's peak training memory stays near softmax's. Both passes work
    in place wherever they can: on a CPU, a fresh activation-sized tensor costs more (page faults) than the arithmetic
    done on it, and the backward pass below allocates five instead of about fifteen (2x faster than out of place)."""

    @staticmethod
    def compute(heads: Tensor, weight: Tensor, gate_weight: Optional[Tensor], width: int) -> tuple[Tensor, Tensor]:
        """(y, per-row rsqrt): the forward pass, with as few kernels and allocations as eager PyTorch allows."""
        z = at_least_fp32(heads)
        rows = z.reshape(-1, width)
        # mean(z²) through the norm kernel: one reduction, no z² tensor
        rstd = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).pow_(2).div_(width).add_(EPS).rsqrt_()
        y = (rows * rstd).view(z.shape).mul_(weight.to(z.dtype))
        if gate_weight is not None:
            y.mul_(torch.sigmoid_(z * gate_weight.to(z.dtype)))
        return y.to(heads.dtype), rstd

    @staticmethod
    def forward(ctx, heads: Tensor, weight: Tensor, gate_weight: Optional[Tensor], width: int) -> Tensor:
        y, rstd = GatedRMSNorm.compute(heads, weight, gate_weight, width)
        ctx.save_for_backward(heads, weight, gate_weight, rstd)
        ctx.width = width
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        """With n = z·rstd the normalised rows, s = σ(w ⊙ z) the gate and y = n ⊙ g ⊙ s:
        dg = Σ grad·s·n,  dw = Σ grad·n·g·s(1-s)·z,  dz = rstd·(d_n - n·mean(d_n ⊙ n)) + grad·n·g·s(1-s)·w,
        with d_n = grad·s·g (s = 1 without a gate)."""
        heads, weight, gate_weight, rstd = ctx.saved_tensors
        width = ctx.width
        z = at_least_fp32(heads)
        grad = grad.to(z.dtype)
        g = weight.to(z.dtype)
        sum_dims = tuple(range(z.dim() - 1))
        normed = (z.reshape(-1, width) * rstd).view(z.shape)
        grad_gate = dz_gate = None
        if gate_weight is not None:
            w = gate_weight.to(z.dtype)
            gate = torch.sigmoid_(z * w)
            d_scaled = grad * gate  # dL / d(n ⊙ g)
            grad_n_s = d_scaled * normed  # grad · s · n
            grad_weight = grad_n_s.sum(sum_dims)
            d_pre = grad_n_s.addcmul_(grad_n_s, gate, value=-1).mul_(g)  # grad · n · g · s(1 - s)
            grad_gate = (d_pre * z).sum(sum_dims).to(gate_weight.dtype)
            dz_gate = d_pre.mul_(w)
            d_normed = d_scaled.mul_(g)
        else:
            grad_weight = (grad * normed).sum(sum_dims)
            d_normed = grad * g
        grad_weight = grad_weight.to(weight.dtype)
        d_normed = d_normed.reshape(-1, width)
        rows = normed.reshape(-1, width)
        proj = torch.linalg.vecdot(d_normed, rows).unsqueeze_(-1).div_(width)  # mean(d_n ⊙ n) per row
        dz = d_normed.addcmul_(rows, proj, value=-1).mul_(rstd).view(z.shape)
        if dz_gate is not None:
            dz.add_(dz_gate)
        return dz.to(heads.dtype), grad_weight, grad_gate, None


def at_least_fp32(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are (fp64 for gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def private_generator() -> torch.Generator:
    """A generator seeded from torch's global seed: drawing from it leaves the global random stream untouched."""
    return torch.Generator().manual_seed(torch.initial_seed() % 2**63)


def rela_attention(query: Tensor, memory: Tensor, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module,
                   out_proj: nn.Module, num_heads: int, norm: Callable[[Tensor], Tensor],
                   key_padding_mask: Optional[Tensor] = None, causal: bool = False,
                   activation: str = "relu") -> tuple[Tensor, Tensor]:
    """The plain reference, spec steps 1-8 line by line (no dropout, batch-first).

    query [B, T, d], memory [B, S, d], key_padding_mask [B, S] (True = pad). Returns (Y [B, T, d], A [B, H, T, S]).
    """
    bsz, tgt_len, dim = query.shape
    src_len = memory.size(1)
    head_dim = dim // num_heads

    def split(x: Tensor) -> Tensor:
        return x.view(bsz, -1, num_heads, head_dim).transpose(1, 2)

    q, k, v = split(q_proj(query)), split(k_proj(memory)), split(v_proj(memory))  # 1
    scores = (q / math.sqrt(head_dim)) @ k.transpose(-1, -2)  # 2
    masked = torch.zeros(bsz, 1, tgt_len, src_len, dtype=torch.bool, device=query.device)
    if key_padding_mask is not None:
        masked = masked | key_padding_mask.bool()[:, None, None, :]
    if causal:
        masked = masked | torch.ones(tgt_len, src_len, dtype=torch.bool, device=query.device).triu(1)
    scores = scores.masked_fill(masked, 0.0)  # 3
    weights = F.relu(scores)  # 4
    if activation == "relu2":
        weights = weights * weights
    heads = (weights @ v).transpose(1, 2).reshape(bsz, tgt_len, dim)  # 5 (no dropout), 6
    return out_proj(norm(heads)), weights  # 7, 8
