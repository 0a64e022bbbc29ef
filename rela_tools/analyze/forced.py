"""Teacher-forcing a subset through a trained model and collecting every attention map, batch by batch."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from rela_fairseq.attention import RelaMultiheadAttention, set_store_attn

from ..attention_types import ATTENTION_TYPES
from ..errors import RelaFairseqError
from .metrics import valid_pairs

logger = logging.getLogger(__name__)
_MODULE_NAME = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(\w+)$")


def module_attention_type(module_name: str) -> tuple[str, int] | None:
    """(attention type name, layer index) of an attention module, from its name (``decoder.layers.1.encoder_attn``
    -> ``("cross", 1)``), or None for a module that is none of the three."""
    match = _MODULE_NAME.search(module_name)
    if not match:
        return None
    side, layer, attribute = match.groups()
    for t in ATTENTION_TYPES:
        if attribute == t.layer_module and (t.name == side or (t.name == "cross" and side == "decoder")):
            return t.name, int(layer)
    return None


def load_model(path: str, data: str, subset: str = "test", overrides: Optional[dict] = None,
               cpu: bool = True) -> tuple[Any, Any]:
    """(model, task) for a checkpoint; a stock fairseq ``transformer`` checkpoint is loaded as
    ``transformer_rela --attn-fn softmax`` (the same model, whose attention maps we can read)."""
    from fairseq import checkpoint_utils
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    from rela_fairseq import plug_into_fairseq

    plug_into_fairseq()  # the scripts' driver and rela-analyze import the package without it (rela_fairseq/__init__.py)
    if not os.path.isfile(path):
        raise RelaFairseqError(f"no checkpoint at {path}")
    overrides = dict({"data": data}, **(overrides or {}))
    state = checkpoint_utils.load_checkpoint_to_cpu(path, overrides)
    model_cfg = state["cfg"]["model"]
    arch = getattr(model_cfg, "arch", None)
    model_name = ARCH_MODEL_NAME_REGISTRY.get(arch) if arch is not None else None
    if arch is not None and model_name != "transformer_rela":
        if model_name != "transformer":
            raise RelaFairseqError(f"{path}: architecture {arch!r} (model {model_name or 'unknown'!r}) is not a "
                                   "translation Transformer; rela-analyze reads transformer_rela and fairseq's "
                                   "transformer checkpoints")
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
    attention: dict[tuple[str, int], torch.Tensor]  # (type, layer) -> [B, H, T_q, T_k] pre-dropout fp32
    pad: int
    eos: int

    def valid_pairs(self, attention_type: str) -> torch.Tensor:
        src_valid = self.src_tokens.ne(self.pad)
        tgt_valid = self.prev_output_tokens.ne(self.pad)
        if attention_type == "encoder":
            return valid_pairs(src_valid, src_valid)
        if attention_type == "decoder":
            return valid_pairs(tgt_valid, tgt_valid, causal=True)
        return valid_pairs(self.target.ne(self.pad), src_valid)


def forced_batches(model: Any, task: Any, subset: str = "test", max_tokens: int = 4000) -> Iterator[ForcedBatch]:
    """Iterate over the subset in id-independent batches, teacher-forcing the reference."""
    from fairseq import utils

    modules = {name: m for name, m in model.named_modules() if isinstance(m, RelaMultiheadAttention)}
    if not modules:
        raise RelaFairseqError("the model has no rela_fairseq attention modules to read")
    types_of = {name: module_attention_type(name) for name in modules}
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
                attention: dict[Any, torch.Tensor] = {
                    types_of[name]: m.last_attn.float().cpu() for name, m in modules.items()
                    if types_of[name] is not None and m.last_attn is not None}
                net = sample["net_input"]
                yield ForcedBatch(sample["id"].cpu(), net["src_tokens"].cpu(), net["prev_output_tokens"].cpu(),
                                  sample["target"].cpu(), attention, task.target_dictionary.pad(),
                                  task.target_dictionary.eos())
    finally:
        set_store_attn(model, False)


def sentence_maps(batch: ForcedBatch, b: int, attention_type: str, src_dict: Any,
                  tgt_dict: Any) -> tuple[dict, list, list]:
    """One sentence's attention of one type, padding removed: ({layer: weights [H, rows, columns]}, row tokens,
    column tokens). Cross-attention rows are the tokens each step predicts; self-attention rows and columns are the
    layer's inputs (source tokens; decoder inputs)."""
    src_keep = batch.src_tokens[b].ne(batch.pad)
    tgt_keep = batch.prev_output_tokens[b].ne(batch.pad)
    src = [src_dict[int(t)] for t in batch.src_tokens[b][src_keep]]
    if attention_type == "encoder":
        rows, cols, row_keep, col_keep = src, src, src_keep, src_keep
    elif attention_type == "decoder":
        dec_in = [tgt_dict[int(t)] for t in batch.prev_output_tokens[b][tgt_keep]]
        rows, cols, row_keep, col_keep = dec_in, dec_in, tgt_keep, tgt_keep
    else:
        out = [tgt_dict[int(t)] for t in batch.target[b][tgt_keep]]
        rows, cols, row_keep, col_keep = out, src, tgt_keep, src_keep
    maps = {layer: w[b][:, row_keep][:, :, col_keep] for (name, layer), w in batch.attention.items()
            if name == attention_type}
    return maps, rows, cols
