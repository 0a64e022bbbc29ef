"""The checks of the fused kernels against the eager path that the C++ kernels' tests (tests/unit/test_kernels.py)
and the Triton kernels' tests (tests/unit/test_kernels_triton.py) share: a backend is given its loaded module."""

import torch
import torch.nn.functional as F
from fairseq.sequence_generator import SequenceGenerator
from helpers import FakeTask, build_model, left_padded_batch

from rela_fairseq import kernels
from rela_fairseq.attention_functions import ReluLength, Sigmoid, unmasked_keys
from rela_fairseq.rela import rectify

TASK = FakeTask(vocab_size=23)
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32, as the issue asks


def assert_close(actual, expected, rtol=1e-5, **kw):
    """fp32 agreement to ``rtol`` of the tensor's own scale: fused and eager sum the same products in another order,
    and squared-ReLU outputs or weight gradients are far larger than 1."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, **kw)


# every ReLA ablation switch the kernels support (the attention core runs for all; RMSNorm is fused, layer/none eager)
RELA_SETTINGS = {
    "rela_g": {},
    "rela_i": {"rela_variant": "init"},
    "relu2": {"rela_activation": "relu2"},
    "head_norm": {"rela_norm_scope": "head"},
    "layer_norm": {"rela_norm": "layer"},
    "no_norm": {"rela_norm": "none"},
    # the controls the kernels compute too: no norm, no gate
    "relu_len": {"attn_fn": "relu_len"},
    "sigmoid": {"attn_fn": "sigmoid", "sigmoid_bias": "learned"},
}
NO_NORM = ("no_norm", "relu_len", "sigmoid")


ACTIVATIONS = ("relu", "relu2", "relu_len", "sigmoid")  # every element-wise function the kernels compute


def eager_weights(scores, activation, heads, bias=None):
    """The attention functions' own eager mappings (``rela_fairseq.attention_functions``) on [B·H, T, S] scores whose
    masked keys hold -inf; ``bias`` [H]: sigmoid's learned bias."""
    if activation in ("relu", "relu2"):
        return rectify(scores, activation)  # -inf -> 0
    by_head = scores.view(-1, heads, *scores.shape[1:])
    if bias is not None:  # Sigmoid's forward with its learned bias, the bias a tensor of the caller's graph
        return torch.sigmoid(by_head - torch.log(unmasked_keys(by_head)) + bias.view(1, -1, 1, 1)).view(scores.shape)
    fn = ReluLength() if activation == "relu_len" else Sigmoid(heads, "length")
    return fn(by_head).view(scores.shape)


def eager_core(q, k, v, scale, padding, attn_mask, activation, keep, bias=None):
    """Steps 2-6 with PyTorch operators on [B·H, len, d_h] tensors; ``keep`` the dropout multipliers (or None)."""
    scores = torch.bmm(q * scale, k.transpose(1, 2))
    if attn_mask is not None:
        scores = scores + attn_mask
    if padding is not None:
        bsz, src_len = padding.shape
        scores = scores.view(bsz, -1, *scores.shape[1:]).masked_fill(padding.view(bsz, 1, 1, src_len), float("-inf"))
        scores = scores.view(-1, *scores.shape[2:])
    weights = eager_weights(scores, activation, bias.numel() if bias is not None else 1, bias)
    if keep is not None:
        weights = weights * keep
    return torch.bmm(weights, v)


