"""fairseq's ``MultiheadAttention`` with a pluggable attention function.

Only the step from scores to output differs from fairseq, so that is all this class overrides: fairseq's own
``forward(..., before_softmax=True)`` does the projections, the scaling, the key/value cache of incremental decoding,
the beam-reduced cross-attention and the causal mask, and hands back the scores and the values; the padding mask is
applied here, in place, where no cache holds it. ReLA runs through the compiled kernels where ``--rela-kernel`` allows
(``_fused_kernels``): the whole core from the projections on without a cache, the step from the scores on in
incremental decoding. Parameter names stay
fairseq's (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``); the attention function adds its own under ``attn_fn``.
"""

from __future__ import annotations

from typing import Optional

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from . import kernels
from .attention_functions import AttentionFunction, Softmax
from .rela import at_least_fp32


class RelaMultiheadAttention(MultiheadAttention):
    skip_embed_dim_check: bool  # fairseq's attribute (its base class is untyped here)

    def __init__(self, embed_dim: int, num_heads: int, *, attn_fn: AttentionFunction, **kwargs):
        super().__init__(embed_dim, num_heads, **kwargs)  # keywords only: fairseq main adds a positional argument
        self.attn_fn = attn_fn
        # Analysis hook: when True, every forward keeps its pre-dropout fp32 weights [B, H, T, S] in last_attn.
        self.store_attn = False
        self.last_attn: Optional[Tensor] = None

    def forward(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                key_padding_mask: Optional[Tensor] = None, incremental_state: Optional[dict] = None,
                need_weights: bool = True, static_kv: bool = False, attn_mask: Optional[Tensor] = None,
                before_softmax: bool = False, need_head_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if isinstance(self.attn_fn, Softmax) and not (need_head_weights or self.store_attn):
            # fairseq's stock path, fused kernels included: --attn-fn softmax is the stock Transformer.
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   incremental_state=incremental_state, need_weights=need_weights,
                                   static_kv=static_kv, attn_mask=attn_mask, before_softmax=before_softmax)
        ext = self._fused_kernels(query, key, incremental_state, before_softmax, need_weights, need_head_weights)
        if ext is not None and incremental_state is None:
            return self._fused_forward(ext, query, key, value, key_padding_mask, attn_mask), None
        scores, v = self._masked_scores_and_values(query, key, value, key_padding_mask, incremental_state,
                                                   static_kv, attn_mask)
        if before_softmax:
            return scores, v

        tgt_len, bsz, embed_dim = query.size()
        heads, src_len = self.num_heads, scores.size(-1)
        if ext is not None:  # a decoding step: the function and A V in one kernel, in place on the scores (then A)
            assert self.attn_fn.fused_activation is not None  # _fused_kernels checked it
            scores = scores.contiguous()
            out = kernels.attention_step(ext, scores, v, heads, self.attn_fn.fused_activation,
                                         self.attn_fn.fused_bias())
            weights = scores.view(bsz, heads, tgt_len, src_len)
        else:
            weights = self.attn_fn(scores.view(bsz, heads, tgt_len, src_len))
            probs = self.dropout_module(weights.to(scores.dtype)).view(bsz * heads, tgt_len, src_len)
            kv_bsz = v.size(0) // heads
            if self.encoder_decoder_attention and bsz != kv_bsz:
                # beam search keeps one copy of the encoder keys/values per sentence, not per hypothesis
                out = torch.einsum("bxhts,bhsd->bxhtd", probs.view(kv_bsz, -1, heads, tgt_len, src_len),
                                   v.view(kv_bsz, heads, src_len, self.head_dim))
                out = out.reshape(bsz * heads, tgt_len, self.head_dim)
            else:
                out = torch.bmm(probs, v)
            out = out.transpose(0, 1)
        out = out.reshape(tgt_len, bsz, embed_dim)  # heads concatenated
        out = self.out_proj(self.attn_fn.combine(out))

        if not (need_weights or need_head_weights or self.store_attn):
            return out, None
        weights = at_least_fp32(weights).view(bsz, heads, tgt_len, src_len)  # pre-dropout
        if self.store_attn:
            self.last_attn = weights.detach()
        if need_head_weights:
            return out, weights.transpose(0, 1)  # [H, B, T, S], as fairseq
        return out, (weights.mean(dim=1) if need_weights else None)

    def _fused_kernels(self, query: Tensor, key: Optional[Tensor], incremental_state: Optional[dict],
                       before_softmax: bool, need_weights: bool, need_head_weights: bool):
        """The compiled kernels (``kernels``) if this call can use them, else None (the eager path): for the
        element-wise functions (ReLA, relu_len, sigmoid: ``AttentionFunction.fused_activation``).

        Two fused routes: without a key/value cache, the whole core from projected q, k, v (training, the encoder,
        validation); in incremental decoding, the step from fairseq's scores (no gradients or dropout there).
        Attention weights asked for (analysis, fairseq's alignment layer) take the eager route, whose weights can
        carry gradients."""
        if self.attn_fn.fused_activation is None or before_softmax or self.store_attn:
            return None
        if incremental_state is None:
            if need_weights or need_head_weights or self.bias_k is not None or self.add_zero_attn:
                return None
            if not self.self_attention and (key is None or key.size(1) != query.size(1)):
                return None
        elif torch.is_grad_enabled() or (self.dropout_module.apply_during_inference and self.dropout_module.p > 0):
            return None  # the step kernel has no dropout: gradients, and --retain-dropout, take the eager step
        ext = kernels.extension_for(query, self.attn_fn.kernel)
        if ext is None or not kernels.activation_supported(ext, self.attn_fn.fused_activation) or (
                incremental_state is None and
                not kernels.attention_supported(ext, query.size(1) * self.num_heads, self.head_dim)):
            return None
        return ext

    def _fused_forward(self, ext, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                       key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor]) -> Tensor:
        """Steps 1-8 with steps 2-6 in one kernel (``kernels.fused_attention``): the projections stay fairseq's
        modules, in fairseq's time-major layout, and the T x S scores are never stored."""
        tgt_len, bsz, embed_dim = query.size()
        if self.self_attention:
            key = value = query
        elif self.encoder_decoder_attention:
            value = key  # as fairseq: the encoder output is both
        assert key is not None and value is not None  # given to any other attention
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = (proj(x).view(x.size(0), bsz * heads, head_dim).transpose(0, 1)
                   for proj, x in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        dropout = self.dropout_module
        p = dropout.p if (self.training or dropout.apply_during_inference) else 0.0
        assert self.attn_fn.fused_activation is not None  # _fused_kernels checked it
        out = kernels.fused_attention(ext, q, k, v, heads=heads, scale=self.scaling, padding=key_padding_mask,
                                      attn_mask=attn_mask, activation=self.attn_fn.fused_activation,
                                      bias=self.attn_fn.fused_bias(), dropout=p)
        out = out.transpose(0, 1).reshape(tgt_len, bsz, embed_dim)  # a view: the kernel writes time-major
        return self.out_proj(self.attn_fn.combine(out))

    def _masked_scores_and_values(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                                  key_padding_mask: Optional[Tensor], incremental_state: Optional[dict],
                                  static_kv: bool, attn_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """fairseq's forward up to the softmax: scores [B*H, T, S] with masked keys at the attention function's
        ``masked_score`` (0 for ReLA, -inf otherwise), and values.

        Its fused fast path ignores ``before_softmax``, so it is switched off for this call (``skip_embed_dim_check``
        is the one switch that does nothing else). Without a key/value cache the padding mask is applied here, in
        place: fairseq's own masking copies the scores, and fills -inf where ReLA wants 0. For ReLA the causal mask
        is applied here too: fairseq adds its -inf to the scores, and a future score that overflowed to +inf in fp16
        would become NaN, where the spec sets a masked score to exactly 0."""
        plain = self.bias_k is None and not self.add_zero_attn  # fairseq pads neither mask with an extra key
        own_mask = (key_padding_mask is not None and incremental_state is None and plain
                    and (not self.encoder_decoder_attention or self.beam_size == 1))
        own_attn_mask = attn_mask is not None and plain
        skip = self.skip_embed_dim_check
        self.skip_embed_dim_check = True
        try:
            scores, v = super().forward(query, key, value, key_padding_mask=None if own_mask else key_padding_mask,
                                        incremental_state=incremental_state, need_weights=False, static_kv=static_kv,
                                        attn_mask=None if own_attn_mask else attn_mask, before_softmax=True)
        finally:
            self.skip_embed_dim_check = skip
        if own_attn_mask:
            assert attn_mask is not None
            blocked = attn_mask if attn_mask.dtype == torch.bool else torch.isneginf(attn_mask)
            if attn_mask.dtype != torch.bool:  # its finite entries (0, or a bias) are added, as fairseq adds them
                scores += attn_mask.masked_fill(blocked, 0.0).to(scores.dtype)
            scores.masked_fill_(blocked, self.attn_fn.masked_score)
        if own_mask:
            assert key_padding_mask is not None
            bsz, src_len = key_padding_mask.shape
            scores.view(bsz, -1, scores.size(1), src_len).masked_fill_(
                key_padding_mask.view(bsz, 1, 1, src_len).to(torch.bool), self.attn_fn.masked_score)
        return scores, v


def set_store_attn(model: nn.Module, enabled: bool = True) -> list[RelaMultiheadAttention]:
    """Make every attention module of ``model`` keep its last weights in ``last_attn`` (analysis only)."""
    modules = [m for m in model.modules() if isinstance(m, RelaMultiheadAttention)]
    for module in modules:
        module.store_attn = enabled
        module.last_attn = None
    return modules
