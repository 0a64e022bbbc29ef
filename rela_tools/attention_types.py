"""The three attention types of a Transformer, with the names the model, the analysis, the reports and the plots use
for them. Standard library only: rela-analyze's AER scorer and plots, and the pipeline's reports, read them without
importing fairseq."""

from typing import NamedTuple


class AttentionType(NamedTuple):
    name: str  # encoder | decoder | cross
    short: str  # in table headers: enc | dec | cross
    label: str  # in prose and plot titles
    layer_module: str  # the attribute of fairseq's encoder or decoder layer that holds it
    option: str  # the flat option that overrides --attn-fn for this type


ATTENTION_TYPES = (
    AttentionType("encoder", "enc", "encoder self-attention", "self_attn", "encoder_attn_fn"),
    AttentionType("decoder", "dec", "decoder self-attention", "self_attn", "decoder_attn_fn"),
    AttentionType("cross", "cross", "cross-attention", "encoder_attn", "cross_attn_fn"),
)
ATTENTION_TYPE = {t.name: t for t in ATTENTION_TYPES}

# The initial q/k/v projection biases of every attention module (transformer_rela's --attn-qkv-bias-init, the
# pipeline's train.attn_qkv_bias_init): uniform, nn.Linear's U(±1/sqrt(d)) as in fairseq's Transformer; zero, as the
# ReLA authors' toolkit (bzhangGo/zero) initialises its biases.
QKV_BIAS_INITS = ("uniform", "zero")
