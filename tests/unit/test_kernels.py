"""The fused ReLA kernels (``--rela-kernel fused``) against the eager path they replace: outputs and gradients of the
attention core, the norm and whole attention modules for every ReLA setting, incremental decoding and beam search,
dropout statistics, the memory they keep, and the fallback when they cannot be built."""

import logging

import pytest
import torch
from helpers import EMBED, HEADS, make_attention
from kernel_checks import (
    ACTIVATIONS,
    RELA_SETTINGS,
    TOL,
    assert_close,
    check_decoding_step,
    check_models_fused_equal_eager,
    eager_core,
    time_major,
)

from rela_fairseq import kernels
from rela_fairseq.rela import EPS, rela_norm_reference
from rela_tools.errors import RelaConfigError


@pytest.fixture(scope="module")
def ext(request):
    module = kernels._CpuExtension.load()
    assert module is not None, f"the fused kernels did not build: {kernels._CpuExtension.failure}"
    return module


@pytest.fixture(autouse=True, scope="module")
def several_threads():
    """The kernels split their work over torch's threads (at::parallel_for; the norm's backward pass sums per-thread
    partial results): they run with two or more here, whatever share of the cores scripts/test.sh gave the suite (the
    models elsewhere in the suite then run them with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_kernel_override(monkeypatch):
    """These tests choose the kernel themselves; the suite-wide RELA_FAIRSEQ_KERNEL must not override them."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "both"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
# the kernel's plain loops; its at::mm_out products; and those over blocks of queries (rela_cpu.cpp's query_block:
# 600 queries over 600 keys are a block of 436 and one of 164)
@pytest.mark.parametrize("block", ["small", "large", "query_blocks"])
def test_attention_core_equals_eager(ext, activation, masks, dropout, block):
    sizes = {"small": (3, 4, 6, 8), "large": (2, 2, 40, 32), "query_blocks": (1, 2, 600, 8)}
    bsz, heads, tgt_len, head_dim = sizes[block]
    src_len = tgt_len if masks in ("causal", "both") else tgt_len + 3
    q = time_major(bsz * heads, tgt_len, head_dim, seed=1)
    k, v = (time_major(bsz * heads, src_len, head_dim, seed=s) for s in (2, 3))
    padding = attn_mask = None
    if masks in ("padding", "both"):
        padding = torch.zeros(bsz, src_len, dtype=torch.bool)
        padding[0, -3:] = padding[-1, :2] = True  # right and left padding
    if masks in ("causal", "both"):
        attn_mask = torch.full((tgt_len, src_len), float("-inf")).triu(1)
    scale = head_dim ** -0.5
    torch.manual_seed(5)
    fused = kernels.fused_attention(ext, q, k, v, heads=heads, scale=scale, padding=padding, attn_mask=attn_mask,
                                    activation=activation, dropout=dropout)
    keep = None
    if dropout:  # the same seed, drawn the same way: the kernel's own decisions, as a tensor
        torch.manual_seed(5)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        keep = ext.dropout_mask(bsz * heads, tgt_len, src_len, dropout, seed)
    eager = eager_core(q, k, v, scale, padding, attn_mask, activation, keep)
    assert_close(fused, eager)
    upstream = torch.randn_like(eager)
    leaves = [x._base for x in (q, k, v)]
    for f, e in zip(torch.autograd.grad(fused, leaves, upstream), torch.autograd.grad(eager, leaves, upstream)):
        assert_close(f, e)
    assert not torch.isnan(fused).any()


