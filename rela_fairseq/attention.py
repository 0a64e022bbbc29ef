"""fairseq's ``MultiheadAttention`` with a pluggable attention function.

Only the step from scores to output differs from fairseq, so that is all this class overrides: fairseq's own
``forward(..., before_softmax=True)`` does the projections, the scaling, the key/value cache of incremental decoding,
the beam-reduced cross-attention and the causal mask, and hands back the scores and the values; the padding mask is
applied here, in place, where no cache holds it. Parameter names stay
fairseq's (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``); the attention function adds its own under ``attn_fn``.
"""

from __future__ import annotations

from typing import Optional

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from .attention_functions import AttentionFunction, Softmax
from .rela import at_least_fp32


class RelaMultiheadAttention(MultiheadAttention):
    def __init__(self, embed_dim: int, num_heads: int, *, attn_fn: AttentionFunction, **kwargs):
        super().__init__(embed_dim, num_heads, **kwargs)  # keywords only: fairseq main adds a positional argument
        self.attn_fn = attn_fn
        # Analysis hook: when True, every forward keeps its pre-dropout fp32 weights [B, H, T, S] in last_attn.
        self.store_attn = False
        self.last_attn = None

    def forward(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                key_padding_mask: Optional[Tensor] = None, incremental_state: Optional[dict] = None,
                need_weights: bool = True, static_kv: bool = False, attn_mask: Optional[Tensor] = None,
                before_softmax: bool = False, need_head_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if isinstance(self.attn_fn, Softmax) and not (need_head_weights or self.store_attn):
            # fairseq's stock path, fused kernels included: --attn-fn softmax is the stock Transformer.
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   incremental_state=incremental_state, need_weights=need_weights,
                                   static_kv=static_kv, attn_mask=attn_mask, before_softmax=before_softmax)
        scores, v = self._masked_scores_and_values(query, key, value, key_padding_mask, incremental_state,
                                                   static_kv, attn_mask)
        if before_softmax:
            return scores, v

        tgt_len, bsz, embed_dim = query.size()
        heads, src_len = self.num_heads, scores.size(-1)
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
        out = out.transpose(0, 1).reshape(tgt_len, bsz, embed_dim)  # heads concatenated
        out = self.out_proj(self.attn_fn.combine(out))

        if not (need_weights or need_head_weights or self.store_attn):
            return out, None
        weights = at_least_fp32(weights).view(bsz, heads, tgt_len, src_len)  # pre-dropout
        if self.store_attn:
            self.last_attn = weights.detach()
        if need_head_weights:
            return out, weights.transpose(0, 1)  # [H, B, T, S], as fairseq
        return out, (weights.mean(dim=1) if need_weights else None)

    def _masked_scores_and_values(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                                  key_padding_mask: Optional[Tensor], incremental_state: Optional[dict],
                                  static_kv: bool, attn_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """fairseq's forward up to the softmax: scores [B*H, T, S] with masked keys at the attention function's
        ``masked_score`` (0 for ReLA, -inf otherwise), and values.

        Its fused fast path ignores ``before_softmax``, so it is switched off for this call (``skip_embed_dim_check``
        is the one switch that does nothing else). Without a key/value cache the padding mask is applied here, in
        place: fairseq's own masking copies the scores, and fills -inf where ReLA wants 0."""
        own_mask = (key_padding_mask is not None and incremental_state is None and self.bias_k is None
                    and not self.add_zero_attn and (not self.encoder_decoder_attention or self.beam_size == 1))
        skip = self.skip_embed_dim_check
        self.skip_embed_dim_check = True
        try:
            scores, v = super().forward(query, key, value, key_padding_mask=None if own_mask else key_padding_mask,
                                        incremental_state=incremental_state, need_weights=False,
                                        static_kv=static_kv, attn_mask=attn_mask, before_softmax=True)
        finally:
            self.skip_embed_dim_check = skip
        if own_mask:
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
