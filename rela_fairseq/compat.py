"""What differs between fairseq 0.12.2 (Python <= 3.10) and fairseq-fixed 0.12.3.1 (Python >= 3.11), and between
torch versions, in one place. Nothing else in the plugin checks versions.

1. fairseq 0.12.2's encoder layer has a fused inference path (``torch._transformer_encoder_layer_fwd``) that never calls
   the layer's ``self_attn`` once a checkpoint is loaded, in eval mode: ReLA would silently become softmax at generation
   time, and left-padded batches crash ("Mask Type should be defined"). It also adds eight unused parameters per
   encoder layer. ``disable_fused_encoder_path`` and ``drop_fused_encoder_keys`` switch it off and remove them, so both
   versions build the same parameters and run our attention. fairseq main removed the path (#4568).
2. torch >= 2.6 loads checkpoints with ``weights_only=True``, which refuses the ``argparse.Namespace`` that every
   legacy fairseq checkpoint holds. ``allow_fairseq_checkpoints`` allow-lists exactly what fairseq checkpoints need;
   the safety check stays on for everything else.
"""

import argparse

import torch
from fairseq.modules.transformer_layer import TransformerEncoderLayerBase

# 0.12.2 overrides _load_from_state_dict to fill the fused path's parameters; fairseq main has no such override.
HAS_FUSED_ENCODER_PATH = "_load_from_state_dict" in vars(TransformerEncoderLayerBase)
FUSED_ENCODER_PARAMS = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
                        "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def disable_fused_encoder_path(layer):
    if HAS_FUSED_ENCODER_PATH:
        layer.can_use_fastpath = False  # checked by the layer and by the encoder before nesting the batch
        for name in FUSED_ENCODER_PARAMS:
            layer._parameters.pop(name, None)


def drop_fused_encoder_keys(state_dict, prefix):
    """A 0.12.2 checkpoint (ours or stock) carries the fused path's copies of the weights: ignore them."""
    for name in FUSED_ENCODER_PARAMS:
        state_dict.pop(prefix + name, None)


def fairseq_checkpoint_globals():
    """The non-tensor globals a fairseq translation checkpoint holds besides plain containers and numbers.

    ``argparse.Namespace``: the legacy ``cfg.model`` of every argparse-registered model, ``transformer`` included.
    Found by loading every checkpoint type the project writes (last, best, epoch/update, averaged) with
    ``weights_only=True``; tests/integration/test_checkpoints.py keeps it that way.
    """
    return [argparse.Namespace]


def allow_fairseq_checkpoints():
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 loads with weights_only=False by default anyway
        add_safe_globals(fairseq_checkpoint_globals())
