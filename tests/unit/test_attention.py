"""The attention math against plain references: ReLA weights, masks, null rows, the norm, gradients, precision."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ATTN_FNS, EMBED, HEADS, attention_function, make_attention

from rela_fairseq.attention_functions import EntmaxAlpha
from rela_fairseq.rela import EPS, rela_attention


def padding_mask(lengths, width):
    return torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]  # right padding, True = pad


def self_attend(module, x, mask=None, **kw):
    return module(x, x, x, key_padding_mask=mask, **kw)


def hand_scores(module, query, memory):
    """(Q_h / sqrt(d_h)) K_hᵀ from the module's own projections, [B, H, T, S]."""
    T, B, _ = query.shape
    d_h = module.head_dim

    def split(x):
        return x.view(x.size(0), B, module.num_heads, d_h).permute(1, 2, 0, 3)

    q = split(module.q_proj(query)) / math.sqrt(d_h)
    k = split(module.k_proj(memory))
    return q @ k.transpose(-1, -2)


def test_rela_weights_are_relu_of_scaled_scores_with_masked_entries_exactly_zero():
    module = make_attention("rela")
    x = torch.randn(7, 3, EMBED)
    mask = padding_mask([7, 5, 2], 7)
    _, weights = self_attend(module, x, mask, need_head_weights=True)  # [H, B, T, S]
    expected = F.relu(hand_scores(module, x, x)).masked_fill(mask[:, None, None, :], 0.0).transpose(0, 1)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert (weights.transpose(0, 1)[mask[:, None, None, :].expand(-1, HEADS, 7, -1)] == 0).all()
    row_sums = weights.sum(-1)
    assert not torch.allclose(row_sums, torch.ones_like(row_sums)), "ReLA rows must not be normalised"
    assert (weights == 0).any() and (weights > 0).any()


# --------------------------------------------------------------------------- the controls beyond the paper

def control_reference(fn, scores, n, bias=None):
    """The three controls as their papers write them, on scores [B, H, T, S] with masked keys at -inf and n [.., 1]
    the unmasked keys per query."""
    if fn == "sigmoid":  # σ(s + b), b = -log n (+ a learned bias per head)
        b = -torch.log(n) + (0 if bias is None else bias.view(1, -1, 1, 1))
        return torch.sigmoid(scores + b)
    if fn == "relu_len":  # ReLU(s) / n
        return F.relu(scores) / n
    with_null = torch.cat([scores, torch.zeros_like(scores[..., :1])], dim=-1)  # one more key, of logit 0
    return F.softmax(with_null, dim=-1)[..., :-1]


@pytest.mark.parametrize("fn", ["sigmoid", "relu_len", "softmax_null"])
@pytest.mark.parametrize("mask", ["padding", "causal"])
def test_controls_match_their_papers_definitions_and_n_counts_the_unmasked_keys(fn, mask):
    module = make_attention(fn)
    x = torch.randn(6, 3, EMBED)
    scores = hand_scores(module, x, x)
    if mask == "padding":
        padding = padding_mask([6, 4, 2], 6)
        blocked = padding[:, None, None, :].expand(-1, HEADS, 6, -1)
        _, weights = self_attend(module, x, padding, need_head_weights=True)
    else:
        blocked = torch.ones(6, 6, dtype=torch.bool).triu(1).expand(3, HEADS, 6, 6)
        _, weights = self_attend(module, x, attn_mask=torch.zeros(6, 6).masked_fill(blocked[0, 0], float("-inf")),
                                 need_head_weights=True)
    n = (~blocked).sum(-1, keepdim=True).float()  # padding: the sentence's length; causal: t + 1 for query t
    expected = control_reference(fn, scores.masked_fill(blocked, float("-inf")), n)
    weights = weights.transpose(0, 1)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert (weights[blocked] == 0).all()
    row_sums = weights.sum(-1)
    assert (row_sums < 1).all() if fn == "softmax_null" else not torch.allclose(row_sums, torch.ones_like(row_sums))


