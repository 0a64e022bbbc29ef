"""The plugin's concepts and settings, each defined once.

* ``ATTENTION_TYPES`` (``attention_types.py``): the three attention types of a Transformer and their names.
* ``AttentionSettings``: the attention function's settings as one typed dataclass (fairseq's ``FairseqDataclass``
  style): each field has its default, its choices and its help once. The argparse options of ``transformer_rela``,
  the architectures' defaults, the validation and ``build_attention_function`` all derive from it.
* ``RelaTransformerConfig``: fairseq's ``TransformerConfig`` extended by those fields (and the per-type overrides in
  the encoder and decoder sub-configs), the dataclass ``transformer_rela`` is registered with, so that
  ``fairseq-hydra-train`` validates them.

No ``from __future__ import annotations`` here: fairseq reads the field types as types.
"""

import argparse
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models.transformer import TransformerConfig
from fairseq.utils import safe_getattr

from rela_tools.attention_types import ATTENTION_TYPE, ATTENTION_TYPES, QKV_BIAS_INITS
from rela_tools.errors import RelaConfigError

from .attention_functions import ATTENTION_FUNCTIONS, SIGMOID_BIASES
from .kernels import KERNELS
from .rela import ACTIVATIONS, GAIN_INITS, NORM_SCOPES, NORMS, VARIANTS

ATTN_FN = ChoiceEnum(list(ATTENTION_FUNCTIONS))


@dataclass
class AttentionSettings(FairseqDataclass):
    """Everything that defines the attention function of a module (one type's override already applied)."""

    attn_fn: ATTN_FN = field(default="rela", metadata={"help": "attention function of all three attention types"})  # type: ignore[valid-type]
    rela_variant: ChoiceEnum(VARIANTS) = field(  # type: ignore[valid-type]
        default="gated", metadata={"help": "gated: ReLA-g, RMSNorm with gain 1 and a sigmoid gate; init: ReLA-i, "
                                           "RMSNorm with a small random gain and no gate"})
    rela_norm: ChoiceEnum(NORMS) = field(  # type: ignore[valid-type]
        default="rms", metadata={"help": "norm on the concatenated head outputs"})
    rela_norm_scope: ChoiceEnum(NORM_SCOPES) = field(  # type: ignore[valid-type]
        default="all", metadata={"help": "all: one norm over the full width (the paper); head: one per head"})
    rela_gain_init: Optional[ChoiceEnum(GAIN_INITS)] = field(  # type: ignore[valid-type]
        default=None, metadata={"help": "norm gain init (default: ones for gated, xavier for init)"})
    rela_activation: ChoiceEnum(ACTIVATIONS) = field(  # type: ignore[valid-type]
        default="relu", metadata={"help": "relu, or squared relu"})
    rela_kernel: ChoiceEnum(KERNELS) = field(  # type: ignore[valid-type]
        default="auto", metadata={"help": "the attention core of the element-wise functions (ReLA, relu_len, sigmoid) "
                                          "and ReLA's norm and gate: fused (compiled kernels, C++ on CPU, "
                                          "compiled on first use), eager (PyTorch operators), or auto (fused where "
                                          "available, else eager with a one-line message); same results. The "
                                          "environment variable RELA_FAIRSEQ_KERNEL overrides it"})
    sigmoid_bias: ChoiceEnum(SIGMOID_BIASES) = field(  # type: ignore[valid-type]
        default="length", metadata={"help": "sigmoid attention's bias: length, b = -log n (n the unmasked keys, "
                                            "Ramapuram et al. 2025); learned: -log n plus a bias learned per head"})
    entmax_alpha_init: float = field(
        default=1.5, metadata={"help": "initial alpha of entmax_alpha, in (1, 2)"})
    entmax_bisect_iters: int = field(default=25, metadata={"help": "bisection iterations of entmax_alpha"})
    allow_attn_fn_change: bool = field(
        default=False, metadata={"help": "load checkpoints trained with another attention function, if the "
                                         "parameters fit"})

    def __post_init__(self):
        for f in fields(self):
            value, choices = getattr(self, f.name), field_choices(f)
            if choices is not None and value is not None and value not in choices:
                what = "attention function" if f.name == "attn_fn" else "--" + f.name.replace("_", "-")
                raise RelaConfigError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")

    @property
    def gain_init(self) -> str:
        """The gain's initialisation, the variant's own unless set."""
        return self.rela_gain_init or ("ones" if self.rela_variant == "gated" else "xavier")

    @classmethod
    def of(cls, cfg: Any, attention_type: Optional[str] = None) -> "AttentionSettings":
        """The settings in a model config (flat Namespace or TransformerConfig), for one attention type: its own
        override (``--cross-attn-fn`` ...) replaces ``--attn-fn``."""
        values = {f.name: _plain(safe_getattr(cfg, f.name, None)) for f in fields(cls)}
        values = {k: v for k, v in values.items() if v is not None}
        if attention_type is not None:
            override = _plain(safe_getattr(cfg, ATTENTION_TYPE[attention_type].option, None))
            if override is not None:
                values["attn_fn"] = override
        return cls(**values)


