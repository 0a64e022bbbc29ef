"""The fused ReLA kernels for GPUs, in Triton, with the contract of ``rela_cpu.cpp`` (same functions, arguments and
results), so that ``kernels`` hands either to the model.

* Attention core: one program per (block of queries, batch × head) forward; backward one per (block of keys, batch ×
  head) for dK and dV and one per (block of queries, batch × head) for dQ. Scores are recomputed tile by tile and never
  stored. ReLA needs no running maximum, no row sum and no rescaling of the accumulator (FlashAttention's online
  softmax): a tile's weights are final as soon as they are computed, and the backward pass needs no row statistics.
* The element-wise function is a compile-time parameter, ``KIND`` (the code of ``kernels.ACTIVATIONS``: ReLU, squared
  ReLU, ReLU / n, sigmoid(x - log n + b)); n, a query row's unmasked keys, comes in as a [B, T] count, b as sigmoid's
  bias per head, whose gradient the dQ programs sum per program for torch to add up.
* Dropout: Philox (``tl.rand``) keyed by seed + batch·head, counter = query · S + key, regenerated in the backward
  pass. Its decisions differ from the CPU kernel's (another generator); ``dropout_mask`` returns them for the tests.
* fp32 inputs multiply in IEEE fp32 (no TF32: results equal the eager path's to 1e-5); fp16 and bf16 multiply in
  their own precision with fp32 accumulation.
* Gated RMSNorm over the full width (``--rela-norm-scope all``); a per-head norm runs eagerly on a GPU.

Without a GPU the tests run these kernels in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

SEED_RANGE = 2**31 - 2**24  # Philox keys: seed + batch·head stays below 2^31
_Method = TypeVar("_Method", bound=Callable[..., Any])

# The @triton.jit kernels below carry no type hints on purpose: Triton reads a kernel parameter's annotation to
# specialise it (tl.constexpr; "int", "float", "*fp32"... fix its type) and hashes the annotations into its cache key.


@triton.jit
def _row_shape(COUNT, BIAS, offs_m, b, bh, T, heads, KIND: tl.constexpr, HAS_BIAS: tl.constexpr):
    """What a query row's activation needs besides x (``rela_cpu.cpp``'s RowShape): 1 / n for ReLU / n, b - log n for
    sigmoid, n = the row's unmasked keys (>= 1, counted by ``_unmasked_keys``), b the head's learned bias or 0."""
    if KIND >= 2:
        n = tl.maximum(tl.load(COUNT + b * T + offs_m, mask=offs_m < T, other=1.0), 1.0)
    else:
        n = tl.full(offs_m.shape, 1.0, tl.float32)
    shift = -tl.log(n)
    if HAS_BIAS:
        shift += tl.load(BIAS + bh % heads)
    return 1.0 / n, shift


@triton.jit
def _activation(x, inv_n, shift, KIND: tl.constexpr):
    """The element-wise function of ``kernels.ACTIVATIONS``' code KIND on scores x whose masked keys hold -inf (0
    there, for sigmoid too, not its limit); inv_n and shift as ``_row_shape`` gives them, broadcast to x."""
    if KIND == 3:  # sigmoid(x - log n + b)
        w = tl.where(x != float("-inf"), tl.sigmoid(x + shift), 0.0)
    else:
        w = tl.maximum(x, 0.0)  # -inf (masked) -> 0
        if KIND == 1:
            w = w * w
        if KIND == 2:
            w = w * inv_n
    return w


@triton.jit
def _activated(q, k, offs_m, offs_n, bh, b, T, S, scale, add_ptr, pad_ptr, p, seed, inv_n, shift,
               HAS_ADD: tl.constexpr, HAS_PAD: tl.constexpr, KIND: tl.constexpr, DROPOUT: tl.constexpr,
               PRECISION: tl.constexpr):
    """Steps 2-5 on one tile: x = scale · q kᵀ + masks (-inf for padded and out-of-range keys), the weights
    w = act(x) (KIND: the code of ``kernels.ACTIVATIONS``; 0 where masked), the dropout multiplier m (0 or
    1 / (1 - p)) and A~ = m · w."""
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    valid_m = offs_m < T
    valid_n = offs_n < S
    if HAS_ADD:
        x += tl.load(add_ptr + offs_m[:, None] * S + offs_n[None, :], mask=valid_m[:, None] & valid_n[None, :],
                     other=0.0)
    if HAS_PAD:
        pad = tl.load(pad_ptr + b * S + offs_n, mask=valid_n, other=1)
        x = tl.where(pad[None, :] != 0, float("-inf"), x)
    x = tl.where(valid_n[None, :], x, float("-inf"))
    w = _activation(x, inv_n[:, None], shift[:, None], KIND)
    if DROPOUT:
        r = tl.rand(seed + bh, offs_m[:, None] * S + offs_n[None, :])
        m = tl.where(r < p, 0.0, 1.0 / (1.0 - p))
    else:
        m = tl.full(x.shape, 1.0, tl.float32)
    return x, w, m, w * m


@triton.jit
def _attention_forward(Q, K, V, OUT, ADD, PAD, COUNT, BIAS, sq_b, sq_t, sk_b, sk_s, sv_b, sv_s, so_b, so_t, T, S, D,
                       heads, scale, p, seed, HAS_ADD: tl.constexpr, HAS_PAD: tl.constexpr, KIND: tl.constexpr,
                       HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    inv_n, shift = _row_shape(COUNT, BIAS, offs_m, b, bh, T, heads, KIND, HAS_BIAS)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q = tl.load(Q + bh * sq_b + offs_m[:, None] * sq_t + offs_d[None, :], mask=q_mask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        k = tl.load(K + bh * sk_b + offs_n[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + bh * sv_b + offs_n[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
        x, w, m, a = _activated(q, k, offs_m, offs_n, bh, b, T, S, scale, ADD, PAD, p, seed, inv_n, shift, HAS_ADD,
                                HAS_PAD, KIND, DROPOUT, PRECISION)
        acc += tl.dot(a.to(v.dtype), v, input_precision=PRECISION)
    tl.store(OUT + bh * so_b + offs_m[:, None] * so_t + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=q_mask)


@triton.jit
def _grad_activation(x, w, m, da, inv_n, KIND: tl.constexpr):
    """dL/dx from dL/dA~ (w = act(x) before dropout): 0 where masked. For sigmoid it is also dL/d(bias)'s share."""
    d = da * m
    if KIND == 3:
        return d * w * (1.0 - w)  # w = 0 where masked
    if KIND == 1:
        d = d * 2.0 * tl.maximum(x, 0.0)  # never 0 · -inf
    if KIND == 2:
        d = d * inv_n[:, None]
    return tl.where(x > 0.0, d, 0.0)