def test_dropout_statistics_and_reproducibility(ext):
    p, bsz, heads, length, head_dim = 0.3, 4, 4, 64, 16
    keep = ext.dropout_mask(bsz * heads, length, length, p, 1234)
    kept = (keep > 0).float().mean().item()
    n = keep.numel()
    assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5, kept  # Bernoulli(1 - p), 4 standard deviations
    assert keep.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    # neighbouring positions are independent: no correlation between a decision and the next one
    flat = (keep > 0).float().flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.02
    q, k, v = (time_major(bsz * heads, length, head_dim, seed=s) for s in (1, 2, 3))
    args = dict(heads=heads, scale=0.25, dropout=p)
    torch.manual_seed(9)
    first = kernels.fused_attention(ext, q, k, v, **args)
    torch.manual_seed(9)
    again = kernels.fused_attention(ext, q, k, v, **args)
    other = kernels.fused_attention(ext, q, k, v, **args)  # the generator moved on: other decisions
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    # in expectation dropout changes nothing: the mean over many seeds approaches the output without dropout
    plain = kernels.fused_attention(ext, q, k, v, heads=heads, scale=0.25)
    mean = torch.stack([kernels.fused_attention(ext, q, k, v, **args) for _ in range(200)]).mean(0)
    assert (mean - plain).abs().mean() < 0.05 * plain.abs().mean()


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("width", [32, 8])
# few rows: one task; many: several tasks of at::parallel_for (about 32K numbers each) on two threads, whose per-thread
# partial sums the backward pass adds up
@pytest.mark.parametrize("rows", [(5, 3), (256, 16)])
def test_fused_norm_equals_reference(ext, gated, width, rows):
    torch.manual_seed(0)
    heads = torch.randn(*rows, 32, requires_grad=True)
    gain = torch.randn(32, requires_grad=True)
    gate = torch.randn(32, requires_grad=True) if gated else None
    fused = kernels.fused_gated_rms_norm(ext, heads, gain, gate, width, EPS)
    ref = rela_norm_reference(heads, gain, None, gate, "rms", width)
    torch.testing.assert_close(fused, ref, **TOL)
    leaves = [heads, gain] + ([gate] if gated else [])
    upstream = torch.randn_like(ref)
    grads_fused = torch.autograd.grad(fused, leaves, upstream)
    grads_ref = torch.autograd.grad(ref, leaves, upstream)
    torch.testing.assert_close(grads_fused[0], grads_ref[0], **TOL)  # per row
    # the gain's and gate's gradients are sums over every row: over thousands of rows, float32 sums in another order
    # differ elementwise by more than 1e-5 (one float32 sum per thread against torch's cascade), so there the fused
    # sums are held to float64 sums within 1e-5 of the gradient's scale (lost or doubled partial sums are far off)
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    ref64 = rela_norm_reference(leaves64[0], leaves64[1], None, leaves64[2] if gated else None, "rms", width)
    grads64 = torch.autograd.grad(ref64, leaves64, upstream.double())
    for f, r, r64 in zip(grads_fused[1:], grads_ref[1:], grads64[1:]):
        if heads.shape[:-1].numel() <= 32:
            torch.testing.assert_close(f, r, **TOL)
        else:
            assert (f.double() - r64).abs().max() <= 1e-5 * r64.abs().max()
    with torch.no_grad():  # the decoding path: the forward kernel alone
        torch.testing.assert_close(kernels.fused_gated_rms_norm(ext, heads, gain, gate, width, EPS), ref, **TOL)
    # large activations: the gate's exp is clamped, not overflowing
    big = heads.detach() * 1e4
    torch.testing.assert_close(kernels.fused_gated_rms_norm(ext, big, gain, gate, width, EPS),
                               rela_norm_reference(big, gain, None, gate, "rms", width), **TOL)


def module_pair(setting, cross=False):
    options = dict(RELA_SETTINGS[setting], kv_dim=EMBED + 8 if cross else None)
    fn = options.pop("attn_fn", "rela")
    fused = make_attention(fn, rela_kernel="fused", **options).train()
    eager = make_attention(fn, rela_kernel="eager", **options).train()
    eager.load_state_dict(fused.state_dict())
    for module in (fused, eager):
        module.dropout_module.p = 0.0  # dropout decisions differ by design; their statistics are tested above
    return fused, eager