@pytest.mark.parametrize("fn", ["sigmoid", "relu_len", "softmax_null"])
def test_controls_under_bf16_autocast_are_finite_and_masked_keys_get_nothing(fn):
    module = make_attention(fn)
    x = torch.randn(5, 2, EMBED, requires_grad=True)
    padding = padding_mask([5, 3], 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = self_attend(module, x, padding, need_head_weights=True)
    assert weights.dtype == torch.float32 and (weights[:, 1, :, 3:] == 0).all()  # computed in fp32 at least
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_softmax_null_is_fairseqs_add_zero_attn():
    """fairseq's MultiheadAttention with add_zero_attn appends a key and a value of zeros: logit q·0 = 0, value 0."""
    from fairseq.modules import MultiheadAttention

    ours = make_attention("softmax_null", rela_kernel="eager")
    stock = MultiheadAttention(EMBED, HEADS, self_attention=True, add_zero_attn=True)
    stock.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("attn_fn.")})
    stock.eval()
    x = torch.randn(5, 2, EMBED)
    padding = padding_mask([5, 3], 5)
    with torch.no_grad():
        stock_out = self_attend(stock, x, padding, need_weights=False)[0]
    for need_weights in (False, True):  # the eager route with and without the weights asked for
        torch.testing.assert_close(self_attend(ours, x, padding, need_weights=need_weights)[0], stock_out,
                                   rtol=1e-5, atol=1e-6)


def test_sigmoid_learned_bias_is_one_per_head_and_starts_at_the_default():
    default, learned = (make_attention("sigmoid", seed=3, sigmoid_bias=b) for b in ("length", "learned"))
    assert list(dict(default.attn_fn.named_parameters())) == []
    bias = learned.attn_fn.bias
    assert bias.shape == (HEADS,)
    with torch.no_grad():  # the same seed: the same projections
        bias.zero_()
    x = torch.randn(4, 2, EMBED)
    torch.testing.assert_close(self_attend(learned, x)[0], self_attend(default, x)[0])
    with torch.no_grad():
        bias.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    _, weights = self_attend(learned, x, need_head_weights=True)
    n = torch.full((1, 1, 1, 1), 4.0)
    expected = control_reference("sigmoid", hand_scores(learned, x, x), n, bias)
    torch.testing.assert_close(weights.transpose(0, 1), expected, rtol=1e-5, atol=1e-6)
    assert learned.attn_fn.settings() == {"attn_fn": "sigmoid", "params": ["bias"], "bias": "learned"}


def test_a_bad_sigmoid_bias_is_refused_naming_the_choices():
    from rela_tools.errors import RelaConfigError

    with pytest.raises(RelaConfigError, match="unknown --sigmoid-bias 'zero'; choose one of length, learned"):
        make_attention("sigmoid", sigmoid_bias="zero")


def test_causal_mask_gives_exact_zeros_and_matches_plain_reference():
    module = make_attention("rela")
    x = torch.randn(5, 2, EMBED)
    causal = torch.triu(torch.full((5, 5), float("-inf")), 1)  # fairseq's decoder mask
    out, weights = self_attend(module, x, attn_mask=causal, need_head_weights=True)
    assert (weights[..., torch.ones(5, 5, dtype=torch.bool).triu(1)] == 0).all()
    ref_out, ref_weights = rela_attention(x.transpose(0, 1), x.transpose(0, 1), module.q_proj, module.k_proj,
                                          module.v_proj, module.out_proj, HEADS, module.attn_fn.norm, causal=True)
    torch.testing.assert_close(weights.transpose(0, 1), ref_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.transpose(0, 1), ref_out, rtol=1e-5, atol=1e-5)


