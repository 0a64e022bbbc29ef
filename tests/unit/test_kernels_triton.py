"""The Triton kernels (the GPU path of ``--rela-kernel``) against the eager path: on a GPU where there is one, else on
CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set here before Triton is imported). Same checks as
``test_kernels.py``: the core with every mask, activation and dropout, the norm, the decoding step with beam-shared
values, and whole models (training gradients, beam search) with the Triton kernels in place of the C++ ones."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from kernel_checks import (  # noqa: E402
    ACTIVATIONS,
    TOL,
    check_decoding_step,
    check_models_fused_equal_eager,
    eager_core,
    time_major,
)

from rela_fairseq import kernels  # noqa: E402
from rela_fairseq.kernels.rela_triton import TritonKernels  # noqa: E402
from rela_fairseq.rela import EPS, rela_norm_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON = TritonKernels()


def _inputs(masks):
    """q, k, v leaves and the masks: lengths that are no multiple of the tiles; with padding, a source longer than
    the target; padded keys in both sentences (ReLU / n and sigmoid must not count them in n)."""
    bsz, heads, tgt_len, head_dim = 2, 3, 19, 8
    src_len = tgt_len if masks != "padding" else 21
    q = time_major(bsz * heads, tgt_len, head_dim, seed=1).to(DEVICE)
    k, v = (time_major(bsz * heads, src_len, head_dim, seed=s).to(DEVICE) for s in (2, 3))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    q, k, v = leaves
    padding = attn_mask = None
    if masks in ("padding", "both"):
        padding = torch.zeros(bsz, src_len, dtype=torch.bool, device=DEVICE)
        padding[0, -3:] = padding[1, :2] = True
    if masks in ("causal", "both"):
        attn_mask = torch.full((tgt_len, src_len), float("-inf"), device=DEVICE).triu(1)
    return leaves, padding, attn_mask


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("masks", ["padding", "causal", "both"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_triton_attention_core_equals_eager(activation, masks, dropout):
    """One parameterised kernel for every element-wise function: forward and gradients against the eager path."""
    bsz, heads, head_dim = 2, 3, 8
    leaves, padding, attn_mask = _inputs(masks)
    q, k, v = leaves
    tgt_len, src_len = q.size(1), k.size(1)
    torch.manual_seed(5)
    fused = kernels.fused_attention(TRITON, q, k, v, heads=heads, scale=head_dim ** -0.5, padding=padding,
                                    attn_mask=attn_mask, activation=activation, dropout=dropout)
    keep = None
    if dropout:
        torch.manual_seed(5)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        keep = TRITON.dropout_mask(bsz * heads, tgt_len, src_len, dropout, seed, device=DEVICE)
        assert abs((keep > 0).float().mean().item() - (1 - dropout)) < 0.05
    eager = eager_core(q, k, v, head_dim ** -0.5, padding, attn_mask, activation, keep)
    torch.testing.assert_close(fused, eager, **TOL)
    upstream = torch.randn_like(eager)
    for f, e in zip(torch.autograd.grad(fused, leaves, upstream), torch.autograd.grad(eager, leaves, upstream)):
        torch.testing.assert_close(f, e, **TOL)


@pytest.mark.parametrize("gated", [True, False])
def test_triton_norm_equals_reference(gated):
    torch.manual_seed(0)
    heads = torch.randn(37, 2, 24, device=DEVICE, requires_grad=True)  # 74 rows: more than one backward program
    gain = torch.randn(24, device=DEVICE, requires_grad=True)
    gate = torch.randn(24, device=DEVICE, requires_grad=True) if gated else None
    fused = kernels.fused_gated_rms_norm(TRITON, heads, gain, gate, 24, EPS)
    ref = rela_norm_reference(heads, gain, None, gate, "rms", 24)
    torch.testing.assert_close(fused, ref, **TOL)
    leaves = [heads, gain] + ([gate] if gated else [])
    upstream = torch.randn_like(ref)
    for f, r in zip(torch.autograd.grad(fused, leaves, upstream), torch.autograd.grad(ref, leaves, upstream)):
        torch.testing.assert_close(f, r, **TOL)
    assert not kernels.norm_supported(TRITON, 6, 24)  # a per-head norm runs eagerly on a GPU


@pytest.mark.parametrize("layout", ["contiguous", "time_major"])
def test_triton_decoding_step_equals_eager(layout):
    check_decoding_step(TRITON, DEVICE, layout, beam=3)


# ReLA-i's ungated norm: test_triton_norm_equals_reference; sigmoid with its learned bias per head
@pytest.mark.parametrize("setting", ["rela_g", "relu2", "relu_len", "sigmoid"])
def test_models_with_triton_kernels_equal_eager(setting, monkeypatch):
    """test_kernels' whole-model check through the Triton kernels (on CPU tensors in the interpreter, in place of the
    C++ ones)."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    check_models_fused_equal_eager(setting, kernels._TritonKernels, TRITON, monkeypatch, DEVICE)


