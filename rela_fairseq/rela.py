"""Rectified Linear Attention (Zhang, Titov & Sennrich, EMNLP 2021): the math in one module.

The steps of ``shared/spec/rela.md`` §1, for one attention module of width d with H heads of width d_h = d / H:

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
through ``rectify`` (steps 3-4) and ``RelaNorm`` (step 7) inside fairseq's ``MultiheadAttention``, which already does
steps 1, 2, 5, 6 and 8 and the key/value caching for incremental decoding.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RelaConfigError

EPS = 1e-8  # inside the square root, as in the official code
ACTIVATIONS = ("relu", "relu2")
NORMS = ("rms", "layer", "none")
NORM_SCOPES = ("all", "head")
GAIN_INITS = ("ones", "xavier")


def rectify(scores, activation="relu"):
    """Steps 3-4: ReLU of the scores.

    fairseq's attention hands over masked scores as -inf; ReLU(-inf) is exactly 0 with gradient 0, the same value and
    gradient as the spec's "masked score := 0, then ReLU", without another pass over the scores. ``relu2`` is the
    squared ReLU of the ablations.
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

    def __init__(self, embed_dim, num_heads, norm="rms", scope="all", gate=True, gain_init="ones"):
        super().__init__()
        for name, value, choices in (
            ("norm", norm, NORMS),
            ("norm scope", scope, NORM_SCOPES),
            ("gain init", gain_init, GAIN_INITS),
        ):
            if value not in choices:
                raise RelaConfigError(f"unknown ReLA {name} {value!r}; choose one of {', '.join(choices)}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.norm, self.scope, self.gain_init = norm, scope, gain_init
        self.weight = nn.Parameter(torch.ones(embed_dim)) if norm != "none" else None
        self.bias = nn.Parameter(torch.zeros(embed_dim)) if norm == "layer" else None
        self.gate_weight = nn.Parameter(torch.zeros(embed_dim)) if gate else None
        self.reset_parameters(private_generator())

    def reset_parameters(self, generator=None):
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

    def forward(self, heads):
        """``heads``: [..., d], the concatenated head outputs O. Computed in fp32, returned in the input dtype."""
        z = at_least_fp32(heads)
        y = self._normalise(z)
        if self.gate_weight is not None:
            y = y * torch.sigmoid(z * self.gate_weight.to(z.dtype))
        return y.to(heads.dtype)

    def _normalise(self, z):
        if self.norm == "none":
            return z
        width = self.embed_dim if self.scope == "all" else self.embed_dim // self.num_heads
        shape = z.shape
        parts = z.reshape(*shape[:-1], -1, width)
        if self.norm == "rms":
            parts = _rms_norm(parts, width)
        else:
            parts = F.layer_norm(parts, (width,), eps=EPS)
        y = parts.reshape(shape) * self.weight.to(z.dtype)
        return y + self.bias.to(z.dtype) if self.bias is not None else y

    def extra_repr(self):
        gate = "gated" if self.gate_weight is not None else "no gate"
        return f"{self.embed_dim}, norm={self.norm}, scope={self.scope}, {gate}"


def at_least_fp32(x):
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are (fp64 for gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def private_generator():
    """A generator seeded from torch's global seed: drawing from it leaves the global random stream untouched."""
    return torch.Generator().manual_seed(torch.initial_seed() % 2**63)


def _rms_norm(z, width):
    if hasattr(F, "rms_norm"):  # one fused kernel on torch >= 2.4
        return F.rms_norm(z, (width,), eps=EPS)
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS)


def rela_attention(query, memory, q_proj, k_proj, v_proj, out_proj, num_heads, norm, key_padding_mask=None,
                   causal=False, activation="relu"):
    """The plain reference, spec steps 1-8 line by line (no dropout, batch-first).

    query [B, T, d], memory [B, S, d], key_padding_mask [B, S] (True = pad). Returns (Y [B, T, d], A [B, H, T, S]).
    """
    bsz, tgt_len, dim = query.shape
    src_len = memory.size(1)
    head_dim = dim // num_heads

    def split(x):
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