def test_a_boolean_attn_mask_masks_where_true_on_every_route():
    """True = masked, as torch's attention masks (fairseq's own code would add True as +1)."""
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    causal = torch.zeros(5, 5).masked_fill(future, float("-inf"))
    x = torch.randn(5, 2, EMBED)
    for kernel in ("eager", "auto"):
        module = make_attention("rela", rela_kernel=kernel)
        expected = self_attend(module, x, attn_mask=causal, need_weights=False)[0]
        torch.testing.assert_close(self_attend(module, x, attn_mask=future, need_weights=False)[0], expected)
    weights = self_attend(module, x, attn_mask=future, need_head_weights=True)[1]
    assert (weights[..., future] == 0).all() and (weights[..., ~future] > 0).any()


@pytest.mark.parametrize("variant", ["gated", "init"])
@pytest.mark.parametrize("norm,scope", [("rms", "all"), ("rms", "head"), ("layer", "all"), ("none", "all")])
def test_output_matches_plain_reference(variant, norm, scope):
    module = make_attention("rela", kv_dim=12, rela_variant=variant, rela_norm=norm, rela_norm_scope=scope)
    query, memory = torch.randn(4, 3, EMBED), torch.randn(6, 3, 12)
    mask = padding_mask([6, 3, 1], 6)
    out, _ = module(query, memory, memory, key_padding_mask=mask, static_kv=True)
    ref, _ = rela_attention(query.transpose(0, 1), memory.transpose(0, 1), module.q_proj, module.k_proj,
                            module.v_proj, module.out_proj, HEADS, module.attn_fn.norm, key_padding_mask=mask)
    torch.testing.assert_close(out.transpose(0, 1), ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_is_the_spec_formula_over_the_full_width():
    norm = attention_function("rela", EMBED, HEADS, rela_variant="init").norm
    z = torch.randn(3, 2, EMBED)
    expected = norm.weight * z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-8)
    torch.testing.assert_close(norm(z), expected)
    assert EPS == 1e-8


def test_gate_is_elementwise_sigmoid_of_the_unnormalised_heads():
    norm = attention_function("rela", EMBED, HEADS, rela_variant="gated").norm
    assert norm.gate_weight.shape == (EMBED,) and torch.equal(norm.weight, torch.ones(EMBED))
    bound = math.sqrt(3 / EMBED)
    assert norm.gate_weight.abs().max() <= bound and norm.gate_weight.abs().max() > 0
    z = torch.randn(3, 2, EMBED)
    rms = z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-8)
    torch.testing.assert_close(norm(z), rms * torch.sigmoid(norm.gate_weight * z))


def test_rela_i_gain_is_small_uniform_and_no_gate():
    fn = attention_function("rela", 512, 8, rela_variant="init")
    assert fn.norm.gate_weight is None
    bound = math.sqrt(3 / 512)
    assert fn.norm.weight.abs().max() <= bound and fn.norm.weight.std() > bound / 4
    gated = attention_function("rela", 512, 8, rela_variant="gated")
    assert sum(p.numel() for p in gated.parameters()) == 2 * 512  # +2d per attention module


def null_row_module(fn="rela", dtype=torch.float32, **kw):
    """A module whose first query has all-zero scores: q_proj maps that query to 0."""
    module = make_attention(fn, dtype=dtype, **kw)
    with torch.no_grad():
        module.q_proj.bias.zero_()
    x = torch.randn(5, 2, EMBED, dtype=dtype)
    x[0] = 0
    return module, x


def test_null_row_gives_all_zero_weights_and_finite_output_and_gradients():
    module, x = null_row_module()
    x.requires_grad_(True)
    out, weights = self_attend(module, x, need_head_weights=True)
    assert (weights[:, :, 0] == 0).all(), "a zero query must switch every head off"
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_null_row_under_bf16_autocast_is_finite():
    module, x = null_row_module()
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = self_attend(module, x, need_head_weights=True)
    assert (weights[:, :, 0] == 0).all() and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def _fp16_supported():
    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not _fp16_supported(), reason="this machine's torch has no fp16 matmul")