@triton.jit
def _attention_backward_kv(Q, K, V, DO, DK, DV, ADD, PAD, COUNT, BIAS, sq_b, sq_t, sk_b, sk_s, sv_b, sv_s, sdo_b,
                           sdo_t, sdk_b, sdk_s, sdv_b, sdv_s, T, S, D, heads, scale, p, seed, HAS_ADD: tl.constexpr,
                           HAS_PAD: tl.constexpr, KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
                           DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // heads
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
    k = tl.load(K + bh * sk_b + offs_n[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + bh * sv_b + offs_n[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, T, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
        q = tl.load(Q + bh * sq_b + offs_m[:, None] * sq_t + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + bh * sdo_b + offs_m[:, None] * sdo_t + offs_d[None, :], mask=q_mask, other=0.0)
        inv_n, shift = _row_shape(COUNT, BIAS, offs_m, b, bh, T, heads, KIND, HAS_BIAS)
        x, w, m, a = _activated(q, k, offs_m, offs_n, bh, b, T, S, scale, ADD, PAD, p, seed, inv_n, shift, HAS_ADD,
                                HAS_PAD, KIND, DROPOUT, PRECISION)
        a = tl.where((offs_m < T)[:, None], a, 0.0)
        dv += tl.dot(tl.trans(a.to(do.dtype)), do, input_precision=PRECISION)  # dV = A~ᵀ dO
        da = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dA~ = dO Vᵀ
        ds = _grad_activation(x, w, m, da, inv_n, KIND) * scale
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)  # dK = scale · dSᵀ Q
    tl.store(DK + bh * sdk_b + offs_n[:, None] * sdk_s + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + bh * sdv_b + offs_n[:, None] * sdv_s + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_backward_q(Q, K, V, DO, DQ, ADD, PAD, COUNT, BIAS, DBIAS, sq_b, sq_t, sk_b, sk_s, sv_b, sv_s, sdo_b,
                          sdo_t, sdq_b, sdq_t, T, S, D, heads, scale, p, seed, HAS_ADD: tl.constexpr,
                          HAS_PAD: tl.constexpr, KIND: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """dQ; with a learned bias also dL/d(bias) summed over this program's rows into DBIAS[bh, program] (then over
    programs and batch by torch)."""
    bh = tl.program_id(1)
    b = bh // heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    inv_n, shift = _row_shape(COUNT, BIAS, offs_m, b, bh, T, heads, KIND, HAS_BIAS)
    dbias = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q = tl.load(Q + bh * sq_b + offs_m[:, None] * sq_t + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + bh * sdo_b + offs_m[:, None] * sdo_t + offs_d[None, :], mask=q_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        k = tl.load(K + bh * sk_b + offs_n[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + bh * sv_b + offs_n[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
        x, w, m, a = _activated(q, k, offs_m, offs_n, bh, b, T, S, scale, ADD, PAD, p, seed, inv_n, shift, HAS_ADD,
                                HAS_PAD, KIND, DROPOUT, PRECISION)
        da = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dx = _grad_activation(x, w, m, da, inv_n, KIND)
        if HAS_BIAS:
            dbias += tl.sum(dx, axis=1)  # rows past T: dO is 0 there
        dq += tl.dot((dx * scale).to(k.dtype), k, input_precision=PRECISION)  # dQ = scale · dS K
    tl.store(DQ + bh * sdq_b + offs_m[:, None] * sdq_t + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)
    if HAS_BIAS:
        tl.store(DBIAS + bh * tl.num_programs(0) + tl.program_id(0), tl.sum(dbias, axis=0))


@triton.jit
def _dropout_mask(OUT, T, S, p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        r = tl.rand(seed + bh, offs_m[:, None] * S + offs_n[None, :])
        m = tl.where(r < p, 0.0, 1.0 / (1.0 - p))
        tl.store(OUT + (bh * T + offs_m[:, None]) * S + offs_n[None, :], m,
                 mask=(offs_m[:, None] < T) & (offs_n[None, :] < S))


@triton.jit
def _attention_step(SC, V, OUT, BIAS, T, S, D, BH, heads, beam, v_block, v_row, KIND: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One decoding step's row: A = act(scores) written back in place, O = A V over the (beam-shared) values; masked
    keys hold -inf (ReLU / n and sigmoid count the others)."""
    row = tl.program_id(0)  # bh * T + t
    bh = row // T
    t = row % T
    kbh = (bh // heads // beam) * heads + bh % heads
    offs_d = tl.arange(0, BLOCK_D)
    inv_n = 1.0
    shift = 0.0
    if KIND >= 2:
        live = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, S, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            s = tl.load(SC + row * S + offs_n, mask=offs_n < S, other=float("-inf"))
            live += tl.where(s != float("-inf"), 1.0, 0.0)
        n = tl.maximum(tl.sum(live, axis=0), 1.0)
        inv_n = 1.0 / n
        shift = -tl.log(n)
        if HAS_BIAS:
            shift += tl.load(BIAS + bh % heads)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s = tl.load(SC + row * S + offs_n, mask=offs_n < S, other=float("-inf"))
        a = _activation(s, inv_n, shift, KIND)
        tl.store(SC + row * S + offs_n, a, mask=offs_n < S)
        v = tl.load(V + kbh * v_block + offs_n[:, None] * v_row + offs_d[None, :],
                    mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
        acc += tl.sum(a[:, None] * v.to(tl.float32), axis=0)
    tl.store(OUT + (t * BH + bh) * D + offs_d, acc.to(OUT.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _norm_forward(Z, G, W, Y, R, d, eps, GATED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    valid = offs < d
    z = tl.load(Z + row * d + offs, mask=valid, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(z * z, axis=0) / d + eps)
    y = z * rstd * tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
    if GATED:
        y = y * tl.sigmoid(tl.load(W + offs, mask=valid, other=0.0).to(tl.float32) * z)
    tl.store(Y + row * d + offs, y.to(Y.dtype.element_ty), mask=valid)
    tl.store(R + row, rstd)


@triton.jit
def _norm_backward(DY, Z, G, W, R, DZ, PART, rows, d, GATED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS rows per program; the gain's and gate's gradients summed over them into PART[program] (then over
    programs by torch)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    valid = offs < d
    g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
    if GATED:
        w = tl.load(W + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        w = g
    dg = tl.zeros([BLOCK], dtype=tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, ROWS):
        row = pid * ROWS + i
        ok = valid & ((offs * 0 + row) < rows)  # as a vector: Triton's interpreter rejects a scalar mask here
        z = tl.load(Z + row * d + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * d + offs, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(R + tl.minimum(row, rows - 1))  # rows past the end load and store nothing else
        n = z * rstd
        if GATED:
            s = tl.sigmoid(w * z)
        else:
            s = tl.full([BLOCK], 1.0, tl.float32)
        dn = dy * s * g
        dg += dy * s * n
        dz = rstd * (dn - n * (tl.sum(dn * n, axis=0) / d))
        if GATED:
            d_pre = dy * n * g * s * (1.0 - s)
            dw += d_pre * z
            dz += d_pre * w
        tl.store(DZ + row * d + offs, dz.to(DZ.dtype.element_ty), mask=ok)
    tl.store(PART + pid * 2 * d + offs, dg, mask=valid)
    tl.store(PART + pid * 2 * d + d + offs, dw, mask=valid)


def _blocks(head_dim: int, device: torch.device) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(head_dim))
    tile = 64 if device.type == "cuda" else 16  # the interpreter (CPU tests) runs small tiles faster
    return tile, tile, block_d


def _time_major_like(x: Tensor) -> Tensor:
    return torch.empty(x.size(1), x.size(0), x.size(2), dtype=x.dtype, device=x.device).transpose(0, 1)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    for t in (q, k, v):
        if t.dim() != 3 or t.stride(2) != 1:
            raise ValueError(f"rela fused attention: [batch*heads, length, head_dim] tensors with a contiguous last "
                             f"dimension, got {tuple(t.shape)} with strides {t.stride()}")
    if q.size(0) != k.size(0) or k.shape != v.shape or q.size(2) != k.size(2):
        raise ValueError(f"rela fused attention: q {tuple(q.shape)} does not fit k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}")


def _on_its_device(method: _Method) -> _Method:
    """Launch on the device of the method's first tensor: Triton launches on the current CUDA device, which need not
    be the tensors' (a model on cuda:1 in a process whose current device is 0)."""

    @functools.wraps(method)
    def on_device(self: Any, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if not x.is_cuda:
            return method(self, x, *args, **kwargs)
        with torch.cuda.device(x.device):
            return method(self, x, *args, **kwargs)

    return on_device  # type: ignore[return-value]  # functools.wraps keeps the method's signature


class TritonKernels:
    """``rela_cpu.cpp``'s functions for GPU tensors (and, in Triton's interpreter, CPU tensors)."""

    norm_scopes = ("all",)
    # the element-wise functions these kernels compute (``kernels.activation_supported``): every one of
    # ``kernels.ACTIVATIONS``, whose codes (0 relu, 1 relu2, 2 relu_len, 3 sigmoid) the kernels take as KIND
    activations = ("relu", "relu2", "relu_len", "sigmoid")
    # what the attention core's launches take (``kernels.attention_supported``; larger calls run eagerly): CUDA caps
    # grid axis 1, where they put batch × heads, at 65,535; above 128 the tiles of a head would outgrow a GPU's shared
    # memory (by the tile sizes; not yet measured on a GPU)
    max_batch_heads = 65535
    max_head_dim = 128

    @classmethod
    def _checked(cls, kind: int, bias: Optional[Tensor]) -> int:
        """``kind``, a code of ``kernels.ACTIVATIONS``; a bias is sigmoid's (code 3) alone."""
        if kind not in range(len(cls.activations)):
            raise ValueError(f"the Triton kernels compute {', '.join(cls.activations)} (codes 0-"
                             f"{len(cls.activations) - 1}); got activation code {kind}")
        if bias is not None and cls.activations[kind] != "sigmoid":
            raise ValueError(f"a learned bias belongs to sigmoid, not to {cls.activations[kind]}")
        return kind

    @staticmethod
    def _flags(q: Tensor, padding: Optional[Tensor], additive: Optional[Tensor], kind: int, bias: Optional[Tensor],
               p: float) -> dict:
        return dict(HAS_ADD=additive is not None, HAS_PAD=padding is not None, KIND=kind, HAS_BIAS=bias is not None,
                    DROPOUT=p > 0, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")

    @staticmethod
    def _masks(q: Tensor, padding: Optional[Tensor], additive: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        dummy = q.new_empty(1)
        pad = padding.to(torch.int8).contiguous() if padding is not None else dummy
        add = additive.to(device=q.device, dtype=torch.float32).contiguous() if additive is not None else dummy
        return add, pad

    @staticmethod
    def _row_inputs(q: Tensor, padding: Optional[Tensor], additive: Optional[Tensor], heads: int, kind: int,
                    src_len: int, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """COUNT [B, T], each query row's unmasked keys (relu_len and sigmoid need n; the others get a dummy), and
        BIAS [H] (float32) or a dummy. The count is one small product, (keys not padded) · (keys the mask allows)ᵀ:
        no [B, T, S] tensor."""
        dummy = q.new_empty(1, dtype=torch.float32)
        bias_in = bias.detach().to(device=q.device, dtype=torch.float32).contiguous() if bias is not None else dummy
        if kind < 2:
            return dummy, bias_in
        bsz, tgt_len = q.size(0) // heads, q.size(1)
        keys = (~padding).float() if padding is not None else q.new_ones(1, src_len, dtype=torch.float32)
        allowed = ((additive != float("-inf")).float() if additive is not None
                   else q.new_ones(tgt_len, src_len, dtype=torch.float32))
        count = (keys @ allowed.t()).expand(bsz, tgt_len).contiguous()
        return count, bias_in

    @_on_its_device
    def attention_forward(self, q: Tensor, k: Tensor, v: Tensor, padding: Optional[Tensor],
                          additive: Optional[Tensor], heads: int, scale: float, kind: int, bias: Optional[Tensor],
                          p: float, seed: int) -> Tensor:
        kind = self._checked(kind, bias)
        _check(q, k, v)
        bh, tgt_len, head_dim = q.shape
        block_m, block_n, block_d = _blocks(head_dim, q.device)
        out = _time_major_like(q)
        add, pad = self._masks(q, padding, additive)
        count, bias_in = self._row_inputs(q, padding, additive, heads, kind, k.size(1), bias)
        _attention_forward[(triton.cdiv(tgt_len, block_m), bh)](
            q, k, v, out, add, pad, count, bias_in, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), out.stride(0), out.stride(1), tgt_len, k.size(1), head_dim, heads, scale, p,
            seed % SEED_RANGE, **self._flags(q, padding, additive, kind, bias, p), BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=block_d)
        return out

    @_on_its_device
    def attention_backward(self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, padding: Optional[Tensor],
                           additive: Optional[Tensor], heads: int, scale: float, kind: int, bias: Optional[Tensor],
                           p: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        kind = self._checked(kind, bias)
        _check(q, k, v)
        if grad_out.stride(2) != 1:
            grad_out = grad_out.contiguous()
        bh, tgt_len, head_dim = q.shape
        src_len = k.size(1)
        block_m, block_n, block_d = _blocks(head_dim, q.device)
        dq, dk, dv = _time_major_like(q), _time_major_like(k), _time_major_like(v)
        add, pad = self._masks(q, padding, additive)
        count, bias_in = self._row_inputs(q, padding, additive, heads, kind, src_len, bias)
        q_programs = triton.cdiv(tgt_len, block_m)
        # dL/d(bias) per (batch × head, query program), summed below: no atomics, the same sum on every run
        dbias = torch.empty(bh, q_programs, dtype=torch.float32, device=q.device) if bias is not None else None
        flags = dict(self._flags(q, padding, additive, kind, bias, p), BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_D=block_d)
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), grad_out.stride(0),
                   grad_out.stride(1))
        shared = (tgt_len, src_len, head_dim, heads, scale, p, seed % SEED_RANGE)
        _attention_backward_kv[(triton.cdiv(src_len, block_n), bh)](
            q, k, v, grad_out, dk, dv, add, pad, count, bias_in, *strides, dk.stride(0), dk.stride(1), dv.stride(0),
            dv.stride(1), *shared, **flags)
        _attention_backward_q[(q_programs, bh)](
            q, k, v, grad_out, dq, add, pad, count, bias_in, dbias if dbias is not None else bias_in, *strides,
            dq.stride(0), dq.stride(1), *shared, **flags)
        return dq, dk, dv, (dbias.sum(1) if dbias is not None else None)  # [B·H], as the CPU kernel's

    @_on_its_device
    def attention_step(self, scores: Tensor, v: Tensor, heads: int, kind: int, bias: Optional[Tensor]) -> Tensor:
        kind = self._checked(kind, bias)
        if v.stride(2) != 1:  # any other layout is read in place (fairseq's cached encoder values are time-major)
            v = v.contiguous()
        bh, tgt_len, src_len = scores.shape
        kbh, _, head_dim = v.shape
        out = torch.empty(tgt_len, bh, head_dim, dtype=v.dtype, device=v.device)
        block_n = 64 if v.is_cuda else 16
        bias_in = (bias.to(device=v.device, dtype=torch.float32).contiguous() if bias is not None
                   else scores.new_empty(1))
        _attention_step[(bh * tgt_len,)](scores, v, out, bias_in, tgt_len, src_len, head_dim, bh, heads, bh // kbh,
                                         v.stride(0), v.stride(1), KIND=kind, HAS_BIAS=bias is not None,
                                         BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
        return out

    def dropout_mask(self, bh: int, tgt_len: int, src_len: int, p: float, seed: int,
                     device: str | torch.device = "cpu") -> Tensor:
        out = torch.empty(bh, tgt_len, src_len, device=device)
        _dropout_mask[(triton.cdiv(tgt_len, 16), bh)](out, tgt_len, src_len, p, seed % SEED_RANGE, BLOCK_M=16,
                                                       BLOCK_N=16)
        return out

    @_on_its_device
    def norm_forward(self, z: Tensor, gain: Tensor, gate: Optional[Tensor], width: int,
                     eps: float) -> tuple[Tensor, Tensor]:
        z = z.contiguous()
        d = z.size(-1)
        if width != d:
            raise ValueError(f"the Triton RMSNorm normalises the full width ({d}), not rows of {width}")
        rows = z.numel() // d
        y = torch.empty_like(z)
        rstd = torch.empty(rows, dtype=torch.float32, device=z.device)
        _norm_forward[(rows,)](z, gain, gate if gate is not None else gain, y, rstd, d, eps, GATED=gate is not None,
                               BLOCK=triton.next_power_of_2(d))
        return y, rstd

    @_on_its_device
    def norm_backward(self, grad: Tensor, z: Tensor, gain: Tensor, gate: Optional[Tensor], rstd: Tensor,
                      width: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        z, grad = z.contiguous(), grad.contiguous()
        d = z.size(-1)
        rows = z.numel() // d
        per_program = 32
        programs = triton.cdiv(rows, per_program)
        dz = torch.empty_like(z)
        partial = torch.empty(programs, 2, d, dtype=torch.float32, device=z.device)
        _norm_backward[(programs,)](grad, z, gain, gate if gate is not None else gain, rstd, dz, partial, rows, d,
                                    GATED=gate is not None, ROWS=per_program, BLOCK=triton.next_power_of_2(d))
        sums = partial.sum(0)
        return dz, sums[0].to(gain.dtype), (sums[1].to(gate.dtype) if gate is not None else None)