def test_triton_launch_limits_send_larger_calls_to_the_eager_path():
    """CUDA caps grid axis 1 (batch × heads) at 65,535, and a head wider than 128 would outgrow the tiles."""
    triton_kernels = TritonKernels()
    assert kernels.attention_supported(triton_kernels, 65535, 128)
    assert not kernels.attention_supported(triton_kernels, 65536, 64)
    assert not kernels.attention_supported(triton_kernels, 8, 256)


@pytest.mark.parametrize("masks", ["padding", "both"])
def test_triton_sigmoid_bias_per_head_gets_the_eager_gradient(masks):
    """--sigmoid-bias learned: the bias added per head inside the kernel, its gradient summed over every query and key
    of the head (per query program, then by torch) as the eager path's."""
    heads, head_dim = 3, 8
    leaves, padding, attn_mask = _inputs(masks)
    bias = torch.tensor([-1.0, 0.5, 2.0], device=DEVICE, requires_grad=True)
    q, k, v = leaves
    fused = kernels.fused_attention(TRITON, q, k, v, heads=heads, scale=head_dim ** -0.5, padding=padding,
                                    attn_mask=attn_mask, activation="sigmoid", bias=bias)
    eager = eager_core(q, k, v, head_dim ** -0.5, padding, attn_mask, "sigmoid", None, bias)
    torch.testing.assert_close(fused, eager, **TOL)
    upstream = torch.randn_like(eager)
    for f, e in zip(torch.autograd.grad(fused, leaves + [bias], upstream),
                    torch.autograd.grad(eager, leaves + [bias], upstream)):
        torch.testing.assert_close(f, e, **TOL)


@pytest.mark.parametrize("activation", ["relu_len", "sigmoid"])
def test_triton_decoding_step_counts_the_unmasked_keys(activation):
    check_decoding_step(TRITON, DEVICE, "time_major", 3, activation)


def test_triton_decoding_step_adds_sigmoids_bias_per_head():
    check_decoding_step(TRITON, DEVICE, "time_major", 3, "sigmoid", bias=torch.tensor([-1.0, 0.0, 0.5, 2.0]))


def test_triton_kernels_name_what_they_compute():
    """Every element-wise function is computed by the kernels (``kernels.activation_supported``); a code outside
    ``kernels.ACTIVATIONS`` or a bias on another function than sigmoid is refused by name."""
    assert all(kernels.activation_supported(TRITON, name) for name in kernels.ACTIVATIONS)
    q = time_major(2, 5, 8, seed=1).to(DEVICE)
    with pytest.raises(ValueError, match="the Triton kernels compute relu, relu2, relu_len, sigmoid"):
        TRITON.attention_forward(q, q, q, None, None, 1, 0.3, 4, None, 0.0, 0)
    with pytest.raises(ValueError, match="a learned bias belongs to sigmoid, not to relu_len"):
        TRITON.attention_forward(q, q, q, None, None, 1, 0.3, 2, torch.zeros(1), 0.0, 0)
