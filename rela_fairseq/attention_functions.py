"""The attention functions behind one small interface.

An ``AttentionFunction`` turns attention scores ``[B, H, T, S]`` (masked keys hold -inf, as fairseq hands them over)
into weights, and may post-process the concatenated head outputs ``[T, B, d]`` before the output projection (only
ReLA does: its norm and gate). Every model code path treats them alike:

=============  =====================================================  ================  ===============
name           weights                                                rows sum to one   parameters
=============  =====================================================  ================  ===============
softmax        softmax(s)                                             yes               none
sparsemax      sparsemax(s) (Martins & Astudillo 2016)                yes               none
entmax15       1.5-entmax(s) (Peters et al. 2019)                     yes               none
entmax_alpha   α-entmax(s), α learned per head (Correia et al. 2019)  yes               pre_alpha [H]
rela           ReLU(s), then norm (+ gate) on the head outputs        no                norm, gate [d]
sigmoid        σ(s - log n) per key (Ramapuram et al. 2025)           no                none, or bias [H]
relu_len       ReLU(s) / n (Wortsman et al. 2023)                     no                none
softmax_null   exp(s) / (1 + Σ exp(s)): a null key of logit 0 and     at most one       none
               value 0 (fairseq's add_zero_attn)
=============  =====================================================  ================  ===============

n is the number of keys a query may attend to (the unmasked ones: the source length, or t for the t-th target
position under the causal mask), so that a decoding step sees the n of the full forward. sigmoid, relu_len and
softmax_null are the controls for ReLA's switched-off heads: each can put (almost) no weight on any key without a
norm or gate (docs/method.md).

Each module records its settings in the checkpoint (``get_extra_state``); loading weights trained with other settings
fails with a message naming both, unless ``allow_change`` is set and the parameters still fit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from rela_tools.errors import AttentionSettingsError, RelaConfigError, require

from .rela import RelaNorm, at_least_fp32, rectify

if TYPE_CHECKING:
    from .settings import AttentionSettings

STOCK_SETTINGS = {"attn_fn": "softmax", "params": []}  # what a stock fairseq checkpoint (no record) holds


class AttentionFunction(nn.Module):
    name: str = None  # type: ignore[assignment]  # each subclass's --attn-fn name
    sums_to_one = True
    masked_score = float("-inf")  # what a masked (padding, future) score is set to before the mapping
    fused_activation: Optional[str] = None  # the element-wise functions: what the fused kernels compute for them
    kernel = "eager"  # their --rela-kernel choice

    def __init__(self) -> None:
        super().__init__()
        self.allow_change = False  # set by the model builder from --allow-attn-fn-change

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [B, H, T, S] -> weights [B, H, T, S] (fp32 or the scores' dtype)."""
        raise NotImplementedError

    def combine(self, heads: torch.Tensor) -> torch.Tensor:
        """Post-process the concatenated head outputs [T, B, d]; identity except for ReLA."""
        return heads

    def fused_bias(self) -> Optional[torch.Tensor]:
        """A bias per head that the fused kernels add to the scores (sigmoid's learned one), or None."""
        return None

    def settings(self) -> dict:
        """What must match between a checkpoint and the model it is loaded into (primitive values only)."""
        return {"attn_fn": self.name, "params": sorted(name for name, _ in self.named_parameters())}

    def describe(self) -> str:
        return self.name

    def get_extra_state(self) -> dict:
        return self.settings()

    def set_extra_state(self, state: dict) -> None:
        pass  # compared in _load_from_state_dict, where the module's name is known

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "_extra_state"
        recorded = state_dict.get(key)
        if recorded is None:
            # No record: a stock fairseq transformer (or a checkpoint saved before this module existed).
            recorded = dict(STOCK_SETTINGS, params=_param_names_under(state_dict, prefix))
            state_dict[key] = recorded
        self._check_settings(recorded, prefix.rstrip("."))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_settings(self, recorded: dict, where: str) -> None:
        mine = self.settings()
        if recorded == mine:
            return
        params_differ = sorted(recorded.get("params", [])) != mine["params"]
        if self.allow_change and not params_differ:
            return
        theirs = _describe_settings(recorded)
        msg = (
            f"the checkpoint's attention settings differ from this model's at {where or 'the attention'}: "
            f"checkpoint {theirs}, model {self.describe()}. "
        )
        if params_differ:
            msg += (
                "Their parameters differ too, so the weights cannot be reused: build the model with the checkpoint's "
                "options (--attn-fn, --encoder/--decoder/--cross-attn-fn, --rela-*)."
            )
        else:
            msg += (
                "Build the model with the checkpoint's options (--attn-fn, --encoder/--decoder/--cross-attn-fn, "
                "--rela-*), or pass --allow-attn-fn-change (generation: --model-overrides "
                "\"{'allow_attn_fn_change': True, ...}\") to run these weights with this model's attention function."
            )
        raise AttentionSettingsError(msg)