def time_major(*shape, seed):
    """A [B·H, len, d_h] view of a [len, B·H, d_h] tensor, as fairseq's projections give them to the kernel."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape[1], shape[0], shape[2], generator=gen).requires_grad_().transpose(0, 1)


def check_models_fused_equal_eager(setting, backend, module, monkeypatch, device=torch.device("cpu")):
    """Whole tiny models: the training loss and every gradient, then beam search (incremental decoding: the fused
    step kernel, beam-reduced cross-attention) give the same hypotheses and scores; ``backend`` (with its loaded
    ``module``) serves ``device``'s tensors."""
    spy = KernelSpy(module)
    monkeypatch.setattr(backend, "module", spy)
    monkeypatch.setitem(kernels.BACKENDS, device.type, backend)
    options = dict(RELA_SETTINGS[setting], encoder_layers=2, decoder_layers=2)
    models = {kernel: build_model(task=TASK, seed=3, rela_kernel=kernel, **options).to(device)
              for kernel in ("fused", "eager")}
    models["eager"].load_state_dict(models["fused"].state_dict())
    src, lengths = (x.to(device) for x in left_padded_batch(TASK.src_dict, [9, 6, 2, 4]))
    prev = left_padded_batch(TASK.tgt_dict, [7, 5, 7, 3], seed=2)[0].to(device)
    losses, grads = {}, {}
    for kernel, model in models.items():
        model.train()
        logits = model(src, lengths, prev)[0]
        losses[kernel] = F.cross_entropy(logits.flatten(0, 1), prev.flatten())
        grads[kernel] = torch.autograd.grad(losses[kernel], list(model.parameters()))
        model.eval()
    torch.testing.assert_close(losses["fused"], losses["eager"], **TOL)
    for f, e in zip(grads["fused"], grads["eager"]):
        assert_close(f, e, rtol=1e-4)  # summed over two layers and every token
    hypos = {}
    for kernel, model in models.items():
        generator = SequenceGenerator([model], TASK.tgt_dict, beam_size=3, max_len_b=8)
        with torch.no_grad():
            hypos[kernel] = generator.forward({"net_input": {"src_tokens": src, "src_lengths": lengths}})
    # every kernel ran (the fused model's modules took the fused routes), none for the eager model's
    assert set(spy.calls) == {"attention_forward", "attention_backward", "attention_step", "norm_forward",
                              "norm_backward"} - ({"norm_forward", "norm_backward"} if setting in NO_NORM else set())
    for sentence_f, sentence_e in zip(hypos["fused"], hypos["eager"]):
        for hypo_f, hypo_e in zip(sentence_f, sentence_e):
            assert torch.equal(hypo_f["tokens"], hypo_e["tokens"])
            torch.testing.assert_close(hypo_f["positional_scores"], hypo_e["positional_scores"], **TOL)
            torch.testing.assert_close(hypo_f["attention"], hypo_e["attention"], **TOL)



def check_decoding_step(module, device, layout, beam, activation="relu", bias=None):
    """``attention_step`` against the function and A·V: the scores become the weights in place (those fairseq
    returns), the values shared by the ``beam`` hypotheses of a sentence and read in place in their ``layout``
    (fairseq's cached encoder values are a time-major view); the first sentence's last 3 keys masked (-inf), which
    ReLU/n and sigmoid do not count in n."""
    sentences, heads, tgt_len, src_len, head_dim = 2, 4, 2, 21, 8
    gen = torch.Generator().manual_seed(beam)
    scores = torch.randn(sentences * beam * heads, tgt_len, src_len, generator=gen).to(device)
    scores[: beam * heads, :, -3:] = float("-inf")
    values = torch.randn(src_len, sentences * heads, head_dim, generator=gen).to(device)
    values = values.transpose(0, 1) if layout == "time_major" else values.transpose(0, 1).contiguous()
    with torch.no_grad():
        weights = eager_weights(scores, activation, heads if bias is not None else 1, bias)
    expected = torch.einsum("bxhts,bhsd->bxhtd", weights.view(sentences, beam, heads, tgt_len, src_len),
                            values.reshape(sentences, heads, src_len, head_dim))
    out = kernels.attention_step(module, scores, values, heads, activation, bias)
    assert out.shape == (tgt_len, sentences * beam * heads, head_dim)  # time-major, as fairseq's head outputs
    torch.testing.assert_close(out, expected.reshape(-1, tgt_len, head_dim).transpose(0, 1), **TOL)
    torch.testing.assert_close(scores, weights, rtol=0 if activation in ("relu", "relu2") else 1e-6, atol=1e-7)


class KernelSpy:
    """The compiled module, counting which of its kernels are called."""

    def __init__(self, module):
        self.module, self.calls = module, {}

    def __getattr__(self, name):
        attribute = getattr(self.module, name)
        if callable(attribute):  # a kernel; a backend's launch limits (or their absence) are looked up, not called
            self.calls[name] = self.calls.get(name, 0) + 1
        return attribute
