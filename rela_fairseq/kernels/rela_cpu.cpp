// Fused ReLA kernels for the CPU (float32): the attention core and the gated RMSNorm, forward and backward, and the
// attention step of incremental decoding. docs/method.md numbers the steps; this file does steps 2-6 and 7.
//
// Attention core, one (batch x head) block per task of at::parallel_for (OpenMP), in fairseq's time-major layout
// (q [T, B*H, d_h], k and v [S, B*H, d_h] as views [B*H, len, d_h]: no transposed copies in either direction):
//   S = scale * Q K^T            step 2                                       (a small GEMM, MKL or oneDNN)
//   A = act(S + mask)            steps 3-4: masked keys -> 0; act, element-wise: ReLU, squared ReLU (ReLA), ReLU / n
//                                or sigmoid(x - log n + b_h) (the controls relu_len and sigmoid; n the row's unmasked
//                                keys, b_h a bias per head or 0)
//   A~ = dropout(A)              step 5: keep with probability 1 - p, scaled by 1 / (1 - p), decided by a hash of
//                                (seed, position), so that the backward pass regenerates the same decisions
//   O = A~ V                     step 6 (a small GEMM), written straight into the [T, B*H, d_h] output
// Only Q, K, V and the seed are kept for the backward pass, which recomputes S and A block by block: the T x S score
// matrix of the whole batch is never stored, in either direction (as fused softmax attention does).
//
// Gated RMSNorm, step 7, per row of `width` numbers (the full width d, or d_h for a per-head norm):
//   y = g * z * rstd [* sigmoid(w * z)],  rstd = 1 / sqrt(mean(z^2) + eps)
// one pass forward (keeping rstd per row), one pass backward, vectorised by the compiler (exp_approx below).

// ATen and torch's pybind11 casters only: <torch/extension.h> (torch's whole C++ front end) would more than double
// the time of the first-use compile, which every new environment pays
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