def _param_names_under(state_dict: dict, prefix: str) -> list[str]:
    return sorted(k[len(prefix):] for k in state_dict if k.startswith(prefix) and not k.endswith("_extra_state"))


def _describe_settings(settings: dict) -> str:
    name = settings.get("attn_fn", "?")
    if name == "sigmoid":
        return f"sigmoid (bias: {settings.get('bias')})"
    if name == "rela":
        gate = "gated" if settings.get("gate") else "no gate"
        return (f"rela ({settings.get('activation')}, norm={settings.get('norm')}, "
                f"scope={settings.get('norm_scope')}, {gate})")
    return name if settings != STOCK_SETTINGS else "softmax (stock fairseq, no recorded settings)"


class Softmax(AttentionFunction):
    name = "softmax"

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return F.softmax(at_least_fp32(scores), dim=-1)  # fp32 at least, as fairseq.utils.softmax


class _ExactEntmax(AttentionFunction):
    """An exact, sort-based mapping of the entmax package; ``name`` is also the package's function name."""

    def __init__(self) -> None:
        super().__init__()
        self._mapping = getattr(require("entmax", f"--attn-fn {self.name}"), self.name)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return self._mapping(at_least_fp32(scores), dim=-1)


class Sparsemax(_ExactEntmax):
    name = "sparsemax"


class Entmax15(_ExactEntmax):
    name = "entmax15"


class EntmaxAlpha(AttentionFunction):
    """α-entmax with α = 1 + sigmoid(pre_alpha) ∈ (1, 2) learned per head (Correia et al. 2019).

    ``pre_alpha`` starts at logit(alpha_init - 1): 0 for the default 1.5, so an untrained model equals 1.5-entmax. α is
    clamped at 1.01 from below: the α-gradient of entmax divides by (α - 1).
    """

    name = "entmax_alpha"
    MIN_ALPHA = 1.01

    def __init__(self, num_heads: int, alpha_init: float, n_iter: int):
        super().__init__()
        if not 1.0 < alpha_init < 2.0:
            raise RelaConfigError(f"--entmax-alpha-init must lie in (1, 2), got {alpha_init}")
        if n_iter < 1:
            raise RelaConfigError(f"--entmax-bisect-iters must be at least 1, got {n_iter}")
        self._entmax_bisect = require("entmax", "--attn-fn entmax_alpha").entmax_bisect
        self.n_iter = n_iter
        self.pre_alpha = nn.Parameter(torch.full((num_heads,), math.log((alpha_init - 1) / (2 - alpha_init))))

    def alpha(self) -> torch.Tensor:
        return (1.0 + torch.sigmoid(self.pre_alpha)).clamp(min=self.MIN_ALPHA)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        scores = at_least_fp32(scores)
        alpha = self.alpha().to(scores.dtype).view(1, -1, 1, 1)
        return self._entmax_bisect(scores, alpha, dim=-1, n_iter=self.n_iter)


class Rela(AttentionFunction):
    """ReLU weights; the norm (and the ReLA-g gate) on the concatenated head outputs (``rela.py``)."""

    name = "rela"
    sums_to_one = False
    masked_score = 0.0  # masked scores become exactly 0 (not -inf) before the ReLU (docs/method.md, step 3)

    def __init__(self, embed_dim: int, num_heads: int, settings: AttentionSettings):
        super().__init__()
        self.activation = settings.rela_activation
        self.norm = RelaNorm(embed_dim, num_heads, norm=settings.rela_norm, scope=settings.rela_norm_scope,
                             gate=settings.rela_variant == "gated", gain_init=settings.gain_init,
                             kernel=settings.rela_kernel)  # no model setting: fused and eager give the same results

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return rectify(scores, self.activation)

    @property
    def fused_activation(self) -> str:  # type: ignore[override]
        return self.activation

    @property
    def kernel(self) -> str:  # type: ignore[override]
        return self.norm.kernel

    def combine(self, heads: torch.Tensor) -> torch.Tensor:
        return self.norm(heads)

    def settings(self) -> dict:
        return dict(super().settings(), activation=self.activation, norm=self.norm.norm, norm_scope=self.norm.scope,
                    gate=self.norm.gate_weight is not None)

    def describe(self) -> str:
        return _describe_settings(self.settings())