def test_null_row_in_fp16_is_finite_and_norm_runs_in_fp32():
    module, x = null_row_module(dtype=torch.float16)
    x.requires_grad_(True)
    out, weights = self_attend(module, x, need_head_weights=True)
    assert out.dtype == torch.float16 and weights.dtype == torch.float32
    assert (weights[:, :, 0] == 0).all() and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    # the norm of an all-zero row is 0 / sqrt(1e-8) = 0 computed in fp32; in fp16 1e-8 would underflow to 0
    heads = torch.zeros(1, 1, EMBED, dtype=torch.float16)
    assert torch.isfinite(module.attn_fn.norm(heads)).all()


@pytest.mark.skipif(not _fp16_supported(), reason="this machine's torch has no fp16 matmul")
@pytest.mark.parametrize("fn", ["rela", "sigmoid", "relu_len", "softmax_null"])
def test_a_future_score_that_overflows_in_fp16_is_masked_to_zero_not_nan(fn):
    """Spec step 3: a masked score becomes exactly 0 (ReLA; -inf for the others, whose weight is then 0). fairseq
    adds its causal mask (-inf) to the scores: a future score that overflowed to +inf in fp16 would become NaN there,
    and ReLU(NaN) is NaN."""
    module = make_attention(fn, heads=1, rela_kernel="eager")
    with torch.no_grad():
        for proj in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
            proj.weight.copy_(torch.eye(EMBED))
            proj.bias.zero_()
    module = module.half()
    x = torch.zeros(2, 1, EMBED, dtype=torch.float16)
    x[0, 0, 0], x[1, 0, 0] = 30.0, 60000.0  # q0 · k1 / 4 = 450,000: +inf in fp16, and position 1 is in q0's future
    causal = torch.triu(torch.full((2, 2), float("-inf")), 1).half()
    with torch.no_grad():
        out, weights = self_attend(module, x, attn_mask=causal, need_head_weights=True)
    assert weights[0, 0, 0, 1] == 0 and torch.isfinite(weights[0, 0, 0]).all()
    assert torch.isfinite(out[0]).all()


def test_rela_i_is_invariant_to_scaling_v_proj_because_the_norm_spans_all_heads():
    module = make_attention("rela", rela_variant="init")
    x = torch.randn(6, 2, EMBED)
    before, _ = self_attend(module, x)
    with torch.no_grad():
        module.v_proj.weight.mul_(3.7)
        module.v_proj.bias.mul_(3.7)
    after, _ = self_attend(module, x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scope,changes", [("all", True), ("head", False)])
def test_scaling_one_heads_values_changes_the_output_only_when_the_norm_spans_all_heads(scope, changes):
    module = make_attention("rela", rela_variant="init", rela_norm_scope=scope)
    x = torch.randn(6, 2, EMBED)
    before, _ = self_attend(module, x)
    d_h = EMBED // HEADS
    with torch.no_grad():  # scale head 1's slice of the values only
        module.v_proj.weight[d_h:2 * d_h].mul_(5.0)
        module.v_proj.bias[d_h:2 * d_h].mul_(5.0)
    after, _ = self_attend(module, x)
    assert (not torch.allclose(after, before, rtol=1e-4, atol=1e-5)) == changes


@pytest.mark.parametrize("fn", ATTN_FNS)
def test_gradcheck_float64(fn):
    module = make_attention(fn, embed_dim=8, heads=2, dtype=torch.float64, kv_dim=6, entmax_bisect_iters=80)
    query = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)
    mask = padding_mask([4, 3], 4)
    params = list(module.attn_fn.parameters())
    # softmax: check our own path; fairseq's stock path (used when no weights are stored) rounds softmax to fp32
    module.store_attn = True

    def f(q, m, *extra):
        return module(q, m, m, key_padding_mask=mask, static_kv=True, need_weights=False)[0]

    assert torch.autograd.gradcheck(f, (query, memory, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_entmax_alpha_learns_one_alpha_per_head_in_the_open_interval():
    fn = attention_function("entmax_alpha", EMBED, HEADS)
    assert isinstance(fn, EntmaxAlpha) and fn.pre_alpha.shape == (HEADS,)
    torch.testing.assert_close(fn.alpha(), torch.full((HEADS,), 1.5))
    with torch.no_grad():
        fn.pre_alpha.copy_(torch.tensor([-50.0, -1.0, 1.0, 50.0]))
    alpha = fn.alpha()
    assert (alpha >= 1.01).all() and (alpha <= 2.0).all() and alpha[1] < alpha[2]
    scores = torch.randn(2, HEADS, 3, 5)
    weights = fn(scores)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, HEADS, 3))
    assert (weights == 0).any()