def assert_same_outputs_and_gradients(fused, eager, run, rtol=1e-5):
    out_f, out_e = run(fused), run(eager)
    assert_close(out_f, out_e, rtol)
    upstream = torch.randn_like(out_e)
    names = [n for n, _ in fused.named_parameters()]
    grads_f = torch.autograd.grad(out_f, list(fused.parameters()), upstream)
    grads_e = torch.autograd.grad(out_e, list(eager.parameters()), upstream)
    for name, f, e in zip(names, grads_f, grads_e):
        assert_close(f, e, rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("setting", list(RELA_SETTINGS))
def test_self_attention_module_fused_equals_eager(setting):
    fused, eager = module_pair(setting)
    x = torch.randn(7, 3, EMBED)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, -2:] = padding[2, :3] = True
    causal = torch.full((7, 7), float("-inf")).triu(1)
    # a per-head RMSNorm over d_h = 4 numbers divides by the rms of 4 numbers: it amplifies the last bits in which the
    # two paths' sums differ
    rtol = 2e-4 if setting == "head_norm" else 1e-5
    for mask in (None, causal):
        assert_same_outputs_and_gradients(fused, eager, lambda m, mask=mask: m(
            x, x, x, key_padding_mask=padding, attn_mask=mask, need_weights=False)[0], rtol)


@pytest.mark.parametrize("setting", ["rela_g", "rela_i", "relu_len", "sigmoid"])
def test_cross_attention_module_fused_equals_eager(setting):
    fused, eager = module_pair(setting, cross=True)
    x, memory = torch.randn(5, 2, EMBED), torch.randn(8, 2, EMBED + 8)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[0, 5:] = True
    assert_same_outputs_and_gradients(fused, eager, lambda m: m(
        x, memory, memory, key_padding_mask=padding, static_kv=True, need_weights=False)[0])


