"""Encoder and decoder layers that build ``RelaMultiheadAttention`` for each of the three attention types.

Each layer overrides only fairseq's attention-building hooks (``build_self_attention``, ``build_encoder_attention``);
the encoder layer also switches off fairseq 0.12.2's fused inference path (``compat.py``).
"""

from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from fairseq.utils import safe_getattr
from torch import nn

from rela_tools.errors import RelaConfigError

from . import compat
from .attention import RelaMultiheadAttention
from .attention_functions import build_attention_function
from .settings import AttentionSettings


def build_attention(cfg, attention_type: str, embed_dim: int, num_heads: int,
                    **mha_kwargs) -> RelaMultiheadAttention:
    """The attention module of one type (``settings.ATTENTION_TYPES``) as the model config asks for it."""
    xformers = safe_getattr(cfg.encoder if attention_type == "encoder" else cfg.decoder, "xformers_att_config", None)
    if xformers is not None:
        raise RelaConfigError(f"--{attention_type}-xformers-att-config {xformers!r} is not supported by "
                              "transformer_rela")
    attn_fn = build_attention_function(embed_dim, num_heads, AttentionSettings.of(cfg, attention_type))
    return RelaMultiheadAttention(embed_dim, num_heads, attn_fn=attn_fn, **mha_kwargs)


class RelaEncoderLayer(TransformerEncoderLayerBase):
    def __init__(self, cfg, return_fc: bool = False):
        super().__init__(cfg, return_fc=return_fc)
        compat.disable_fused_encoder_path(self)

    def build_self_attention(self, embed_dim: int, cfg) -> RelaMultiheadAttention:
        return build_attention(cfg, "encoder", embed_dim, cfg.encoder.attention_heads, dropout=cfg.attention_dropout,
                               self_attention=True, q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        compat.drop_fused_encoder_keys(state_dict, prefix)
        # nn.Module's own loader: 0.12.2's override would re-create the fused path's weights
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


class RelaDecoderLayer(TransformerDecoderLayerBase):
    def build_self_attention(self, embed_dim: int, cfg, add_bias_kv: bool = False,
                             add_zero_attn: bool = False) -> RelaMultiheadAttention:
        return build_attention(cfg, "decoder", embed_dim, cfg.decoder.attention_heads, dropout=cfg.attention_dropout,
                               add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                               self_attention=not cfg.cross_self_attention, q_noise=self.quant_noise,
                               qn_block_size=self.quant_noise_block_size)

    def build_encoder_attention(self, embed_dim: int, cfg) -> RelaMultiheadAttention:
        return build_attention(cfg, "cross", embed_dim, cfg.decoder.attention_heads, kdim=cfg.encoder.embed_dim,
                               vdim=cfg.encoder.embed_dim, dropout=cfg.attention_dropout,
                               encoder_decoder_attention=True, q_noise=self.quant_noise,
                               qn_block_size=self.quant_noise_block_size)