// splitmix64, a counter-based hash with good statistics; its 24 high bits -> a uniform float in [0, 1)
inline float uniform(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z = z ^ (z >> 31);
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

// exp(x) for x in [-87, 87] (clamped), relative error below 2e-7: Cephes' expf, branch-free so that the compiler
// vectorises the loops that call it (std::exp is a library call it cannot vectorise without -ffast-math).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

struct Masks {
  const bool* padding = nullptr;    // [kv_batch, S], true = padded key
  const float* additive = nullptr;  // [T, S], added to the scores (fairseq's causal mask: 0 / -inf)
};

// the element-wise functions (kernels/__init__.py's ACTIVATIONS, in this order)
enum Kind : int64_t { kRelu = 0, kRelu2 = 1, kReluLength = 2, kSigmoid = 3 };

struct Activation {
  int64_t kind;
  double p;  // dropout probability, 0 = none
  uint64_t seed;
  const float* bias = nullptr;  // sigmoid's learned bias per head, or none
  int64_t heads = 1;

  float bias_of(int64_t bh) const { return bias ? bias[bh % heads] : 0.0f; }
};

constexpr float kMasked = -std::numeric_limits<float>::infinity();

// What a row's activation needs besides x: 1 / n (ReLU / n) and -log n + b (sigmoid), n = the unmasked keys (>= 1)
struct RowShape {
  float inv_n;
  float shift;
};

inline RowShape row_shape(const float* x, int64_t n, const Activation& act, float bias) {
  if (act.kind != kReluLength && act.kind != kSigmoid) return {1.0f, 0.0f};
  int64_t live = 0;
  for (int64_t j = 0; j < n; ++j) live += x[j] != kMasked;
  const float count = static_cast<float>(std::max<int64_t>(live, 1));
  return {1.0f / count, bias - std::log(count)};
}

// act(x), and its derivative given the weight a = act(x); K a compile-time Kind, so that each row loop is compiled
// (and vectorised) for one function
template <int64_t K>
inline float activation(float x, const RowShape& row) {
  if (K == kSigmoid) return x == kMasked ? 0.0f : sigmoid(x + row.shift);
  const float a = std::max(x, 0.0f);  // -inf (masked) -> 0
  return K == kRelu2 ? a * a : (K == kReluLength ? a * row.inv_n : a);
}

// One expression ending in a select, not an early return, so that the loops calling it can be vectorised (what
// made ReLU's backward pass slow was its loop, not vectorised at all: backward_row)
template <int64_t K>
inline float derivative(float x, float a, const RowShape& row) {
  if (K == kSigmoid) return a * (1.0f - a);  // 0 where masked: a = 0
  const float slope = K == kRelu2 ? 2.0f * x : (K == kReluLength ? row.inv_n : 1.0f);
  return x > 0.0f ? slope : 0.0f;  // a select: never 0 * -inf
}

// f(std::integral_constant<int64_t, K>) for the runtime kind
template <typename F>
inline void with_kind(int64_t kind, F&& f) {
  switch (kind) {
    case kRelu: f(std::integral_constant<int64_t, kRelu>()); break;
    case kRelu2: f(std::integral_constant<int64_t, kRelu2>()); break;
    case kReluLength: f(std::integral_constant<int64_t, kReluLength>()); break;
    default: f(std::integral_constant<int64_t, kSigmoid>()); break;
  }
}

// One row of scores, steps 3-5: x = scale * s + add (-inf where padded), written back to raw (if given, for the
// backward pass); the activated, dropped-out weights to out (which may be s itself). Separate loops: the ones without
// the dropout hash vectorise.
inline void activate_row(const float* s, float* raw, float* out, int64_t n, float scale, const bool* pad_row,
                         const float* add_row, const Activation& act, float bias, uint64_t counter0) {
  float* x = raw ? raw : out;
  // a loop per mask combination, the padding read as bytes: with the tests inside, or bools, the compiler vectorised
  // none of them
  const uint8_t* pad = reinterpret_cast<const uint8_t*>(pad_row);
  if (add_row && pad) {
    for (int64_t j = 0; j < n; ++j) x[j] = pad[j] != 0 ? kMasked : s[j] * scale + add_row[j];
  } else if (add_row) {
    for (int64_t j = 0; j < n; ++j) x[j] = s[j] * scale + add_row[j];
  } else if (pad) {
    for (int64_t j = 0; j < n; ++j) x[j] = pad[j] != 0 ? kMasked : s[j] * scale;
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] = s[j] * scale;
  }
  const RowShape row = row_shape(x, n, act, bias);
  with_kind(act.kind, [&](auto k) {
    for (int64_t j = 0; j < n; ++j) out[j] = activation<decltype(k)::value>(x[j], row);
  });
  if (act.p > 0) {
    const float keep_scale = static_cast<float>(1.0 / (1.0 - act.p));
    const float threshold = static_cast<float>(act.p);
    for (int64_t j = 0; j < n; ++j) out[j] = uniform(act.seed, counter0 + j) < threshold ? 0.0f : out[j] * keep_scale;
  }
}

// One row of the backward pass, in place: dL/dA~ (in g, the scores' pre-activation x beside it, -inf where masked)
// -> scale * dL/dx; returns the row's sum of dL/dx where `want_sum` (sigmoid's bias gradient), else 0. The first loop
// (the derivative, and the scale where no sum needs the unscaled values) vectorises; the dropout hash and the sum (a
// float reduction, which the compiler keeps in order) run only where they apply. A function of its own with restrict
// pointers: written inline in the kernel's lambda, the compiler vectorised none of these loops.
template <int64_t K>
inline float backward_row(float* __restrict g, const float* __restrict x, int64_t n, const RowShape row,
                          const Activation& act, float keep_scale, float scale, uint64_t counter0, bool want_sum) {
  for (int64_t j = 0; j < n; ++j) {
    const float xj = x[j];
    const float gj = g[j] * keep_scale * derivative<K>(xj, activation<K>(xj, row), row);
    g[j] = xj == kMasked ? 0.0f : (want_sum ? gj : gj * scale);
  }
  if (act.p > 0) {
    const float threshold = static_cast<float>(act.p);
    for (int64_t j = 0; j < n; ++j) {
      if (uniform(act.seed, counter0 + j) < threshold) g[j] = 0.0f;
    }
  }
  if (!want_sum) return 0.0f;
  float sum = 0.0f;  // d(weight)/d(bias) = d(weight)/dx for sigmoid
  for (int64_t j = 0; j < n; ++j) sum += g[j];
  for (int64_t j = 0; j < n; ++j) g[j] *= scale;
  return sum;
}

