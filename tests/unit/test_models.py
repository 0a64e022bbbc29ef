"""The model: softmax parity with stock fairseq, incremental decoding, beam search, checkpoints' attention settings."""

import pytest
import torch
from fairseq.models.transformer import TransformerModel
from fairseq.sequence_generator import SequenceGenerator
from helpers import ATTN_FNS, FakeTask, build_model, left_padded_batch

from rela_fairseq import compat
from rela_fairseq.attention import RelaMultiheadAttention, set_store_attn
from rela_fairseq.layers import RelaEncoderLayer
from rela_tools.errors import AttentionSettingsError

TASK = FakeTask(vocab_size=30)


def attention_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, RelaMultiheadAttention)}


def test_default_is_rela_g_in_all_three_attention_types():
    model = build_model(task=TASK)
    modules = attention_modules(model)
    assert len(modules) == 2 + 2 * 2  # tiny: 2 encoder layers, 2 decoder layers with self and cross attention
    for m in modules.values():
        assert m.attn_fn.name == "rela" and m.attn_fn.norm.gate_weight is not None


def test_per_type_overrides():
    model = build_model(task=TASK, attn_fn="softmax", cross_attn_fn="rela", decoder_attn_fn="entmax15")
    kinds = {name: m.attn_fn.name for name, m in attention_modules(model).items()}
    assert kinds["encoder.layers.0.self_attn"] == "softmax"
    assert kinds["decoder.layers.1.self_attn"] == "entmax15"
    assert kinds["decoder.layers.0.encoder_attn"] == "rela"


def test_paper_architecture_sizes():
    model = build_model("transformer_rela", task=FakeTask(vocab_size=100), no_dropout=False)
    base = build_model("transformer_rela", task=FakeTask(vocab_size=100), attn_fn="softmax")
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.parameters())
    assert extra == 18 * 2 * 512  # 18 attention modules, a gain and a gate of width d each
    layer = model.encoder.layers[0]
    assert layer.self_attn.num_heads == 8 and layer.fc1.out_features == 2048 and len(model.encoder.layers) == 6
    assert model.decoder.share_input_output_embed
    assert (model.cfg.dropout, model.cfg.attention_dropout, model.cfg.activation_dropout) == (0.1, 0.1, 0.1)


@pytest.mark.parametrize("arch,dim,heads", [("transformer_rela_iwslt_de_en", 512, 4),
                                            ("transformer_rela_big", 1024, 16)])
def test_other_architectures(arch, dim, heads):
    model = build_model(arch, task=FakeTask(vocab_size=50))
    attn = model.encoder.layers[0].self_attn
    assert attn.embed_dim == dim and attn.num_heads == heads and attn.attn_fn.name == "rela"


def stock_and_plugin_softmax(seed=3):
    """fairseq's transformer_tiny and transformer_rela_tiny --attn-fn softmax, the stock weights loaded strictly."""
    stock = build_model("transformer_tiny", task=TASK, seed=seed)
    assert type(stock) is TransformerModel
    plugin = build_model(task=TASK, attn_fn="softmax", seed=seed + 1)
    plugin.load_state_dict(stock.state_dict(), strict=True)
    return stock, plugin


def test_softmax_has_the_stock_parameters_and_initialisation():
    stock = build_model("transformer_tiny", task=TASK, seed=5)
    plugin = build_model(task=TASK, attn_fn="softmax", seed=5)
    # fairseq 0.12.2's stock encoder layers add 8 unused copies for their fused path (zeros); ours do not
    stock_params = {k: p for k, p in stock.named_parameters() if k.split(".")[-1] not in compat.FUSED_ENCODER_PARAMS}
    plugin_params = dict(plugin.named_parameters())
    assert stock_params.keys() == plugin_params.keys()
    for name, p in stock_params.items():
        assert torch.equal(p, plugin_params[name]), name
    # ReLA draws its extra parameters from a private stream: the shared weights start equal too
    rela = dict(build_model(task=TASK, attn_fn="rela", seed=5).named_parameters())
    for name, p in stock_params.items():
        assert torch.equal(p, rela[name]), name


