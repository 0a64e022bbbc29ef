// Fused ReLA kernels for the CPU: the attention core and the gated RMSNorm, forward and backward.
//
// Attention core, for each (batch x head) row block, in one task of at::parallel_for (OpenMP):
//   S = Q K^T                    Q already scaled by 1/sqrt(d_h)            (a small GEMM, MKL)
//   A = act(S + mask)            masked keys -> 0; act = ReLU or squared ReLU
//   A~ = dropout(A)              keep with probability 1 - p, scaled by 1/(1 - p), from a counter-based hash: the
//                                same (seed, position) gives the same decision, so the backward pass regenerates it
//   O = A~ V                     (a small GEMM)
// Only Q, K, V and the seed are kept for the backward pass, which recomputes S and A block by block: the T x S score
// matrix of the whole batch is never stored, in either direction (as fused softmax attention does).
//
// Gated RMSNorm, per row of `width` numbers (the full width d, or d_h per head):
//   y = g * z * rstd [* sigmoid(w * z)],  rstd = 1 / sqrt(mean(z^2) + eps)
// one pass forward (keeping rstd per row), one pass backward.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

// splitmix64: a counter-based hash with good statistics; 24 high bits -> uniform float in [0, 1)
inline float uniform(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z = z ^ (z >> 31);
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

struct Masks {
  const bool* padding = nullptr;   // [kv_batch, S], true = padded key
  const float* additive = nullptr;  // [T, S], added to the scores (fairseq's causal mask: 0 / -inf)
};

// A = act(S + mask) in place, dropped out when p > 0; `pre` (if not null) receives act(S + mask) before dropout
inline void activate_row(float* s, float* pre, int64_t n, const bool* pad_row, const float* add_row, bool squared,
                         double p, uint64_t seed, uint64_t counter0) {
  const float keep_scale = p > 0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f;
  const float threshold = static_cast<float>(p);
  for (int64_t j = 0; j < n; ++j) {
    float x = s[j];
    if (add_row) x += add_row[j];
    if (pad_row && pad_row[j]) x = 0.0f;
    x = x > 0.0f ? x : 0.0f;  // -inf (masked) -> 0
    if (squared) x = x * x;
    if (pre) pre[j] = x;
    if (p > 0) x = uniform(seed, counter0 + j) >= threshold ? x * keep_scale : 0.0f;
    s[j] = x;
  }
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "rela_fused: q, k, v must be [batch*heads, len, dim]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "rela_fused: float32 only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "rela_fused: contiguous inputs only");
  TORCH_CHECK(q.size(0) % k.size(0) == 0, "rela_fused: query blocks must be a multiple of key blocks");
}

Masks masks_of(const c10::optional<Tensor>& padding, const c10::optional<Tensor>& additive) {
  Masks m;
  if (padding.has_value() && padding->defined()) m.padding = padding->data_ptr<bool>();
  if (additive.has_value() && additive->defined()) m.additive = additive->data_ptr<float>();
  return m;
}

}  // namespace

// q [BH, T, D] (scaled), k, v [KBH, S, D]; the query block bh reads key block bh / (BH / KBH) (beam search keeps
// one copy of the encoder's keys per sentence); padding [KB, S] bool; additive [T, S] float. Returns O [BH, T, D].
Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const c10::optional<Tensor>& padding,
                         const c10::optional<Tensor>& additive, int64_t heads, bool squared, double p,
                         int64_t seed) {
  check_inputs(q, k, v);
  const int64_t BH = q.size(0), T = q.size(1), D = q.size(2), KBH = k.size(0), S = k.size(1);
  const int64_t group = BH / KBH;
  Masks m = masks_of(padding, additive);
  Tensor out = at::empty({BH, T, D}, q.options());
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    Tensor scores = at::empty({T, S}, q.options());
    float* s = scores.data_ptr<float>();
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t kbh = bh / group;
      const int64_t kb = kbh / heads;
      at::mm_out(scores, q[bh], k[kbh].t());
      for (int64_t i = 0; i < T; ++i) {
        activate_row(s + i * S, nullptr, S, m.padding ? m.padding + kb * S : nullptr,
                     m.additive ? m.additive + i * S : nullptr, squared, p, static_cast<uint64_t>(seed),
                     static_cast<uint64_t>((bh * T + i) * S));
      }
      Tensor o = out[bh];
      at::mm_out(o, scores, v[kbh]);
    }
  });
  return out;
}