// t, detached, as it is when its last dimension is contiguous (the kernels reach rows through the other strides: a
// time-major view is read in place), else a contiguous copy
Tensor rows_contiguous(const Tensor& t) { return t.stride(-1) == 1 ? t.detach() : t.detach().contiguous(); }

void check_attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "rela fused attention: q, k and v must be [batch*heads, length, head_dim], got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  for (const Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "rela fused attention: float32 CPU tensors only, got ", t->scalar_type(), " on ", t->device());
    TORCH_CHECK(t->stride(2) == 1, "rela fused attention: the head dimension must be contiguous");
  }
  TORCH_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1), "rela fused attention: k and v differ in shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "rela fused attention: q ", q.sizes(), " does not fit k ", k.sizes());
}

Masks masks_of(const c10::optional<Tensor>& padding, const c10::optional<Tensor>& additive, int64_t blocks,
               int64_t heads, int64_t T, int64_t S) {
  Masks m;
  if (padding.has_value() && padding->defined()) {
    TORCH_CHECK(padding->scalar_type() == at::kBool && padding->is_contiguous() &&
                    padding->numel() * heads == blocks * S,
                "rela fused attention: the padding mask must be a contiguous bool [batch, ", S, "] tensor");
    m.padding = padding->data_ptr<bool>();
  }
  if (additive.has_value() && additive->defined()) {
    TORCH_CHECK(additive->scalar_type() == at::kFloat && additive->is_contiguous() && additive->numel() == T * S,
                "rela fused attention: the attention mask must be a contiguous float [", T, ", ", S, "] tensor");
    m.additive = additive->data_ptr<float>();
  }
  return m;
}

// The products of one block. Small blocks (short sentences, narrow heads) use plain loops on the raw rows, whose
// inner loops over the head dimension vectorise: at::mm_out's dispatch and the block's tensor views cost more than
// their arithmetic there. Larger blocks use at::mm_out (MKL/oneDNN).
constexpr int64_t kSmallBlock = 32768;  // T * S * d_h up to which the plain loops run

struct Rows {  // a [n, d] matrix whose rows are `stride` apart (one block of a time-major tensor)
  float* data;
  int64_t stride;
  float* row(int64_t i) const { return data + i * stride; }
};

Rows rows_of(const Tensor& t, int64_t block) { return {t.data_ptr<float>() + block * t.stride(0), t.stride(1)}; }

// C [m, n] (contiguous) = A [m, d] B [n, d]^T
inline void product_abt(const Rows& a, const Rows& b, float* c, int64_t m, int64_t n, int64_t d) {
  for (int64_t i = 0; i < m; ++i) {
    const float* ai = a.row(i);
    for (int64_t j = 0; j < n; ++j) {
      const float* bj = b.row(j);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < d; ++k) sum += ai[k] * bj[k];
      c[i * n + j] = sum;
    }
  }
}

// Y [m, d] = X [m, n] (contiguous) Z [n, d]; with `transpose_x`, Y [n, d] = X^T Z where Z is [m, d]
inline void product_xz(const float* x, int64_t m, int64_t n, const Rows& z, const Rows& y, int64_t d,
                       bool transpose_x) {
  const int64_t out_rows = transpose_x ? n : m;
  for (int64_t r = 0; r < out_rows; ++r) std::fill(y.row(r), y.row(r) + d, 0.0f);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const float w = x[i * n + j];
      if (w == 0.0f) continue;  // ReLA's zeros (and dropped, masked, negative scores) cost nothing
      float* yr = transpose_x ? y.row(j) : y.row(i);
      const float* zr = transpose_x ? z.row(i) : z.row(j);
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) yr[k] += w * zr[k];
    }
  }
}