@pytest.mark.parametrize("attn_fn", ["rela", "softmax"])
def test_zero_qkv_bias_init_zeroes_those_biases_and_draws_every_other_weight_alike(attn_fn):
    uniform = dict(build_model(task=TASK, attn_fn=attn_fn, seed=7).named_parameters())
    zero = dict(build_model(task=TASK, attn_fn=attn_fn, seed=7, attn_qkv_bias_init="zero").named_parameters())
    qkv_biases = [name for name in zero if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    assert len(qkv_biases) == 3 * 6  # three projections in each of the tiny model's six attention modules
    for name, p in zero.items():
        if name in qkv_biases:
            assert torch.count_nonzero(p) == 0 and torch.count_nonzero(uniform[name]) == p.numel(), name
        else:
            assert torch.equal(p, uniform[name]), name


def test_retain_dropout_modules_takes_the_stock_names():
    """fairseq-generate --retain-dropout-modules picks dropout modules by their owner's class name; a list written
    for the stock Transformer (Monte-Carlo dropout recipes) keeps ours too."""
    from fairseq.modules import FairseqDropout

    def names(model):
        return {m.module_name for m in model.modules() if isinstance(m, FairseqDropout)}

    stock = build_model("transformer_tiny", task=TASK, no_dropout=False)
    model = build_model(task=TASK, no_dropout=False)
    assert names(model) == names(stock)
    model.make_generation_fast_(retain_dropout=True, retain_dropout_modules=sorted(names(stock)))
    assert all(m.apply_during_inference for m in model.modules() if isinstance(m, FairseqDropout))


@pytest.mark.parametrize("train", [False, True])
def test_stock_state_dict_gives_identical_outputs_with_softmax(train):
    stock, plugin = stock_and_plugin_softmax()
    src, lengths = left_padded_batch(TASK.src_dict, [7, 5, 3])
    prev = left_padded_batch(TASK.tgt_dict, [6, 6, 6], seed=1)[0]
    if train:
        stock.train(), plugin.train()
    with torch.no_grad():
        expected = stock(src, lengths, prev)[0]
        got = plugin(src, lengths, prev)[0]
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        set_store_attn(plugin)  # the explicit path (used for analysis) gives the same up to rounding
        torch.testing.assert_close(plugin(src, lengths, prev)[0], expected, rtol=1e-5, atol=1e-5)


def full_and_incremental(model, src, lengths, prev):
    with torch.no_grad():
        encoder_out = model.encoder(src, src_lengths=lengths)
        full = model.decoder(prev, encoder_out=encoder_out)[0]
        state = {}
        steps = [model.decoder(prev[:, : t + 1], encoder_out=encoder_out, incremental_state=state)[0]
                 for t in range(prev.size(1))]
    return full, torch.cat(steps, dim=1)


@pytest.mark.parametrize("fn", ATTN_FNS)
def test_incremental_decoding_equals_full_forward(fn):
    model = build_model(task=TASK, attn_fn=fn, seed=7)
    src, lengths = left_padded_batch(TASK.src_dict, [9, 6, 2, 4])
    prev = left_padded_batch(TASK.tgt_dict, [7, 7, 7, 7], seed=2)[0]
    full, incremental = full_and_incremental(model, src, lengths, prev)
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", ATTN_FNS)
def test_beam_search_scores_equal_teacher_forced_scores(fn):
    """Beam search (incremental decoding, beam-reduced cross-attention) scores each hypothesis as a full forward
    pass over it would."""
    model = build_model(task=TASK, attn_fn=fn, seed=11)
    src, lengths = left_padded_batch(TASK.src_dict, [8, 5, 3])
    generator = SequenceGenerator([model], TASK.tgt_dict, beam_size=3, max_len_b=8)
    with torch.no_grad():
        hypos = generator.forward({"net_input": {"src_tokens": src, "src_lengths": lengths}})
        for i, sentence in enumerate(hypos):
            for hypo in sentence:
                tokens = hypo["tokens"]
                prev = torch.cat([tokens.new_tensor([TASK.tgt_dict.eos()]), tokens[:-1]])[None]
                logits = model(src[i: i + 1], lengths[i: i + 1], prev)
                lprobs = model.get_normalized_probs(logits, log_probs=True)[0]
                forced = lprobs.gather(-1, tokens[:, None]).squeeze(-1)
                torch.testing.assert_close(hypo["positional_scores"], forced, rtol=1e-4, atol=1e-4)


def test_encoder_runs_our_attention_after_loading_on_every_fairseq_version():
    """fairseq 0.12.2's fused encoder path would skip self_attn after load_state_dict in eval mode (silent softmax)
    and crash on left-padded batches; our layer switches it off."""
    model = build_model(task=TASK, attn_fn="rela", seed=2)
    model.load_state_dict(model.state_dict())
    model.eval()
    calls = []
    for layer in model.encoder.layers:
        assert isinstance(layer, RelaEncoderLayer)
        assert not any(name in dict(layer.named_parameters()) for name in compat.FUSED_ENCODER_PARAMS)
        layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
    src, lengths = left_padded_batch(TASK.src_dict, [6, 2, 4])
    with torch.no_grad():
        model.encoder(src, src_lengths=lengths)
    assert len(calls) == len(model.encoder.layers)


@pytest.mark.skipif(not compat.HAS_FUSED_ENCODER_PATH, reason="only fairseq 0.12.2 has the fused encoder path")
def test_fairseq_0122_checkpoint_with_fused_path_weights_loads():
    stock = build_model("transformer_tiny", task=TASK, seed=4)
    state = stock.state_dict()
    assert any(k.endswith("encoder.layers.0.in_proj_weight") for k in state)  # 0.12.2's extra copies
    plugin = build_model(task=TASK, attn_fn="softmax", seed=9)
    plugin.load_state_dict(state, strict=True)
    assert not any("in_proj_weight" in k for k in plugin.state_dict())


def test_checkpoint_with_other_attention_function_is_refused_with_a_clear_message():
    rela = build_model(task=TASK, attn_fn="rela")
    softmax = build_model(task=TASK, attn_fn="softmax")
    with pytest.raises(AttentionSettingsError, match=r"checkpoint rela .*model softmax.*parameters differ"):
        softmax.load_state_dict(rela.state_dict())
    with pytest.raises(AttentionSettingsError, match=r"checkpoint softmax.*model rela"):
        rela.load_state_dict(softmax.state_dict())
    sparsemax = build_model(task=TASK, attn_fn="sparsemax")
    with pytest.raises(AttentionSettingsError, match="--allow-attn-fn-change"):
        sparsemax.load_state_dict(softmax.state_dict())
    gated_i = build_model(task=TASK, attn_fn="rela", rela_variant="init")
    with pytest.raises(AttentionSettingsError, match="no gate"):
        gated_i.load_state_dict(rela.state_dict())


def test_allow_attn_fn_change_reuses_weights_when_parameters_fit():
    softmax = build_model(task=TASK, attn_fn="softmax")
    sparsemax = build_model(task=TASK, attn_fn="sparsemax", allow_attn_fn_change=True)
    sparsemax.load_state_dict(softmax.state_dict())
    rela = build_model(task=TASK, attn_fn="rela", allow_attn_fn_change=True)
    with pytest.raises(AttentionSettingsError, match="parameters differ"):
        rela.load_state_dict(softmax.state_dict())


def test_store_attn_keeps_per_head_weights_for_every_module():
    model = build_model(task=TASK, attn_fn="rela")
    modules = set_store_attn(model)
    src, lengths = left_padded_batch(TASK.src_dict, [5, 3])
    prev = left_padded_batch(TASK.tgt_dict, [4, 4], seed=3)[0]
    with torch.no_grad():
        model(src, lengths, prev)
    shapes = {m.last_attn.shape for m in modules}
    assert shapes == {(2, 2, 5, 5), (2, 2, 4, 4), (2, 2, 4, 5)}
    set_store_attn(model, False)
    assert all(m.last_attn is None and not m.store_attn for m in modules)


def test_readme_option_table_matches_the_settings_dataclass():
    """Every attention setting is in docs/usage.md's options table (the README's before it moved there) with its
    choices, default first (settings.py defines them)."""
    import os
    import re
    from dataclasses import fields

    from helpers import REPO

    from rela_fairseq.settings import (
        ATTENTION_TYPES,
        MODEL_FIELDS,
        AttentionSettings,
        RelaTransformerConfig,
        field_choices,
    )

    readme = open(os.path.join(REPO, "docs", "usage.md"), encoding="utf-8").read()
    rows = {}
    for line in readme.splitlines():
        if line.startswith("| `--"):
            options, choices = line.split("|")[1:3]
            for option in re.findall(r"`--([\w-]+)`", options):
                rows[option.replace("-", "_")] = re.findall(r"`([^`]+)`", choices)
    model_fields = [f for f in fields(RelaTransformerConfig) if f.name in {name for name, _, _ in MODEL_FIELDS}]
    assert len(model_fields) == len(MODEL_FIELDS)
    for f in [*(f for f in fields(AttentionSettings) if not f.name.startswith("_")), *model_fields]:
        assert f.name in rows, f"docs/usage.md lists no --{f.name.replace('_', '-')}"
        choices = field_choices(f)
        if choices and f.default is not None:
            assert rows[f.name][0] == f.default and set(rows[f.name]) == set(choices), (f.name, rows[f.name])
        elif isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            assert rows[f.name] == [str(f.default)], (f.name, rows[f.name])
    assert {t.option for t in ATTENTION_TYPES} <= set(rows)