// Gradients of attention_forward (training: one key block per query block) with respect to q, k and v.
std::vector<Tensor> attention_backward(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                       const c10::optional<Tensor>& padding, const c10::optional<Tensor>& additive,
                                       int64_t heads, bool squared, double p, int64_t seed) {
  check_inputs(q, k, v);
  TORCH_CHECK(q.size(0) == k.size(0), "rela_fused: the backward pass takes one key block per query block");
  const int64_t BH = q.size(0), T = q.size(1), S = k.size(1);
  Masks m = masks_of(padding, additive);
  Tensor g = grad_out.contiguous();
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const float keep_scale = p > 0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    Tensor scores = at::empty({T, S}, q.options());    // S, then A~ (dropped out)
    Tensor pre = at::empty({T, S}, q.options());       // A before dropout
    Tensor grad_a = at::empty({T, S}, q.options());    // dL/dA~, then dL/dS
    float* s = scores.data_ptr<float>();
    float* a = pre.data_ptr<float>();
    float* ga = grad_a.data_ptr<float>();
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t kb = bh / heads;
      at::mm_out(scores, q[bh], k[bh].t());
      Tensor raw = scores.clone();  // S + mask, for the activation's derivative
      const float* r = raw.data_ptr<float>();
      for (int64_t i = 0; i < T; ++i) {
        activate_row(s + i * S, a + i * S, S, m.padding ? m.padding + kb * S : nullptr,
                     m.additive ? m.additive + i * S : nullptr, squared, p, static_cast<uint64_t>(seed),
                     static_cast<uint64_t>((bh * T + i) * S));
      }
      Tensor dv_bh = dv[bh];
      at::mm_out(dv_bh, scores.t(), g[bh]);  // dV = A~^T dO
      at::mm_out(grad_a, g[bh], v[bh].t());  // dA~ = dO V^T
      for (int64_t i = 0; i < T; ++i) {
        const bool* pad_row = m.padding ? m.padding + kb * S : nullptr;
        const float* add_row = m.additive ? m.additive + i * S : nullptr;
        for (int64_t j = 0; j < S; ++j) {
          const int64_t at_ij = i * S + j;
          float x = r[at_ij];
          if (add_row) x += add_row[j];
          float grad = ga[at_ij];
          if ((pad_row && pad_row[j]) || !(x > 0.0f)) {
            ga[at_ij] = 0.0f;  // masked or not positive: no gradient
            continue;
          }
          if (p > 0) {
            const bool kept = uniform(static_cast<uint64_t>(seed), static_cast<uint64_t>((bh * T + i) * S + j)) >=
                              static_cast<float>(p);
            grad = kept ? grad * keep_scale : 0.0f;
          }
          ga[at_ij] = squared ? grad * 2.0f * x : grad;
        }
      }
      Tensor dq_bh = dq[bh], dk_bh = dk[bh];
      at::mm_out(dq_bh, grad_a, k[bh]);      // dQ = dS K
      at::mm_out(dk_bh, grad_a.t(), q[bh]);  // dK = dS^T Q
    }
  });
  return {dq, dk, dv};
}

// The dropout decisions of attention_forward, as a [BH, T, S] float tensor of 0 and 1/(1-p) (tests).
Tensor dropout_mask(int64_t BH, int64_t T, int64_t S, double p, int64_t seed) {
  Tensor mask = at::empty({BH, T, S}, at::kFloat);
  float* out = mask.data_ptr<float>();
  const float keep_scale = static_cast<float>(1.0 / (1.0 - p));
  at::parallel_for(0, BH * T * S, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      out[c] = uniform(static_cast<uint64_t>(seed), static_cast<uint64_t>(c)) >= static_cast<float>(p) ? keep_scale
                                                                                                     : 0.0f;
    }
  });
  return mask;
}

