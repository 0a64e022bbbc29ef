"""Teacher-forcing a subset through a trained model and collecting every attention map, batch by batch."""

import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from ..attention import RelaMultiheadAttention, set_store_attn
from ..errors import RelaFairseqError

logger = logging.getLogger("rela_fairseq.analyze")
_MODULE_NAME = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)$")


def attention_type(module_name):
    """('encoder' | 'decoder' | 'cross', layer index) of an attention module, from its name."""
    match = _MODULE_NAME.search(module_name)
    if not match:
        return None
    side, layer, kind = match.groups()
    return ("cross" if kind == "encoder_attn" else side), int(layer)


def load_model(path, data, subset="test", overrides=None, cpu=True):
    """(model, task) for a checkpoint; a stock fairseq ``transformer`` checkpoint is loaded as
    ``transformer_rela --attn-fn softmax`` (the same model, whose attention maps we can read)."""
    import os

    from fairseq import checkpoint_utils

    if not os.path.isfile(path):
        raise RelaFairseqError(f"no checkpoint at {path}")
    overrides = dict({"data": data}, **(overrides or {}))
    state = checkpoint_utils.load_checkpoint_to_cpu(path, overrides)
    model_cfg = state["cfg"]["model"]
    arch = getattr(model_cfg, "arch", None)
    if arch is not None and not arch.startswith("transformer_rela"):
        if not arch.startswith("transformer"):
            raise RelaFairseqError(f"{path}: architecture {arch!r} has no Transformer attention to analyse")
        logger.info(f"{path}: stock fairseq {arch}, analysed as transformer_rela --attn-fn softmax")
        model_cfg._name, model_cfg.arch, model_cfg.attn_fn = "transformer_rela", "transformer_rela", "softmax"
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=overrides, state=state)
    model = models[0].eval()
    if not cpu and torch.cuda.is_available():
        model.cuda()
    task.load_dataset(subset)
    return model, task


@dataclass
class ForcedBatch:
    ids: torch.Tensor  # [B] sentence ids (line numbers in the subset)
    src_tokens: torch.Tensor  # [B, S] left-padded, ends in EOS
    prev_output_tokens: torch.Tensor  # [B, T] starts with EOS
    target: torch.Tensor  # [B, T] ends with EOS
    attention: Dict[Tuple[str, int], torch.Tensor]  # (type, layer) -> [B, H, T_q, T_k] pre-dropout fp32
    pad: int
    eos: int

    def valid_pairs(self, kind):
        from .metrics import valid_pairs

        src_valid = self.src_tokens.ne(self.pad)
        tgt_valid = self.prev_output_tokens.ne(self.pad)
        if kind == "encoder":
            return valid_pairs(src_valid, src_valid)
        if kind == "decoder":
            return valid_pairs(tgt_valid, tgt_valid, causal=True)
        return valid_pairs(self.target.ne(self.pad), src_valid)


def forced_batches(model, task, subset="test", max_tokens=4000):
    """Iterate over the subset in id-independent batches, teacher-forcing the reference."""
    from fairseq import utils

    modules = {name: m for name, m in model.named_modules() if isinstance(m, RelaMultiheadAttention)}
    if not modules:
        raise RelaFairseqError("the model has no rela_fairseq attention modules to read")
    kinds = {name: attention_type(name) for name in modules}
    dataset = task.dataset(subset)
    itr = task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_positions=utils.resolve_max_positions(
            task.max_positions(), model.max_positions()),
        required_batch_size_multiple=1, ignore_invalid_inputs=False, num_workers=0,
    ).next_epoch_itr(shuffle=False)
    device = next(model.parameters()).device
    set_store_attn(model, True)
    try:
        with torch.no_grad():
            for sample in itr:
                if not sample or "net_input" not in sample:
                    continue
                sample = utils.move_to_cuda(sample) if device.type == "cuda" else sample
                model(**sample["net_input"])
                attention = {kinds[name]: m.last_attn.float().cpu() for name, m in modules.items()
                             if kinds[name] is not None and m.last_attn is not None}
                net = sample["net_input"]
                yield ForcedBatch(sample["id"].cpu(), net["src_tokens"].cpu(), net["prev_output_tokens"].cpu(),
                                  sample["target"].cpu(), attention, task.target_dictionary.pad(),
                                  task.target_dictionary.eos())
    finally:
        set_store_attn(model, False)


def num_sentences(task, subset):
    return len(task.dataset(subset))


def layer_list(attention) -> List[Tuple[str, int]]:
    return sorted(attention)