def unmasked_keys(scores: torch.Tensor) -> torch.Tensor:
    """n per query [B, H, T, 1]: the keys whose score is not masked (-inf), at least 1 (a row with every key masked
    gets weight 0 everywhere, not 0/0). Not ``isfinite``: a score that overflowed to +inf in fp16 is still a key."""
    return (~torch.isneginf(scores)).sum(dim=-1, keepdim=True).clamp(min=1).to(scores.dtype)


class Sigmoid(AttentionFunction):
    """σ(s + b) per key, without normalisation (Ramapuram et al., "Theory, Analysis, and Best Practices for Sigmoid
    Self-Attention", ICLR 2025): b = -log n, their recommended bias, or (``--sigmoid-bias learned``) -log n plus a bias
    learned per head, starting at 0 (so an untrained model equals the default)."""

    name = "sigmoid"
    sums_to_one = False
    fused_activation = "sigmoid"

    def __init__(self, num_heads: int, bias: str, kernel: str = "auto"):
        super().__init__()
        self.kernel = kernel
        if bias not in SIGMOID_BIASES:
            raise RelaConfigError(f"unknown --sigmoid-bias {bias!r}; choose one of {', '.join(SIGMOID_BIASES)}")
        self.bias = nn.Parameter(torch.zeros(num_heads)) if bias == "learned" else None

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        scores = at_least_fp32(scores)  # masked keys: σ(-inf) = 0 exactly, and a zero gradient
        logits = scores - torch.log(unmasked_keys(scores))
        if self.bias is not None:
            logits = logits + self.bias.to(logits.dtype).view(1, -1, 1, 1)
        return torch.sigmoid(logits)

    def fused_bias(self) -> Optional[torch.Tensor]:
        return self.bias

    def settings(self) -> dict:
        return dict(super().settings(), bias="learned" if self.bias is not None else "length")

    def describe(self) -> str:
        return _describe_settings(self.settings())


class ReluLength(AttentionFunction):
    """ReLU(s) / n (Wortsman et al., "Replacing softmax with ReLU in Vision Transformers", 2023): ReLA's ReLU with
    their scaling by the sequence length instead of a norm and gate."""

    name = "relu_len"
    sums_to_one = False
    fused_activation = "relu_len"

    def __init__(self, kernel: str = "auto"):
        super().__init__()
        self.kernel = kernel

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        scores = at_least_fp32(scores)  # masked keys: ReLU(-inf) = 0 exactly, and a zero gradient
        return F.relu(scores) / unmasked_keys(scores)


class SoftmaxNull(AttentionFunction):
    """Softmax over the keys and one more, of logit 0 and value 0: exp(s_i) / (1 + Σ_j exp(s_j)). The weight left
    for that null key, 1 / (1 + Σ_j exp(s_j)), attends to nothing. fairseq's ``add_zero_attn`` (x-transformers'
    ``add_zero_kv``) appends that key to the inputs; here it is the mapping, so that every route (the weights asked
    for, incremental decoding, the analyses) treats it alike."""

    name = "softmax_null"
    sums_to_one = False

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        scores = at_least_fp32(scores)
        # stable: shift by max(0, max_j s_j); the null key's exp(0 - m) stays in the denominator
        shift = scores.amax(dim=-1, keepdim=True).clamp(min=0.0)
        exp = torch.exp(scores - shift)  # masked keys: exp(-inf) = 0
        return exp / (torch.exp(-shift) + exp.sum(dim=-1, keepdim=True))


SIGMOID_BIASES = ("length", "learned")

ATTENTION_FUNCTIONS: dict[str, type[AttentionFunction]] = {
    cls.name: cls for cls in (Softmax, Sparsemax, Entmax15, EntmaxAlpha, Rela, Sigmoid, ReluLength, SoftmaxNull)}



def build_attention_function(embed_dim: int, num_heads: int, settings: AttentionSettings) -> AttentionFunction:
    """One attention function as ``settings`` (one attention type's, ``AttentionSettings.of``) define it."""
    fn: AttentionFunction
    if settings.attn_fn == "rela":
        fn = Rela(embed_dim, num_heads, settings)
    elif settings.attn_fn == "entmax_alpha":
        fn = EntmaxAlpha(num_heads, alpha_init=settings.entmax_alpha_init, n_iter=settings.entmax_bisect_iters)
    elif settings.attn_fn == "sigmoid":
        fn = Sigmoid(num_heads, settings.sigmoid_bias, settings.rela_kernel)
    elif settings.attn_fn == "relu_len":
        fn = ReluLength(settings.rela_kernel)
    else:
        fn = ATTENTION_FUNCTIONS[settings.attn_fn]()
    fn.allow_change = settings.allow_attn_fn_change
    return fn