// at::parallel_for's grain: enough rows per task for about 32K numbers of work, so that a small call (a decoding
// step) runs in the calling thread instead of paying for waking the OpenMP team
inline int64_t grain(int64_t numbers_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, numbers_per_row));
}

// The queries the core handles at a time: the whole block where it is small, else enough rows for about 256K scores
// (1 MB a buffer: a block's scores and weights, then gradients, stay in the cache between the passes over them, and a
// thread never holds T x S of anything), and between 64K and 256K scores no more than a quarter of the block's T x S,
// at least 32 rows so that the matrix products stay efficient. The quarter: at 256-1,024 keys a whole T x S buffer per
// thread holds more than PyTorch's flash attention does (the allocator's accounting, benchmarks/attention_core.py);
// smaller blocks everywhere cost speed at 1,024-2,048 keys (docs/speed.md)
#ifndef RELA_BLOCK_SCORES  // -DRELA_BLOCK_SCORES=N builds another block size (to measure one against another)
#define RELA_BLOCK_SCORES 262144
#endif
constexpr int64_t kBlockScores = RELA_BLOCK_SCORES;
constexpr int64_t kMinBlockScores = 65536;
inline int64_t query_block(int64_t T, int64_t S, int64_t D) {
  if (T * S * D <= kSmallBlock) return T;
  const int64_t scores = std::min(kBlockScores, std::max(kMinBlockScores, T * S / 4));
  return std::min<int64_t>(T, std::max<int64_t>(32, scores / std::max<int64_t>(S, 1)));
}

// Per-thread scratch, allocated by the calling thread before at::parallel_for (as PyTorch's own flash attention does):
// one [buffers, rows, cols] slice per thread that may run a task, so that PyTorch's allocator (and its profiler's
// memory accounting) sees all of it. Nested in another parallel region, at::parallel_for runs inline: one slice.
struct Scratch {
  Tensor slices;
  explicit Scratch(int64_t tasks, int64_t buffers, int64_t rows, int64_t cols, const at::TensorOptions& options)
      : slices(at::empty({at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(
                              tasks, 1)), buffers, rows, cols}, options)) {}
  // buffer `i` of the running thread's slice, as a [rows, cols] tensor (the at::mm_out paths) or its data
  Tensor view(int64_t i) const { return slices[slices.size(0) == 1 ? 0 : at::get_thread_num()][i]; }
  float* buffer(int64_t i) const { return view(i).data_ptr<float>(); }
};

// a [T, B*H, D] tensor, returned as its [B*H, T, D] view (fairseq's layout, and the inputs')
Tensor time_major_like(const Tensor& x) {
  return at::empty({x.size(1), x.size(0), x.size(2)}, x.options()).transpose(0, 1);
}

// the sigmoid bias [heads] as float32 (only sigmoid takes one)
Tensor bias_of(const c10::optional<Tensor>& bias, int64_t kind, int64_t heads) {
  TORCH_CHECK(kind >= kRelu && kind <= kSigmoid, "rela fused attention: unknown activation ", kind);
  if (!bias.has_value() || !bias->defined()) return Tensor();
  TORCH_CHECK(kind == kSigmoid && bias->scalar_type() == at::kFloat && bias->numel() == heads,
              "rela fused attention: a bias is sigmoid's, float32 [", heads, "]");
  return bias->detach().contiguous();
}

}  // namespace