@pytest.mark.parametrize("fn", ["softmax", "sparsemax", "entmax15", "entmax_alpha"])
def test_normalised_functions_sum_to_one_and_ignore_masked_keys(fn):
    module = make_attention(fn)
    x = torch.randn(6, 3, EMBED)
    mask = padding_mask([6, 4, 2], 6)
    _, weights = self_attend(module, x, mask, need_head_weights=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(HEADS, 3, 6), rtol=1e-5, atol=1e-5)
    assert (weights.transpose(0, 1)[mask[:, None, None, :].expand(-1, HEADS, 6, -1)] == 0).all()


@pytest.mark.parametrize("fn", ATTN_FNS)
def test_weights_are_computed_only_when_requested(fn):
    module = make_attention(fn)
    x = torch.randn(4, 2, EMBED)
    out, weights = self_attend(module, x, need_weights=False)
    assert weights is None
    out2, avg = self_attend(module, x, need_weights=True)
    out3, per_head = self_attend(module, x, need_head_weights=True)
    assert avg.shape == (2, 4, 4) and per_head.shape == (HEADS, 2, 4, 4)
    torch.testing.assert_close(avg, per_head.mean(0))
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(out, out3)


def test_reported_weights_are_pre_dropout():
    module = make_attention("rela")
    module.dropout_module.p = 0.5
    module.train()
    x = torch.randn(4, 2, EMBED)
    _, weights = self_attend(module, x, need_head_weights=True)
    module.eval()
    _, clean = self_attend(module, x, need_head_weights=True)
    torch.testing.assert_close(weights, clean)


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("scope_width", [EMBED, EMBED // HEADS])
def test_memory_saving_rms_norm_equals_the_reference_formula(gate, scope_width):
    from rela_fairseq.rela import GatedRMSNorm, rela_norm_reference

    torch.manual_seed(0)
    heads = torch.randn(5, 3, EMBED, requires_grad=True)
    weight = torch.randn(EMBED, requires_grad=True)
    gate_weight = torch.randn(EMBED, requires_grad=True) if gate else None
    params = [p for p in (heads, weight, gate_weight) if p is not None]
    out = GatedRMSNorm.apply(heads, weight, gate_weight, scope_width)
    grads = torch.autograd.grad(out.square().sum(), params, retain_graph=True)
    ref = rela_norm_reference(heads, weight, None, gate_weight, "rms", scope_width)
    ref_grads = torch.autograd.grad(ref.square().sum(), params, retain_graph=True)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # the in-place backward leaves the incoming gradient alone, also when it is a broadcast view (from .sum())
    upstream = torch.randn_like(out)
    kept = upstream.clone()
    grads = torch.autograd.grad(out, params, upstream, retain_graph=True)
    ref_grads = torch.autograd.grad(ref, params, kept, retain_graph=True)
    torch.testing.assert_close(upstream, kept, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    for g, r in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    double = [p.detach().double().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(
        lambda h, w, *gw: GatedRMSNorm.apply(h, w, gw[0] if gw else None, scope_width), double)
    with torch.no_grad():  # the decoding path (no autograd.Function) gives the same
        torch.testing.assert_close(GatedRMSNorm.compute(heads, weight, gate_weight, scope_width)[0], ref)
    # it keeps the input and one number per row for the backward pass, not the intermediate tensors
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        GatedRMSNorm.apply(heads, weight, gate_weight, scope_width)
    assert sum(saved) <= heads.numel() + 2 * EMBED + heads.numel() // scope_width
