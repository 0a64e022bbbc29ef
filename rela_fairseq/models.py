"""The ``transformer_rela`` model: fairseq's Transformer whose three attention types use ``RelaMultiheadAttention``.

Registered through fairseq's legacy argparse route, like ``examples/pointer_generator``: a thin subclass of
``TransformerModel`` whose encoder and decoder build our layers, plus architecture functions that set defaults.
Options have no argparse defaults (fairseq suppresses them), so the architecture functions own the defaults and an
older checkpoint that lacks an option receives it when loaded.
"""

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
    base_architecture,
    tiny_architecture,
    transformer_iwslt_de_en,
    transformer_vaswani_wmt_en_de_big,
)

from . import compat
from .attention_functions import ATTN_FN_CHOICES, RELA_VARIANTS
from .layers import RelaDecoderLayer, RelaEncoderLayer
from .rela import ACTIVATIONS, GAIN_INITS, NORM_SCOPES, NORMS, RelaNorm, private_generator

RELA_DEFAULTS = {
    "attn_fn": "rela",
    "encoder_attn_fn": None,  # None: same as --attn-fn
    "decoder_attn_fn": None,
    "cross_attn_fn": None,
    "rela_variant": "gated",
    "rela_norm": "rms",
    "rela_norm_scope": "all",
    "rela_gain_init": None,  # None: ones for ReLA-g, xavier for ReLA-i
    "rela_activation": "relu",
    "rela_fused_norm": False,
    "entmax_alpha_init": 1.5,
    "entmax_bisect_iters": 25,
    "allow_attn_fn_change": False,
}


def add_rela_args(parser):
    """The options of transformer_rela (also listed in the README: fairseq's --help omits architecture options)."""
    parser.add_argument("--attn-fn", choices=ATTN_FN_CHOICES,
                        help="attention function of all three attention types (default: rela)")
    for kind, what in (("encoder", "encoder self-attention"), ("decoder", "decoder self-attention"),
                       ("cross", "encoder-decoder (cross) attention")):
        parser.add_argument(f"--{kind}-attn-fn", choices=ATTN_FN_CHOICES,
                            help=f"attention function of the {what} (default: --attn-fn)")
    parser.add_argument("--rela-variant", choices=RELA_VARIANTS,
                        help="gated: ReLA-g, RMSNorm with gain 1 and a sigmoid gate (default); "
                             "init: ReLA-i, RMSNorm with a small random gain and no gate")
    parser.add_argument("--rela-norm", choices=NORMS, help="norm on the concatenated head outputs (default: rms)")
    parser.add_argument("--rela-norm-scope", choices=NORM_SCOPES,
                        help="all: one norm over the full width (default); head: one per head")
    parser.add_argument("--rela-gain-init", choices=GAIN_INITS,
                        help="norm gain init (default: ones for gated, xavier for init)")
    parser.add_argument("--rela-activation", choices=ACTIVATIONS, help="relu (default) or squared relu")
    parser.add_argument("--rela-fused-norm", action="store_true",
                        help="run the ReLA norm and gate as fused kernels compiled by torch.compile (C++ on CPU, "
                             "Triton on GPU); same results, faster, compiled on first use")
    parser.add_argument("--entmax-alpha-init", type=float, help="initial alpha of entmax_alpha, in (1, 2) (default 1.5)")
    parser.add_argument("--entmax-bisect-iters", type=int, help="bisection iterations of entmax_alpha (default 25)")
    parser.add_argument("--allow-attn-fn-change", action="store_true",
                        help="load checkpoints trained with another attention function, if the parameters fit")


def rela_defaults(args):
    for key, value in RELA_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


class RelaEncoder(TransformerEncoderBase):
    def build_encoder_layer(self, cfg):
        return compat.wrap_layer(RelaEncoderLayer(cfg, return_fc=self.return_fc), cfg)


class RelaDecoder(TransformerDecoderBase):
    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        return compat.wrap_layer(RelaDecoderLayer(cfg, no_encoder_attn), cfg)


@register_model("transformer_rela")
class RelaTransformerModel(TransformerModel):
    """Transformer with ReLA (or softmax, sparsemax, 1.5-entmax, alpha-entmax) attention."""

    def __init__(self, args, encoder, decoder):
        super().__init__(args, encoder, decoder)
        # The ReLA gain and gate come from a private generator, so that models built with the same seed share every
        # other initial weight whatever their attention function (and --attn-fn softmax draws exactly like stock).
        generator = private_generator()
        for module in self.modules():
            if isinstance(module, RelaNorm):
                module.reset_parameters(generator)

    @classmethod
    def hub_models(cls):
        return {}  # no hosted models: from_pretrained takes a local directory

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_rela_args(parser)

    @classmethod
    def build_model(cls, args, task):
        rela_defaults(args)  # checkpoints written before an option existed
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return RelaEncoder(TransformerConfig.from_namespace(args), src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        return RelaDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)


def _paper_settings(args):
    """The paper: dropout 0.1 everywhere (residual, attention, ReLU) and the target embedding tied to the output."""
    args.attention_dropout = getattr(args, "attention_dropout", 0.1)
    args.activation_dropout = getattr(args, "activation_dropout", 0.1)
    args.share_decoder_input_output_embed = getattr(args, "share_decoder_input_output_embed", True)


@register_model_architecture("transformer_rela", "transformer_rela")
def transformer_rela(args):
    """Transformer-base (6+6 layers, d=512, FFN 2048, 8 heads), ReLA-g in all three attention types."""
    _paper_settings(args)
    rela_defaults(args)
    base_architecture(args)


@register_model_architecture("transformer_rela", "transformer_rela_iwslt_de_en")
def transformer_rela_iwslt_de_en(args):
    """fairseq's IWSLT dimensions (d=512, FFN 1024, 4 heads)."""
    _paper_settings(args)
    rela_defaults(args)
    transformer_iwslt_de_en(args)


@register_model_architecture("transformer_rela", "transformer_rela_big")
def transformer_rela_big(args):
    """Transformer-big (d=1024, FFN 4096, 16 heads, dropout 0.3)."""
    _paper_settings(args)
    rela_defaults(args)
    transformer_vaswani_wmt_en_de_big(args)


@register_model_architecture("transformer_rela", "transformer_rela_tiny")
def transformer_rela_tiny(args):
    """fairseq's tiny dimensions (d=64, FFN 64, 2 heads, 2+2 layers): tests and smoke runs."""
    rela_defaults(args)
    tiny_architecture(args)