// Gated RMSNorm over rows of `width`: y = g * z * rstd [* sigmoid(w * z)]. Returns (y, rstd [rows]).
std::vector<Tensor> norm_forward(const Tensor& z_in, const Tensor& gain, const c10::optional<Tensor>& gate,
                                 int64_t width, double eps) {
  TORCH_CHECK(z_in.scalar_type() == at::kFloat, "rela_fused norm: float32 only");
  Tensor z = z_in.contiguous();
  const int64_t d = z.size(-1), rows = z.numel() / width;
  Tensor y = at::empty_like(z), rstd = at::empty({rows}, z.options());
  const float* zp = z.data_ptr<float>();
  const float* gp = gain.contiguous().data_ptr<float>();
  Tensor gate_c = gate.has_value() && gate->defined() ? gate->contiguous() : Tensor();
  const float* wp = gate_c.defined() ? gate_c.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* zr = zp + r * width;
      float* yr = yp + r * width;
      const int64_t col0 = (r * width) % d;  // where this row starts in the gain and gate vectors
      double sum = 0;
      for (int64_t j = 0; j < width; ++j) sum += static_cast<double>(zr[j]) * zr[j];
      const float inv = static_cast<float>(1.0 / std::sqrt(sum / width + eps));
      rp[r] = inv;
      for (int64_t j = 0; j < width; ++j) {
        float out = zr[j] * inv * gp[col0 + j];
        if (wp) out *= 1.0f / (1.0f + std::exp(-wp[col0 + j] * zr[j]));
        yr[j] = out;
      }
    }
  });
  return {y, rstd};
}

// Gradients of norm_forward with respect to z, the gain and the gate.
std::vector<Tensor> norm_backward(const Tensor& grad_in, const Tensor& z_in, const Tensor& gain,
                                  const c10::optional<Tensor>& gate, const Tensor& rstd, int64_t width) {
  Tensor z = z_in.contiguous(), grad = grad_in.contiguous();
  const int64_t d = z.size(-1), rows = z.numel() / width;
  const float* zp = z.data_ptr<float>();
  const float* gradp = grad.data_ptr<float>();
  const float* gp = gain.contiguous().data_ptr<float>();
  Tensor gate_c = gate.has_value() && gate->defined() ? gate->contiguous() : Tensor();
  const float* wp = gate_c.defined() ? gate_c.data_ptr<float>() : nullptr;
  const float* rp = rstd.data_ptr<float>();
  Tensor dz = at::empty_like(z);
  float* dzp = dz.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  // per-thread partial sums of the gain and gate gradients, added up at the end (no atomics)
  Tensor partial = at::zeros({threads, 2, d}, z.options());
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    float* dg = pp + at::get_thread_num() * 2 * d;
    float* dw = dg + d;
    for (int64_t r = begin; r < end; ++r) {
      const float* zr = zp + r * width;
      const float* gr = gradp + r * width;
      float* dzr = dzp + r * width;
      const int64_t col0 = (r * width) % d;
      const float inv = rp[r];
      double dot = 0;  // sum_j dn_j * n_j
      for (int64_t j = 0; j < width; ++j) {
        const float n = zr[j] * inv;
        const float s = wp ? 1.0f / (1.0f + std::exp(-wp[col0 + j] * zr[j])) : 1.0f;
        const float dn = gr[j] * s * gp[col0 + j];
        dot += static_cast<double>(dn) * n;
        dg[col0 + j] += gr[j] * s * n;
        if (wp) dw[col0 + j] += gr[j] * n * gp[col0 + j] * s * (1.0f - s) * zr[j];
      }
      const float mean_dot = static_cast<float>(dot / width);
      for (int64_t j = 0; j < width; ++j) {
        const float n = zr[j] * inv;
        const float s = wp ? 1.0f / (1.0f + std::exp(-wp[col0 + j] * zr[j])) : 1.0f;
        const float dn = gr[j] * s * gp[col0 + j];
        float out = inv * (dn - n * mean_dot);
        if (wp) out += gr[j] * n * gp[col0 + j] * s * (1.0f - s) * wp[col0 + j];
        dzr[j] = out;
      }
    }
  });
  Tensor sums = partial.sum(0);
  return {dz, sums[0].contiguous(), wp ? sums[1].contiguous() : Tensor()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("attention_forward", &attention_forward, "ReLA attention core, forward");
  module.def("attention_backward", &attention_backward, "ReLA attention core, backward");
  module.def("dropout_mask", &dropout_mask, "the attention dropout decisions of attention_forward");
  module.def("norm_forward", &norm_forward, "gated RMSNorm, forward");
  module.def("norm_backward", &norm_backward, "gated RMSNorm, backward");
}
