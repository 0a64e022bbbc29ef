"""The ``transformer_rela`` model: fairseq's Transformer whose three attention types use ``RelaMultiheadAttention``.

A thin subclass of ``TransformerModel`` whose encoder and decoder build our layers, plus architecture functions that
set defaults (like fairseq's ``examples/pointer_generator``), registered with one dataclass,
``settings.RelaTransformerConfig`` (fairseq's TransformerConfig, flat as fairseq-train's flags name its options,
extended by the attention settings), as fairseq registers ``transformer_lm``:

* ``fairseq-train``: the flags are generated from the dataclass without defaults, the architecture functions fill in
  the defaults, and fairseq converts the result through the dataclass into the model config it stores.
* ``fairseq-hydra-train``: ``+model._name=transformer_rela +model.attn_fn=sparsemax +model.encoder_layers=3`` is
  merged with (and validated against) the dataclass: a misspelt key is an error.
* Checkpoints of either kind, and older ones that stored a flat argparse Namespace, all reach ``build_model``, which
  builds from the flat Namespace form.
"""

import argparse

from fairseq.distributed import fsdp_wrap
from fairseq.models import ARCH_CONFIG_REGISTRY, register_model, register_model_architecture
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
from fairseq.modules import FairseqDropout
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.utils import safe_getattr
from torch import nn

from .attention import RelaMultiheadAttention
from .layers import RelaDecoderLayer, RelaEncoderLayer
from .rela import RelaNorm, private_generator
from .settings import RelaTransformerConfig, add_args, flat_namespace, set_defaults

# fairseq names each dropout module after its owner's class, and --retain-dropout-modules picks them by that name:
# ours answer to the stock Transformer's names, so that a stock list (Monte-Carlo dropout recipes) keeps them too
# (fairseq 0.12.2 and fairseq-fixed alike; tests/unit/test_models.py compares them with the stock model's)
STOCK_DROPOUT_NAMES = {
    "RelaEncoder": "TransformerEncoder",
    "RelaDecoder": "TransformerDecoder",
    "RelaEncoderLayer": "TransformerEncoderLayerBase",
    "RelaDecoderLayer": "TransformerDecoderLayerBase",
    "RelaMultiheadAttention": "MultiheadAttention",
}


def wrapped(layer: nn.Module, cfg: TransformerConfig) -> nn.Module:
    """What fairseq's build_encoder_layer/build_decoder_layer do around a new layer (activation checkpointing, FSDP)."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    # when checkpointing, FSDP always wraps the checkpointed layer, whatever its size
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


class RelaEncoder(TransformerEncoderBase):
    def build_encoder_layer(self, cfg: TransformerConfig) -> nn.Module:
        return wrapped(RelaEncoderLayer(cfg, return_fc=self.return_fc), cfg)


class RelaDecoder(TransformerDecoderBase):
    def build_decoder_layer(self, cfg: TransformerConfig, no_encoder_attn: bool = False) -> nn.Module:
        return wrapped(RelaDecoderLayer(cfg, no_encoder_attn), cfg)


@register_model("transformer_rela", dataclass=RelaTransformerConfig)
class RelaTransformerModel(TransformerModel):
    """Transformer with ReLA (or softmax, sparsemax, 1.5-entmax, alpha-entmax) attention."""

    def __init__(self, args, encoder, decoder):
        super().__init__(args, encoder, decoder)
        # The ReLA gain and gate come from a private generator, so that models built with the same seed share every
        # other initial weight whatever their attention function (and --attn-fn softmax draws exactly like stock).
        generator = private_generator()
        zero_qkv_bias = safe_getattr(args, "attn_qkv_bias_init", "uniform") == "zero"
        for module in self.modules():
            if isinstance(module, RelaNorm):
                module.reset_parameters(generator)
            elif isinstance(module, RelaMultiheadAttention) and zero_qkv_bias:
                # zeroed after drawing, so that every other initial weight is the uniform run's
                for projection in (module.q_proj, module.k_proj, module.v_proj):
                    if projection.bias is not None:
                        nn.init.zeros_(projection.bias)
            elif isinstance(module, FairseqDropout):
                module.module_name = STOCK_DROPOUT_NAMES.get(module.module_name, module.module_name)

    @classmethod
    def hub_models(cls) -> dict:
        return {}  # no hosted models: from_pretrained takes a local directory

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        super().add_args(parser)  # fairseq's Transformer options, exactly as stock
        add_args(parser)  # ours; fairseq skips the Transformer's options a second time

    @classmethod
    def build_model(cls, args, task) -> "RelaTransformerModel":
        args = flat_namespace(args)  # a TransformerConfig (checkpoint) or DictConfig (hydra) becomes the flat form
        set_defaults(args, paper=False)  # checkpoints written before an option existed
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, args: argparse.Namespace, src_dict, embed_tokens) -> RelaEncoder:
        return RelaEncoder(TransformerConfig.from_namespace(args), src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, args: argparse.Namespace, tgt_dict, embed_tokens) -> RelaDecoder:
        cfg = TransformerConfig.from_namespace(args)
        return RelaDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)


def transformer_rela(args: argparse.Namespace) -> None:
    """Transformer-base (6+6 layers, d=512, FFN 2048, 8 heads), ReLA-g in all three attention types, dropout 0.1 on
    residuals, attention and FFN, tied target embeddings."""
    set_defaults(args)
    base_architecture(args)


# register_model(dataclass=...) registered a no-op architecture of the model's own name; this one sets the defaults
ARCH_CONFIG_REGISTRY["transformer_rela"] = transformer_rela


@register_model_architecture("transformer_rela", "transformer_rela_iwslt_de_en")
def transformer_rela_iwslt_de_en(args: argparse.Namespace) -> None:
    """fairseq's IWSLT dimensions (d=512, FFN 1024, 4 heads)."""
    set_defaults(args)
    transformer_iwslt_de_en(args)


@register_model_architecture("transformer_rela", "transformer_rela_big")
def transformer_rela_big(args: argparse.Namespace) -> None:
    """Transformer-big (d=1024, FFN 4096, 16 heads, dropout 0.3)."""
    set_defaults(args)
    transformer_vaswani_wmt_en_de_big(args)


@register_model_architecture("transformer_rela", "transformer_rela_small")
def transformer_rela_small(args: argparse.Namespace) -> None:
    """A small Transformer for CPU runs on small corpora (Multi30k): d=128, FFN 512, 4 heads, 3+3 layers."""
    for side in ("encoder", "decoder"):
        for option, value in (("embed_dim", 128), ("ffn_embed_dim", 512), ("attention_heads", 4), ("layers", 3)):
            if getattr(args, f"{side}_{option}", None) is None:
                setattr(args, f"{side}_{option}", value)
    transformer_rela(args)


@register_model_architecture("transformer_rela", "transformer_rela_tiny")
def transformer_rela_tiny(args: argparse.Namespace) -> None:
    """fairseq's tiny dimensions (d=64, FFN 64, 2 heads, 2+2 layers): tests and smoke runs."""
    set_defaults(args, paper=False)
    tiny_architecture(args)