// O = dropout(act(scale * Q K^T + masks)) V. q [BH, T, D], k and v [BH, S, D] (any layout with a contiguous last
// dimension); padding [B, S] bool; additive [T, S] float. Returns O as a [BH, T, D] view of a [T, BH, D] tensor.
Tensor attention_forward(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                         const c10::optional<Tensor>& padding, const c10::optional<Tensor>& additive, int64_t heads,
                         double scale, int64_t kind, const c10::optional<Tensor>& bias, double p, int64_t seed) {
  const Tensor q = q_in.detach(), k = k_in.detach(), v = v_in.detach();
  check_attention_inputs(q, k, v);
  const int64_t BH = q.size(0), T = q.size(1), S = k.size(1), D = q.size(2);
  const Masks m = masks_of(padding, additive, BH, heads, T, S);
  const Tensor b = bias_of(bias, kind, heads);
  const Activation act{kind, p, static_cast<uint64_t>(seed), b.defined() ? b.data_ptr<float>() : nullptr, heads};
  Tensor out = time_major_like(q);
  const int64_t TB = query_block(T, S, D);
  const bool small = T * S * D <= kSmallBlock;  // then one block of all T queries (query_block)
  const Scratch scratch(BH, 1, TB, S, q.options());
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain ATen calls: no autograd bookkeeping per block
    const Tensor scores = scratch.view(0);
    float* s = scratch.buffer(0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const bool* pad_row = m.padding ? m.padding + (bh / heads) * S : nullptr;
      for (int64_t t0 = 0; t0 < T; t0 += TB) {  // a block of queries at a time: its scores stay in the cache
        const int64_t tb = std::min(TB, T - t0);
        if (small) {
          product_abt(rows_of(q, bh), rows_of(k, bh), s, T, S, D);
        } else {
          Tensor scores_b = scores.narrow(0, 0, tb);
          at::mm_out(scores_b, q[bh].narrow(0, t0, tb), k[bh].t());
        }
        for (int64_t i = 0; i < tb; ++i) {
          const int64_t t = t0 + i;
          activate_row(s + i * S, nullptr, s + i * S, S, static_cast<float>(scale), pad_row,
                       m.additive ? m.additive + t * S : nullptr, act, act.bias_of(bh),
                       static_cast<uint64_t>((bh * T + t) * S));
        }
        if (small) {
          product_xz(s, T, S, rows_of(v, bh), rows_of(out, bh), D, false);
        } else {
          Tensor o = out[bh].narrow(0, t0, tb);
          at::mm_out(o, scores.narrow(0, 0, tb), v[bh]);
        }
      }
    }
  });
  return out;
}