def test_fused_route_is_taken_and_weights_fall_back_to_eager(monkeypatch):
    fused, eager = module_pair("rela_g")
    calls = []
    original = kernels.fused_attention
    monkeypatch.setattr(kernels, "fused_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    x = torch.randn(4, 2, EMBED)
    out, weights = fused(x, x, x, need_weights=False)
    assert calls and weights is None
    calls.clear()
    out_w, weights = fused(x, x, x, need_head_weights=True)  # weights asked for: the eager route gives them
    assert not calls and weights.shape == (HEADS, 2, 4, 4)
    torch.testing.assert_close(weights, eager(x, x, x, need_head_weights=True)[1], **TOL)
    torch.testing.assert_close(out_w, out, **TOL)


@pytest.mark.parametrize("setting", ["rela_g", "rela_i", "relu2", "relu_len", "sigmoid"])
def test_models_fused_equal_eager_in_training_and_beam_search(setting, ext, monkeypatch):
    check_models_fused_equal_eager(setting, kernels._CpuExtension, ext, monkeypatch)


@pytest.mark.parametrize("layout", ["contiguous", "time_major"])
@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_decoding_step_equals_eager(ext, layout, beam, activation):
    check_decoding_step(ext, "cpu", layout, beam, activation)


def test_decoding_step_adds_sigmoids_bias_per_head(ext):
    check_decoding_step(ext, "cpu", "time_major", 3, "sigmoid", bias=torch.tensor([-1.0, 0.0, 0.5, 2.0]))


@pytest.mark.parametrize("masks", ["padding", "causal"])
@pytest.mark.parametrize("length", [9, 600])  # one block of queries; two (the gradient summed over them)
def test_sigmoid_bias_per_head_gets_the_eager_gradient(ext, masks, length):
    """The learned bias of --sigmoid-bias learned: added per head inside the kernel, its gradient summed over every
    (batch x head) block of that head."""
    bsz, heads, head_dim = 3, 4, 8
    q, k, v = (time_major(bsz * heads, length, head_dim, seed=s) for s in (1, 2, 3))
    padding = attn_mask = None
    if masks == "padding":
        padding = torch.zeros(bsz, length, dtype=torch.bool)
        padding[0, -4:] = True
    else:
        attn_mask = torch.full((length, length), float("-inf")).triu(1)
    bias = torch.tensor([-1.0, 0.0, 0.5, 2.0], requires_grad=True)
    fused = kernels.fused_attention(ext, q, k, v, heads=heads, scale=0.3, padding=padding, attn_mask=attn_mask,
                                    activation="sigmoid", bias=bias)
    eager = eager_core(q, k, v, 0.3, padding, attn_mask, "sigmoid", None, bias)
    assert_close(fused, eager)
    upstream = torch.randn_like(eager)
    leaves = [x._base for x in (q, k, v)] + [bias]
    for f, e in zip(torch.autograd.grad(fused, leaves, upstream), torch.autograd.grad(eager, leaves, upstream)):
        assert_close(f, e)


def test_retained_dropout_in_decoding_takes_the_eager_step(ext):
    """fairseq-generate --retain-dropout keeps attention dropout at inference (Monte-Carlo dropout); the step kernel
    has none, so such a step runs eagerly and draws the same dropout as the eager model."""
    modules = {kernel: make_attention("rela", rela_kernel=kernel) for kernel in ("fused", "eager")}
    x = torch.randn(3, 2, EMBED)
    outputs = {}
    for kernel, module in modules.items():
        module.dropout_module.p = 0.5
        module.dropout_module.make_generation_fast_("test", retain_dropout=True)
        for seed in (0, 1):
            torch.manual_seed(seed)
            state = {}
            with torch.no_grad():
                steps = [module(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=state)[0] for t in range(3)]
            outputs[kernel, seed] = torch.cat(steps)
    assert not torch.equal(outputs["eager", 0], outputs["eager", 1])  # dropout is on
    for seed in (0, 1):
        torch.testing.assert_close(outputs["fused", seed], outputs["eager", seed], **TOL)


def test_autocast_takes_the_eager_route(ext):
    """Under autocast (fairseq's --amp) the input is float32 but the projections that feed the kernels are not."""
    auto, eager = make_attention("rela", rela_kernel="auto"), make_attention("rela", rela_kernel="eager")
    x = torch.randn(4, 2, EMBED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(auto(x, x, x, need_weights=False)[0], eager(x, x, x, need_weights=False)[0])
        states = ({}, {})
        with torch.no_grad():
            for t in range(2):
                step = x[t:t + 1]
                torch.testing.assert_close(auto(step, step, step, incremental_state=states[0])[0],
                                           eager(step, step, step, incremental_state=states[1])[0])


def test_a_value_head_width_other_than_the_querys_is_refused(ext):
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="q, k and v need one head width, got 8, 8, 4"):
        kernels.fused_attention(ext, q, k, v, heads=2, scale=0.5)


class LimitedKernels:
    """The compiled module with launch limits, as the Triton kernels declare them."""

    def __init__(self, module, max_batch_heads):
        self.module, self.max_batch_heads = module, max_batch_heads

    def __getattr__(self, name):
        return getattr(self.module, name)


def test_calls_beyond_the_kernels_launch_limits_run_eagerly(ext, monkeypatch):
    fused, eager = module_pair("rela_g")
    limited = LimitedKernels(ext, max_batch_heads=2 * HEADS)
    monkeypatch.setattr(kernels, "extension_for", lambda x, kernel: None if kernel == "eager" else limited)
    calls = []
    original = kernels.fused_attention
    monkeypatch.setattr(kernels, "fused_attention", lambda *a, **kw: calls.append(a[1].size(0)) or original(*a, **kw))
    for batch in (2, 3):
        x = torch.randn(4, batch, EMBED)
        torch.testing.assert_close(fused(x, x, x, need_weights=False)[0], eager(x, x, x, need_weights=False)[0], **TOL)
    assert calls == [2 * HEADS]  # 3 sentences x 4 heads is beyond the limit: the eager route


def test_fused_core_keeps_no_score_matrix(ext):
    """The backward pass gets q, k and v, not the B·H × T × S scores (peak memory like fused softmax's)."""
    bsz, heads, length, head_dim = 2, 4, 128, 16
    q, k, v = (time_major(bsz * heads, length, head_dim, seed=s) for s in (1, 2, 3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        kernels.fused_attention(ext, q, k, v, heads=heads, scale=0.25, dropout=0.1)
    assert sum(saved) == 3 * bsz * heads * length * head_dim  # an eager core keeps 2 × B·H·T·S more


def test_auto_falls_back_with_one_line_and_fused_refuses(monkeypatch, caplog):
    monkeypatch.setattr(kernels._CpuExtension, "module", None)
    monkeypatch.setattr(kernels._CpuExtension, "failure", None)
    monkeypatch.setenv("CXX", "no-such-compiler-c++")
    auto, eager = make_attention("rela", rela_kernel="auto"), make_attention("rela", rela_kernel="eager")
    x = torch.randn(5, 2, EMBED)
    with caplog.at_level(logging.INFO, logger="rela_fairseq"):
        for _ in range(3):
            torch.testing.assert_close(auto(x, x, x)[0], eager(x, x, x)[0])
    lines = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(lines) == 1 and "no-such-compiler-c++" in lines[0] and "\n" not in lines[0], lines
    fused = make_attention("rela", rela_kernel="fused")
    with pytest.raises(kernels.KernelUnavailable, match="no-such-compiler.*--rela-kernel auto or eager"):
        fused(x, x, x)


def test_environment_overrides_the_option(monkeypatch, ext):
    x = torch.randn(3, 2, EMBED)
    monkeypatch.setenv(kernels.ENV_VAR, "eager")
    assert kernels.extension_for(x, "fused") is None
    monkeypatch.setenv(kernels.ENV_VAR, "fused")
    assert kernels.extension_for(x, "eager") is ext
    assert kernels.extension_for(x.double(), "auto") is None  # tensors the kernels do not take run eagerly
    assert kernels.extension_for(x.half(), "auto") is None
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(RelaConfigError, match="RELA_FAIRSEQ_KERNEL=fast.*auto, fused, eager"):
        kernels.extension_for(x, "auto")
    monkeypatch.delenv(kernels.ENV_VAR)
    with pytest.raises(RelaConfigError, match="--rela-kernel.*auto, fused, eager"):
        make_attention("rela", rela_kernel="fast")


def test_a_build_killed_while_compiling_leaves_no_lock_that_hangs_every_later_process(ext, tmp_path, monkeypatch):
    """torch's build lock is a plain file that a SIGKILL during a build leaves behind, and torch's next load (every
    process takes the lock, even for a cached build) waits for it forever. The plugin holds an fcntl lock around the
    load and removes such a file: a new process loads the cached build (copied to a private extension folder, with
    the lock as a killed build leaves it) within the timeout."""
    import pathlib
    import shutil
    import subprocess
    import sys

    from torch.utils import cpp_extension

    name = kernels.extension_name()
    cached = cpp_extension._get_build_directory(name, verbose=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    build = pathlib.Path(cpp_extension._get_build_directory(name, verbose=False))  # (it makes the folder)
    shutil.copytree(cached, build, ignore=shutil.ignore_patterns("lock", "*.flock"), dirs_exist_ok=True)
    (build / "lock").touch()  # as a killed build leaves it
    proc = subprocess.run([sys.executable, "-c", "from rela_fairseq import kernels; "
                           "assert kernels._CpuExtension.load() is not None, kernels._CpuExtension.failure"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "left by a build of the kernels that was killed" in proc.stderr and not (build / "lock").exists()