# Model options beside the attention function's: (name, type, field), each default, choice and help once.
MODEL_FIELDS: list[tuple[str, Any, Any]] = [
    ("attn_qkv_bias_init", ChoiceEnum(QKV_BIAS_INITS), field(
        default="uniform", metadata={"help": "initial q/k/v projection biases of every attention module: uniform, "
                                             "nn.Linear's U(+-1/sqrt(d)) as fairseq's Transformer; zero, as the ReLA "
                                             "authors' toolkit (bzhangGo/zero) initialises them. The other initial "
                                             "weights are the same for either"})),
]
PER_TYPE_HELP = "attention function of the {label} (default: --attn-fn)"
PAPER_DEFAULTS = {  # transformer_rela's own defaults for fairseq's Transformer options: the paper's setting
    "attention_dropout": 0.1,
    "activation_dropout": 0.1,
    "share_decoder_input_output_embed": True,
}
SUB_CONFIGS = ("encoder", "decoder", "quant_noise")
# TransformerConfig types these as lists, but fairseq's code reads strings: checkpoint_utils.prune_state_dict and
# build_model split the layers to keep on commas (LayerDrop pruning, fairseq's examples/layerdrop:
# --model-overrides "{'encoder_layers_to_keep': '0,2', 'decoder_layers_to_keep': '1'}"), and the decoder reads the
# cutoffs with utils.eval_str_list (a list, or a string such as '5000,20000'). The stock ``transformer`` keeps its
# config as a Namespace that nothing checks against those types; ours is merged into this dataclass, whose List[int]
# refused the strings (issue 23). fairseq's own flat dataclass, transformer_lm's, types decoder_layers_to_keep so too.
FLAT_TYPES = {
    "encoder_layers_to_keep": Optional[str],
    "decoder_layers_to_keep": Optional[str],
    "adaptive_softmax_cutoff": Optional[Any],  # training stores a list, an override may give the string
}


def _flat_transformer_fields() -> list:
    """TransformerConfig's fields as fairseq-train's flat options name them (``encoder.embed_dim`` ->
    ``encoder_embed_dim``, interpolations likewise), with transformer_rela's own defaults (``PAPER_DEFAULTS``) and the
    types fairseq really reads (``FLAT_TYPES``)."""
    specs = []
    for f in fields(TransformerConfig):
        if f.name in SUB_CONFIGS:
            sub = f.default if isinstance(f.default, type) else type(f.default)
            entries = [(f"{f.name}_{g.name}", g) for g in fields(sub)]
        else:
            entries = [(f.name, f)]
        for name, g in entries:
            default = PAPER_DEFAULTS.get(name, g.default)
            if isinstance(default, str) and default.startswith("${model."):
                default = "${model." + default[len("${model."):-1].replace(".", "_") + "}"
            specs.append((name, FLAT_TYPES.get(name, g.type), field(default=default, metadata=dict(g.metadata))))
    return specs


def _from_namespace(cls, args):
    """A checkpoint's flat Namespace (fairseq-train before rela-fairseq 0.2) is already what build_model wants."""
    return args


RelaTransformerConfig = make_dataclass(
    "RelaTransformerConfig",
    [*_flat_transformer_fields(), *MODEL_FIELDS,
     *((t.option, Optional[ATTN_FN], field(default=None, metadata={"help": PER_TYPE_HELP.format(label=t.label)}))
       for t in ATTENTION_TYPES)],
    bases=(AttentionSettings,),
    namespace={"from_namespace": classmethod(_from_namespace), "__module__": __name__,
               "__doc__": "transformer_rela's options: fairseq's TransformerConfig, flat as fairseq-train's flags name "
                          "them, with the paper's dropout and tied embeddings as defaults, extended by the attention "
                          "settings and their per-type overrides. The dataclass transformer_rela is registered with."},
)


def field_choices(f) -> Optional[list]:
    kind = f.type.__args__[0] if getattr(f.type, "__args__", None) else f.type
    return [c.value for c in kind] if isinstance(kind, type) and hasattr(kind, "__members__") else None  # type: ignore[attr-defined]


def _plain(value):
    return getattr(value, "value", value)  # a ChoiceEnum member (hydra) -> its string


def set_defaults(args: argparse.Namespace, paper: bool = True) -> None:
    """The architecture functions' defaults, from the dataclasses: every attention setting (and per-type override) and
    every ``MODEL_FIELDS`` option a Namespace lacks, and with ``paper`` the paper's dropout and tied embeddings
    (``PAPER_DEFAULTS``)."""
    defaults = {f.name: f.default for f in fields(AttentionSettings)}
    defaults.update({t.option: None for t in ATTENTION_TYPES})
    defaults.update({name: spec.default for name, _, spec in MODEL_FIELDS})
    if paper:
        defaults.update(PAPER_DEFAULTS)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def add_args(parser: argparse.ArgumentParser) -> None:
    """The options of ``RelaTransformerConfig`` as flags, without defaults (the architecture functions set them).
    Called after fairseq's own Transformer options, whose flags then stay exactly as stock (fairseq skips a flag
    defined twice): ``--share-decoder-input-output-embed`` stays a store_true flag although our default is True."""
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    gen_parser_from_dataclass(parser, RelaTransformerConfig(), delete_default=True, with_prefix="")


def flat_namespace(cfg: Any) -> argparse.Namespace:
    """A model config as the flat Namespace of fairseq's argparse route: a DictConfig (fairseq-train and
    fairseq-hydra-train, validated against ``RelaTransformerConfig`` by fairseq) or a Namespace (older checkpoints)."""
    if isinstance(cfg, argparse.Namespace):
        return cfg
    from omegaconf import OmegaConf

    return argparse.Namespace(**OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))  # type: ignore[arg-type]