// Gradients of attention_forward with respect to q, k and v, each a [BH, len, D] view of a time-major tensor.
// With a sigmoid bias, also the bias's gradient summed per (batch x head) block, [BH] (the caller sums the blocks of
// each head); else an empty tensor.
std::vector<Tensor> attention_backward(const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in,
                                       const Tensor& v_in, const c10::optional<Tensor>& padding,
                                       const c10::optional<Tensor>& additive, int64_t heads, double scale,
                                       int64_t kind, const c10::optional<Tensor>& bias, double p, int64_t seed) {
  const Tensor q = q_in.detach(), k = k_in.detach(), v = v_in.detach();
  const Tensor g = rows_contiguous(grad_out_in);
  check_attention_inputs(q, k, v);
  const int64_t BH = q.size(0), T = q.size(1), S = k.size(1), D = q.size(2);
  const Masks m = masks_of(padding, additive, BH, heads, T, S);
  const Tensor b = bias_of(bias, kind, heads);
  const Activation act{kind, p, static_cast<uint64_t>(seed), b.defined() ? b.data_ptr<float>() : nullptr, heads};
  Tensor dq = time_major_like(q), dk = time_major_like(k), dv = time_major_like(v);
  Tensor dbias = b.defined() ? at::zeros({BH}, q.options()) : Tensor();
  float* dbias_p = b.defined() ? dbias.data_ptr<float>() : nullptr;
  const float keep_scale = p > 0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f;
  const float scale_f = static_cast<float>(scale);
  const int64_t TB = query_block(T, S, D);
  const bool small = T * S * D <= kSmallBlock;  // then one block of all T queries (query_block)
  // two buffers a thread: scale * S + masks, and A~, which dV = A~^T dO is the last to read and dA~ = dO V^T then
  // overwrites (then scale * dL/dS in place)
  const Scratch scratch(BH, 2, TB, S, q.options());
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Tensor raw = scratch.view(0), weights = scratch.view(1), grad = weights;
    float* r = scratch.buffer(0);
    float* a = scratch.buffer(1);
    float* ga = a;
    for (int64_t bh = begin; bh < end; ++bh) {
      const bool* pad_row = m.padding ? m.padding + (bh / heads) * S : nullptr;
      const float bias_bh = act.bias_of(bh);
      double bias_grad = 0.0;  // a sum over T x S terms: float32 alone loses digits at a few hundred thousand
      if (T == 0) {  // no query block: nothing flows back to the keys and values
        dk[bh].zero_();
        dv[bh].zero_();
      }
      // a block of queries at a time; dK and dV add up over the blocks. The small path takes no tensor views: on
      // short sentences they cost more than the block's arithmetic
      for (int64_t t0 = 0; t0 < T; t0 += TB) {
        const int64_t tb = std::min(TB, T - t0);
        Tensor grad_b, q_b, g_b;
        if (small) {
          product_abt(rows_of(q, bh), rows_of(k, bh), r, T, S, D);
        } else {
          grad_b = grad.narrow(0, 0, tb);
          q_b = q[bh].narrow(0, t0, tb);
          g_b = g[bh].narrow(0, t0, tb);
          Tensor raw_b = raw.narrow(0, 0, tb);
          at::mm_out(raw_b, q_b, k[bh].t());
        }
        for (int64_t i = 0; i < tb; ++i) {
          const int64_t t = t0 + i;
          activate_row(r + i * S, r + i * S, a + i * S, S, scale_f, pad_row, m.additive ? m.additive + t * S : nullptr,
                       act, bias_bh, static_cast<uint64_t>((bh * T + t) * S));
        }
        if (small) {
          product_xz(a, T, S, rows_of(g, bh), rows_of(dv, bh), D, true);  // dV = A~^T dO
          product_abt(rows_of(g, bh), rows_of(v, bh), ga, T, S, D);       // dA~ = dO V^T
        } else {
          Tensor dv_bh = dv[bh];
          const Tensor weights_b = weights.narrow(0, 0, tb);
          if (t0 == 0) {
            at::mm_out(dv_bh, weights_b.t(), g_b);
          } else {
            dv_bh.addmm_(weights_b.t(), g_b);
          }
          at::mm_out(grad_b, g_b, v[bh].t());
        }
        for (int64_t i = 0; i < tb; ++i) {
          const uint64_t counter0 = static_cast<uint64_t>((bh * T + t0 + i) * S);
          float* gr = ga + i * S;
          const float* rr = r + i * S;  // masked keys hold -inf here: no gradient
          const RowShape row = row_shape(rr, S, act, bias_bh);
          with_kind(act.kind, [&](auto k) {
            bias_grad += backward_row<decltype(k)::value>(gr, rr, S, row, act, keep_scale, scale_f, counter0,
                                                          dbias_p != nullptr);
          });
        }
        if (small) {
          product_xz(ga, T, S, rows_of(k, bh), rows_of(dq, bh), D, false);  // dQ = scale * dS K
          product_xz(ga, T, S, rows_of(q, bh), rows_of(dk, bh), D, true);   // dK = scale * dS^T Q
        } else {
          Tensor dq_b = dq[bh].narrow(0, t0, tb), dk_bh = dk[bh];
          at::mm_out(dq_b, grad_b, k[bh]);
          if (t0 == 0) {
            at::mm_out(dk_bh, grad_b.t(), q_b);
          } else {
            dk_bh.addmm_(grad_b.t(), q_b);
          }
        }
      }
      if (dbias_p) dbias_p[bh] = static_cast<float>(bias_grad);
    }
  });
  return {dq, dk, dv, dbias};
}

