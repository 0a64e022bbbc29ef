"""Encoder and decoder layers that build ``RelaMultiheadAttention`` for each of the three attention types.

Each layer overrides only fairseq's attention-building hooks (``build_self_attention``, ``build_encoder_attention``);
the encoder layer also switches off fairseq 0.12.2's fused inference path (``compat.py``).
"""

from torch import nn
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from fairseq.utils import safe_getattr

from . import compat
from .attention import RelaMultiheadAttention
from .attention_functions import build_attention_function
from .errors import RelaConfigError

# attention type -> the option that overrides --attn-fn for it
ATTENTION_TYPES = {"encoder": "encoder_attn_fn", "decoder": "decoder_attn_fn", "cross": "cross_attn_fn"}


def attn_fn_name(cfg, attention_type):
    """The attention function of one type: its own option if given, else --attn-fn."""
    # TransformerConfig routes encoder_*/decoder_* names to its sub-configs; getattr finds them either way.
    return safe_getattr(cfg, ATTENTION_TYPES[attention_type], None) or safe_getattr(cfg, "attn_fn", "rela")


def build_attention(cfg, attention_type, embed_dim, num_heads, **mha_kwargs):
    xformers = safe_getattr(cfg.encoder if attention_type == "encoder" else cfg.decoder, "xformers_att_config", None)
    if xformers is not None:
        raise RelaConfigError(f"--{attention_type}-xformers-att-config {xformers!r} is not supported by transformer_rela")
    attn_fn = build_attention_function(
        attn_fn_name(cfg, attention_type),
        embed_dim,
        num_heads,
        rela_variant=safe_getattr(cfg, "rela_variant", "gated"),
        rela_norm=safe_getattr(cfg, "rela_norm", "rms"),
        rela_norm_scope=safe_getattr(cfg, "rela_norm_scope", "all"),
        rela_gain_init=safe_getattr(cfg, "rela_gain_init", None),
        rela_activation=safe_getattr(cfg, "rela_activation", "relu"),
        rela_fused_norm=bool(safe_getattr(cfg, "rela_fused_norm", False)),
        entmax_alpha_init=safe_getattr(cfg, "entmax_alpha_init", 1.5),
        entmax_bisect_iters=safe_getattr(cfg, "entmax_bisect_iters", 25),
    )
    attn_fn.allow_change = bool(safe_getattr(cfg, "allow_attn_fn_change", False))
    return RelaMultiheadAttention(embed_dim, num_heads, attn_fn=attn_fn, **mha_kwargs)


class RelaEncoderLayer(TransformerEncoderLayerBase):
    def __init__(self, cfg, return_fc=False):
        super().__init__(cfg, return_fc=return_fc)
        compat.disable_fused_encoder_path(self)

    def build_self_attention(self, embed_dim, cfg):
        return build_attention(cfg, "encoder", embed_dim, cfg.encoder.attention_heads, dropout=cfg.attention_dropout,
                               self_attention=True, q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        compat.drop_fused_encoder_keys(state_dict, prefix)
        # nn.Module's own loader: 0.12.2's override would re-create the fused path's weights
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


class RelaDecoderLayer(TransformerDecoderLayerBase):
    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        return build_attention(cfg, "decoder", embed_dim, cfg.decoder.attention_heads, dropout=cfg.attention_dropout,
                               add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                               self_attention=not cfg.cross_self_attention, q_noise=self.quant_noise,
                               qn_block_size=self.quant_noise_block_size)

    def build_encoder_attention(self, embed_dim, cfg):
        return build_attention(cfg, "cross", embed_dim, cfg.decoder.attention_heads, kdim=cfg.encoder.embed_dim,
                               vdim=cfg.encoder.embed_dim, dropout=cfg.attention_dropout,
                               encoder_decoder_attention=True, q_noise=self.quant_noise,
                               qn_block_size=self.quant_noise_block_size)