// One step of incremental decoding (no gradients): the scores fairseq computed (masked keys at -inf, or 0 for ReLA)
// become the weights in place, and O = A V is accumulated over the keys whose weight is not 0 (ReLA's zeros are skipped).
// scores [BH, T, S]; v [KBH, S, D] in any layout whose last dimension is contiguous (fairseq's cached encoder values
// are a time-major view: copying them would cost more than the step), with KBH = BH / beam (beam search keeps one
// copy of the encoder's values per sentence: query block b * heads + h reads value block (b / beam) * heads + h).
// Returns O [T, BH, D].
Tensor attention_step(const Tensor& scores, const Tensor& v_in, int64_t heads, int64_t kind,
                      const c10::optional<Tensor>& bias) {
  const Tensor v = rows_contiguous(v_in);
  TORCH_CHECK(scores.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && scores.is_contiguous(),
              "rela fused attention step: contiguous float32 scores and values only");
  const int64_t BH = scores.size(0), T = scores.size(1), S = scores.size(2), KBH = v.size(0), D = v.size(2);
  TORCH_CHECK(v.size(1) == S && BH % KBH == 0 && KBH % heads == 0, "rela fused attention step: scores ",
              scores.sizes(), " do not fit values ", v.sizes());
  const int64_t beam = BH / KBH;
  const Tensor b = bias_of(bias, kind, heads);
  const Activation act{kind, 0.0, 0, b.defined() ? b.data_ptr<float>() : nullptr, heads};
  Tensor out = at::empty({T, BH, D}, v.options());
  float* sp = scores.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, BH, grain(T * S * D), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const Rows vb = rows_of(v, (bh / heads / beam) * heads + bh % heads);
      for (int64_t i = 0; i < T; ++i) {
        float* row = sp + (bh * T + i) * S;
        float* __restrict__ o = op + (i * BH + bh) * D;
        std::fill(o, o + D, 0.0f);
        const RowShape shape = row_shape(row, S, act, act.bias_of(bh));  // masked keys: -inf, or ReLA's 0
        with_kind(kind, [&](auto k) {
          for (int64_t j = 0; j < S; ++j) {
            const float a = activation<decltype(k)::value>(row[j], shape);
            row[j] = a;
            if (a == 0.0f) continue;
            const float* __restrict__ vr = vb.row(j);
#pragma omp simd
            for (int64_t c = 0; c < D; ++c) o[c] += a * vr[c];
          }
        });
      }
    }
  });
  return out;
}

// The dropout decisions of attention_forward, as a [BH, T, S] float tensor of 0 and 1 / (1 - p) (tests).
Tensor dropout_mask(int64_t BH, int64_t T, int64_t S, double p, int64_t seed) {
  Tensor mask = at::empty({BH, T, S}, at::kFloat);
  float* out = mask.data_ptr<float>();
  const float keep_scale = static_cast<float>(1.0 / (1.0 - p));
  at::parallel_for(0, BH * T * S, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      out[c] = uniform(static_cast<uint64_t>(seed), static_cast<uint64_t>(c)) < static_cast<float>(p) ? 0.0f
                                                                                                    : keep_scale;
    }
  });
  return mask;
}

// Gated RMSNorm over rows of `width`: y = g * z * rstd [* sigmoid(w * z)]. Returns (y, rstd [rows]).
std::vector<Tensor> norm_forward(const Tensor& z_in, const Tensor& gain_in, const c10::optional<Tensor>& gate_in,
                                 int64_t width, double eps) {
  const Tensor z = z_in.detach().contiguous(), gain = gain_in.detach().contiguous();
  TORCH_CHECK(z.scalar_type() == at::kFloat && gain.scalar_type() == at::kFloat,
              "rela fused norm: float32 only, got ", z.scalar_type());
  const int64_t d = z.size(-1), rows = z.numel() / width;
  TORCH_CHECK(d % width == 0 && gain.numel() == d, "rela fused norm: width ", width, " does not divide ", d);
  const Tensor gate = gate_in.has_value() && gate_in->defined() ? gate_in->detach().contiguous() : Tensor();
  Tensor y = at::empty_like(z), rstd = at::empty({rows}, z.options());
  const float* zp = z.data_ptr<float>();
  const float* gp = gain.data_ptr<float>();
  const float* wp = gate.defined() ? gate.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* zr = zp + r * width;
      float* yr = yp + r * width;
      const int64_t col0 = (r * width) % d;  // where this row starts in the gain and gate vectors
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < width; ++j) sum += zr[j] * zr[j];
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(width) + static_cast<float>(eps));
      rp[r] = inv;
      if (wp) {
        // the gate first, then the product, in two loops: one loop with both runs out of vector registers (AVX2
        // has 16) and spills, 2.3x slower per element on this row size
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) yr[j] = sigmoid(wp[col0 + j] * zr[j]);
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) yr[j] *= zr[j] * inv * gp[col0 + j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) yr[j] = zr[j] * inv * gp[col0 + j];
      }
    }
  });
  return {y, rstd};
}

// Gradients of norm_forward with respect to z, the gain and the gate weights. With n = z * rstd, s = sigmoid(w * z):
// dz = rstd * (dn - n * mean(dn * n)) + grad * n * g * s(1 - s) * w, dn = grad * s * g.
std::vector<Tensor> norm_backward(const Tensor& grad_in, const Tensor& z_in, const Tensor& gain_in,
                                  const c10::optional<Tensor>& gate_in, const Tensor& rstd, int64_t width) {
  const Tensor z = z_in.detach().contiguous(), grad = grad_in.detach().contiguous();
  const Tensor gain = gain_in.detach().contiguous();
  const Tensor gate = gate_in.has_value() && gate_in->defined() ? gate_in->detach().contiguous() : Tensor();
  const int64_t d = z.size(-1), rows = z.numel() / width;
  const float* zp = z.data_ptr<float>();
  const float* gradp = grad.data_ptr<float>();
  const float* gp = gain.data_ptr<float>();
  const float* wp = gate.defined() ? gate.data_ptr<float>() : nullptr;
  const float* rp = rstd.data_ptr<float>();
  Tensor dz = at::empty_like(z);
  float* dzp = dz.data_ptr<float>();
  // per-thread partial sums of the gain and gate gradients, added up at the end (no atomics)
  Tensor partial = at::zeros({at::get_num_threads(), 2, d}, z.options());
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    float* dg = pp + at::get_thread_num() * 2 * d;
    float* dw = dg + d;
    std::vector<float> dn_buf(width), s_buf(width);
    float* dn = dn_buf.data();
    float* s = s_buf.data();
    for (int64_t r = begin; r < end; ++r) {
      const float* zr = zp + r * width;
      const float* gr = gradp + r * width;
      float* dzr = dzp + r * width;
      const float* g = gp + (r * width) % d;
      const float* w = wp ? wp + (r * width) % d : nullptr;
      float* dgr = dg + (r * width) % d;
      float* dwr = dw + (r * width) % d;
      const float inv = rp[r];
      float dot = 0.0f;  // sum_j dn_j * n_j
      if (w) {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) s[j] = sigmoid(w[j] * zr[j]);
      } else {
        for (int64_t j = 0; j < width; ++j) s[j] = 1.0f;
      }
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < width; ++j) {
        const float n = zr[j] * inv;
        dn[j] = gr[j] * s[j] * g[j];
        dot += dn[j] * n;
        dgr[j] += gr[j] * s[j] * n;
      }
      const float mean_dot = dot / static_cast<float>(width);
      if (w) {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const float n = zr[j] * inv;
          const float d_pre = gr[j] * n * g[j] * s[j] * (1.0f - s[j]);  // dL / d(w * z)
          dwr[j] += d_pre * zr[j];
          dzr[j] = inv * (dn[j] - n * mean_dot) + d_pre * w[j];
        }
      } else {
        for (int64_t j = 0; j < width; ++j) dzr[j] = inv * (dn[j] - zr[j] * inv * mean_dot);
      }
    }
  });
  Tensor sums = partial.sum(0);
  return {dz, sums[0].contiguous(), wp ? sums[1].contiguous() : Tensor()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("attention_forward", &attention_forward, "ReLA attention core, forward");
  module.def("attention_backward", &attention_backward, "ReLA attention core, backward");
  module.def("attention_step", &attention_step, "ReLA attention from fairseq's scores (incremental decoding)");
  module.def("dropout_mask", &dropout_mask, "the attention dropout decisions of attention_forward");
  module.def("norm_forward", &norm_forward, "gated RMSNorm, forward");
  module.def("norm_backward", &norm_backward, "gated RMSNorm, backward");
}
