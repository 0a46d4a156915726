// The decoder layers of one incremental decode step (one new token per row), fp32 CPU, model-parallel size 1.
//
// Why: a decode step streams all decoder weights from memory through ~36 oneDNN GEMMs of M = rows (8 in the
// benchmark); around them, model/decode_step.py's `_layer_step` issues ~290 small ATen calls from Python (norms,
// views, cache writes, two bmm + softmax per attention, residual adds), ~1.5 ms of a ~5 ms step. Here the same
// layer maths runs from C++ with fused kernels: residual add + RMSNorm in one pass, gated GeLU in one pass,
// single-query attention as one pass per (row, head) instead of two MKL bmm calls over 64 one-row GEMMs, the
// bias add and the softmax; and for at most 16 rows the GEMMs themselves (weights in 16-column panels, streamed
// once; oneDNN's packed kernel for more rows). Results equal the Python path up to fp32 summation order
// (tests/model/test_decode_step*.py: logits within 1e-5, same tokens).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "cpm2_vector_math.h"

namespace at {
namespace native {
// oneDNN linear (`mkldnn::_linear_pointwise`), exported by libtorch_cpu; `weight` dense or packed by
// `mkldnn::_reorder_linear_weight`.
TORCH_API Tensor mkldnn_linear_pointwise(const Tensor& input_t, const Tensor& weight_t,
                                         const std::optional<Tensor>& bias_opt, std::string_view attr,
                                         c10::List<std::optional<Scalar>> scalars,
                                         std::optional<std::string_view> algorithm);
}  // namespace native
}  // namespace at

namespace {

using at::Tensor;

// Per layer, in this order (model/decode_step.py, StepPlan.cpp_weights).
constexpr int64_t kSelfNorm = 0, kQKV = 1, kSelfOut = 2, kCrossNorm = 3, kCrossQ = 4, kCrossOut = 5, kFFNorm = 6,
                  kWi = 7, kWo = 8, kPerLayer = 9;

Tensor panel_linear(const Tensor& x_in, const Tensor& wb, int64_t n);
Tensor onednn_linear(const Tensor& x, const Tensor& weight);

// x @ W^T with W in the form model/decode_step.py's plan chose: 16-column panels [N/16, K, 16] (few rows) or a
// oneDNN weight (dense or packed).
Tensor step_linear(const Tensor& x, const Tensor& weight) {
  if (weight.dim() == 3 && !weight.is_mkldnn()) {
    return panel_linear(x, weight, weight.size(0) * weight.size(2));
  }
  return onednn_linear(x, weight);
}

Tensor onednn_linear(const Tensor& x, const Tensor& weight) {
  return at::native::mkldnn_linear_pointwise(x, weight, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(),
                                             std::nullopt);
}

// torch.cat([past, new], dim=2) for a view `past` [N, H, L, dk] of a buffer with spare positions (strides of the
// full buffer): writes `fresh` [N, H, dk] at position L and returns the view one longer (model/fast_inference.py
// append_kv).
Tensor append_kv(const Tensor& past, const Tensor& fresh) {
  const int64_t n = past.size(0), heads = past.size(1), length = past.size(2), dk = past.size(3);
  const int64_t capacity = past.stride(1) / dk;
  if (length + 1 > capacity || past.stride(3) != 1 || past.stride(2) != dk) {
    return at::cat({past, fresh.unsqueeze(2)}, 2);
  }
  Tensor grown = past.as_strided({n, heads, length + 1, dk}, past.strides(), past.storage_offset());
  grown.select(2, length).copy_(fresh);
  return grown;
}

using cpm2::exp_nonpositive;
using cpm2::kLanes;

// softmax(q . k_l + bias_l) over l, then the weighted sum of the v_l, for one (query row, head): q [dk]; k, v
// rows l at k + l * k_stride (dk contiguous floats each); bias (or null) at bias + l * bias_stride; scores: scratch
// of `length` floats. Compiled for AVX-512, AVX2 and baseline x86-64, chosen when the library loads.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void attend_one_row(const float* q, const float* k, int64_t k_stride, const float* v, int64_t v_stride,
                    const float* bias, int64_t bias_stride, int64_t length, int64_t dk, float* scores, float* out) {
  const int64_t dk_main = dk - dk % kLanes;
  int64_t l = 0;
  for (; l + 4 <= length; l += 4) {  // four keys at a time: four independent accumulators, one pass over q
    const float* k0 = k + l * k_stride;
    const float* k1 = k0 + k_stride;
    const float* k2 = k1 + k_stride;
    const float* k3 = k2 + k_stride;
    float p0[kLanes] = {}, p1[kLanes] = {}, p2[kLanes] = {}, p3[kLanes] = {};
    for (int64_t d0 = 0; d0 < dk_main; d0 += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const float qd = q[d0 + j];
        p0[j] += qd * k0[d0 + j];
        p1[j] += qd * k1[d0 + j];
        p2[j] += qd * k2[d0 + j];
        p3[j] += qd * k3[d0 + j];
      }
    }
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    for (int64_t j = 0; j < kLanes; ++j) {
      a0 += p0[j];
      a1 += p1[j];
      a2 += p2[j];
      a3 += p3[j];
    }
    for (int64_t d = dk_main; d < dk; ++d) {
      a0 += q[d] * k0[d];
      a1 += q[d] * k1[d];
      a2 += q[d] * k2[d];
      a3 += q[d] * k3[d];
    }
    scores[l] = a0;
    scores[l + 1] = a1;
    scores[l + 2] = a2;
    scores[l + 3] = a3;
  }
  for (; l < length; ++l) {
    const float* kl = k + l * k_stride;
    float acc = 0.0f;
    for (int64_t d = 0; d < dk; ++d) {
      acc += q[d] * kl[d];
    }
    scores[l] = acc;
  }
  if (bias != nullptr) {
    for (int64_t i = 0; i < length; ++i) {
      scores[i] += bias[i * bias_stride];
    }
  }
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < length; ++l) {
    max_score = std::max(max_score, scores[l]);
  }
  float total = 0.0f;
  for (int64_t l = 0; l < length; ++l) {
    scores[l] = exp_nonpositive(scores[l] - max_score);
    total += scores[l];
  }
  const float inv_total = 1.0f / total;
  for (int64_t d = 0; d < dk; ++d) {
    out[d] = 0.0f;
  }
  for (int64_t l = 0; l < length; ++l) {
    const float p = scores[l] * inv_total;
    const float* vl = v + l * v_stride;
    for (int64_t d = 0; d < dk; ++d) {
      out[d] += p * vl[d];
    }
  }
}

// Unscaled softmax attention of one query row per (row, head), the maths of model/fast_inference.py
// single_query_attention (and of its grouped form for beams): q [N, H, dk]; k, v [E, H, Lk, dk] with E = N, or
// E = N / g when the g beams of an example share its row (cross-attention in beam search); bias broadcastable to
// [N, H, 1, Lk] (first dim N, E or 1) or undefined -> [N, 1, H * dk]. Replaces two bmm calls (MKL runs a batch
// of 64 one-row GEMMs at ~30 us a call), the bias add and the softmax with one pass per row.
Tensor single_query_attention(Tensor q, Tensor k, Tensor v, const Tensor& bias) {
  const int64_t n = q.size(0), heads = q.size(1), dk = q.size(2), examples = k.size(0), k_len = k.size(2);
  TORCH_CHECK(n % examples == 0, "decode_layers: ", n, " query rows cannot share K/V of ", examples, " rows");
  const int64_t group = n / examples;
  if (q.stride(2) != 1) q = q.contiguous();
  if (k.stride(3) != 1) k = k.contiguous();
  if (v.stride(3) != 1) v = v.contiguous();
  Tensor b;
  int64_t bias_rows = 0;  // 0: no bias
  if (bias.defined()) {
    TORCH_CHECK(bias.dim() == 4 && bias.size(2) == 1 && bias.size(3) == k_len &&
                    (bias.size(1) == 1 || bias.size(1) == heads),
                "decode_layers: attention bias of shape ", bias.sizes(), " for ", heads, " heads and ", k_len,
                " keys");
    bias_rows = bias.size(0);
    TORCH_CHECK(bias_rows == 1 || bias_rows == n || bias_rows == examples, "decode_layers: attention bias rows ",
                bias_rows, " for ", n, " query rows");
    b = bias.expand({bias_rows, heads, 1, k_len});
  }
  Tensor out = at::empty({n, 1, heads * dk}, q.options());
  const float* q_data = q.data_ptr<float>();
  const float* k_data = k.data_ptr<float>();
  const float* v_data = v.data_ptr<float>();
  const float* b_data = b.defined() ? b.data_ptr<float>() : nullptr;
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, n * heads, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(k_len);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / heads, head = i % heads, example = row / group;
      const float* bias_row = nullptr;
      if (b_data != nullptr) {
        const int64_t bias_row_index = bias_rows == 1 ? 0 : (bias_rows == n ? row : example);
        bias_row = b_data + bias_row_index * b.stride(0) + head * b.stride(1);
      }
      attend_one_row(q_data + row * q.stride(0) + head * q.stride(1),
                     k_data + example * k.stride(0) + head * k.stride(1), k.stride(2),
                     v_data + example * v.stride(0) + head * v.stride(1), v.stride(2), bias_row,
                     b_data != nullptr ? b.stride(3) : 0, k_len, dk, scores.data(), out_data + i * dk);
    }
  });
  return out;
}

// ---- GEMMs of a few rows (decode steps) ------------------------------------------------------------------------
// y [R, N] = x [R, K] @ W^T with W stored as 16-column panels, wb [ceil(N/16), K, 16] (panel p, row k holds
// W[16p .. 16p+15, k], zero past N): one pass over the weights, each 16-float load feeding R multiply-adds into
// R x 16 accumulators held in registers, no horizontal sums. oneDNN's kernel for R = 8 streams a packed weight at
// about half the machine's read bandwidth (benchmarks/RESULTS.md, fifth session); a decode step is little else.

constexpr int64_t kPanel = 16;

typedef float Vec16 __attribute__((vector_size(64)));  // one AVX-512 register (two or four on older x86)

template <int R>
inline __attribute__((always_inline)) void panel_gemm(const float* x, int64_t k_dim, const float* panel,
                                                      float* out, int64_t out_stride, int64_t cols) {
  Vec16 acc[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = Vec16{};
  }
  for (int64_t k = 0; k < k_dim; ++k) {
    Vec16 w;
    std::memcpy(&w, panel + k * kPanel, sizeof(w));
    for (int r = 0; r < R; ++r) {
      acc[r] += x[r * k_dim + k] * w;  // the scalar is broadcast
    }
  }
  for (int r = 0; r < R; ++r) {
    float lanes[kPanel];
    std::memcpy(lanes, &acc[r], sizeof(lanes));
    for (int64_t j = 0; j < cols; ++j) {
      out[r * out_stride + j] = lanes[j];
    }
  }
}

// Two adjacent panels at once for 8 rows: 16 independent accumulators keep both FMA pipes busy (8 chains of
// 4-cycle FMAs only just do).
inline __attribute__((always_inline)) void panel_pair_gemm_8(const float* x, int64_t k_dim, const float* panel0,
                                                             const float* panel1, float* out, int64_t out_stride) {
  Vec16 acc0[8], acc1[8];
  for (int r = 0; r < 8; ++r) {
    acc0[r] = Vec16{};
    acc1[r] = Vec16{};
  }
  for (int64_t k = 0; k < k_dim; ++k) {
    Vec16 w0, w1;
    std::memcpy(&w0, panel0 + k * kPanel, sizeof(w0));
    std::memcpy(&w1, panel1 + k * kPanel, sizeof(w1));
    for (int r = 0; r < 8; ++r) {
      const float xv = x[r * k_dim + k];
      acc0[r] += xv * w0;
      acc1[r] += xv * w1;
    }
  }
  for (int r = 0; r < 8; ++r) {
    std::memcpy(out + r * out_stride, &acc0[r], sizeof(Vec16));
    std::memcpy(out + r * out_stride + kPanel, &acc1[r], sizeof(Vec16));
  }
}

// Panels [begin, end) for R = 8 or 16 rows (x padded with zero rows by the caller).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void panels_8(const float* x, int64_t k_dim, const float* wb, int64_t n, float* out, int64_t begin, int64_t end) {
  int64_t p = begin;
  for (; p + 2 <= end && (p + 2) * kPanel <= n; p += 2) {
    panel_pair_gemm_8(x, k_dim, wb + p * k_dim * kPanel, wb + (p + 1) * k_dim * kPanel, out + p * kPanel, n);
  }
  for (; p < end; ++p) {
    panel_gemm<8>(x, k_dim, wb + p * k_dim * kPanel, out + p * kPanel, n, std::min(kPanel, n - p * kPanel));
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void panels_16(const float* x, int64_t k_dim, const float* wb, int64_t n, float* out, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    panel_gemm<16>(x, k_dim, wb + p * k_dim * kPanel, out + p * kPanel, n, std::min(kPanel, n - p * kPanel));
  }
}

constexpr int64_t kMaxPanelRows = 16;

// W [N, K] -> panels [ceil(N/16), K, 16] (zero-padded).
Tensor pack_panels(const Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "pack_panels: a 2-D float32 CPU weight, got ", weight.sizes(), " ", weight.scalar_type());
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
  Tensor padded = weight;
  if (panels * kPanel != n) {
    padded = at::zeros({panels * kPanel, k}, weight.options());
    padded.narrow(0, 0, n).copy_(weight);
  }
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

// x [*, K] (at most 16 rows) @ W^T from its panels -> [*, n].
Tensor panel_linear(const Tensor& x_in, const Tensor& wb, int64_t n) {
  const int64_t k_dim = x_in.size(-1), rows = x_in.numel() / std::max<int64_t>(k_dim, 1);
  TORCH_CHECK(wb.dim() == 3 && wb.size(1) == k_dim && wb.size(2) == kPanel && wb.size(0) * kPanel >= n,
              "panel_linear: panels ", wb.sizes(), " for input ", x_in.sizes(), " and ", n, " outputs");
  TORCH_CHECK(rows <= kMaxPanelRows, "panel_linear: at most ", kMaxPanelRows, " rows, got ", rows);
  const int64_t padded_rows = rows <= 8 ? 8 : 16;
  Tensor x = x_in.reshape({rows, k_dim});
  if (padded_rows != rows || !x.is_contiguous()) {
    Tensor buffer = at::zeros({padded_rows, k_dim}, x.options());
    buffer.narrow(0, 0, rows).copy_(x);
    x = buffer;
  }
  Tensor out = at::empty({padded_rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = wb.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t panels = (n + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 4, [&](int64_t begin, int64_t end) {
    if (padded_rows == 8) {
      panels_8(xp, k_dim, wp, n, op, begin, end);
    } else {
      panels_16(xp, k_dim, wp, n, op, begin, end);
    }
  });
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = n;
  return (padded_rows == rows ? out : out.narrow(0, 0, rows)).view(shape);
}

// One row of T5's RMSNorm after the residual add: sum = h + y, out = rms_norm(sum) (y null: out = rms_norm(h),
// sum untouched). Statistics in fp32 as in model/transformer.py rms_norm.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void add_rms_norm_row(const float* h, const float* y, const float* w, float eps, int64_t d, float* sum,
                      float* out) {
  if (y != nullptr) {
    for (int64_t i = 0; i < d; ++i) {
      sum[i] = h[i] + y[i];
    }
    h = sum;
  }
  cpm2::rms_norm_row(h, w, eps, d, out);
}

// (h + y, rms_norm(h + y)) for h, y [N, 1, d] (y undefined: (h, rms_norm(h))); the norm a new contiguous tensor.
std::pair<Tensor, Tensor> add_rms_norm(const Tensor& h, const Tensor& y, const Tensor& weight, double eps) {
  const Tensor hc = h.contiguous();
  const Tensor yc = y.defined() ? y.contiguous() : Tensor();
  const Tensor wc = weight.contiguous();
  const int64_t d = hc.size(-1), rows = hc.numel() / d;
  TORCH_CHECK(wc.numel() == d, "decode_layers: norm weight of ", wc.numel(), " for hidden size ", d);
  Tensor sum = yc.defined() ? at::empty_like(hc) : hc;
  Tensor out = at::empty_like(hc);
  for (int64_t r = 0; r < rows; ++r) {
    add_rms_norm_row(hc.data_ptr<float>() + r * d, yc.defined() ? yc.data_ptr<float>() + r * d : nullptr,
                     wc.data_ptr<float>(), static_cast<float>(eps), d, sum.data_ptr<float>() + r * d,
                     out.data_ptr<float>() + r * d);
  }
  return {sum, out};
}

// gelu_tanh(gate) * lin elementwise (T5 v1.1 gated-GeLU); tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void gated_gelu_rows(const float* wi, int64_t rows, int64_t d_ff, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = wi + r * 2 * d_ff;
    const float* lin = gate + d_ff;
    float* o = out + r * d_ff;
    for (int64_t i = 0; i < d_ff; ++i) {
      o[i] = cpm2::gelu_tanh(gate[i]) * lin[i];
    }
  }
}

Tensor gated_gelu(const Tensor& wi) {  // wi [N, 1, 2 * d_ff] (gate | lin) -> [N, 1, d_ff]
  const Tensor wc = wi.contiguous();
  const int64_t d_ff = wc.size(-1) / 2, rows = wc.numel() / wc.size(-1);
  Tensor out = at::empty({wc.size(0), wc.size(1), d_ff}, wc.options());
  gated_gelu_rows(wc.data_ptr<float>(), rows, d_ff, out.data_ptr<float>());
  return out;
}

// h [N, 1, d] -> (h after all layers, not final-normed; the self K/V views one position longer, per layer).
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> decode_layers(
    Tensor h, at::TensorList weights, at::ArrayRef<double> eps, int64_t heads, int64_t d_kv,
    at::TensorList self_k, at::TensorList self_v, at::TensorList cross_k, at::TensorList cross_v,
    const Tensor& self_bias, const std::optional<Tensor>& cross_bias_opt) {
  const int64_t layers = static_cast<int64_t>(self_k.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kPerLayer && static_cast<int64_t>(eps.size()) ==
                  layers * 3 && static_cast<int64_t>(self_v.size()) == layers &&
                  static_cast<int64_t>(cross_k.size()) == layers && static_cast<int64_t>(cross_v.size()) == layers,
              "decode_layers: per-layer inputs do not line up (", layers, " layers)");
  TORCH_CHECK(h.dim() == 3 && h.size(1) == 1 && h.scalar_type() == at::kFloat && h.device().is_cpu(),
              "decode_layers: h must be a float32 CPU tensor [N, 1, d]");
  const int64_t n = h.size(0), d = h.size(2);
  const Tensor cross_bias = cross_bias_opt.has_value() ? *cross_bias_opt : Tensor();
  std::vector<Tensor> new_k, new_v;
  new_k.reserve(layers);
  new_v.reserve(layers);
  // Every residual add is fused with the norm that follows it: (h, x) = (h + y, rms_norm(h + y)).
  Tensor y;  // the last sublayer's output, not yet added to h
  for (int64_t i = 0; i < layers; ++i) {
    const Tensor* w = weights.data() + i * kPerLayer;
    const double* e = eps.data() + i * 3;
    // self-attention (pre-norm, residual); the new K/V go into the cache buffers
    auto [h_self, x_self] = add_rms_norm(h, y, w[kSelfNorm], e[0]);
    h = h_self;
    Tensor qkv = step_linear(x_self, w[kQKV]).view({n, 3, heads, d_kv});
    Tensor k = append_kv(self_k[i], qkv.select(1, 1));
    Tensor v = append_kv(self_v[i], qkv.select(1, 2));
    y = step_linear(single_query_attention(qkv.select(1, 0), k, v, self_bias), w[kSelfOut]);
    new_k.push_back(std::move(k));
    new_v.push_back(std::move(v));
    // cross-attention on the cached encoder K/V (shared by the beams of an example when it has fewer rows)
    auto [h_cross, x_cross] = add_rms_norm(h, y, w[kCrossNorm], e[1]);
    h = h_cross;
    Tensor q = step_linear(x_cross, w[kCrossQ]).view({n, heads, d_kv});
    y = step_linear(single_query_attention(q, cross_k[i], cross_v[i], cross_bias), w[kCrossOut]);
    // gated-GeLU feed-forward: wi_0 and wi_1 as one GEMM on their concatenated weights
    auto [h_ff, x_ff] = add_rms_norm(h, y, w[kFFNorm], e[2]);
    h = h_ff;
    y = step_linear(gated_gelu(step_linear(x_ff, w[kWi])), w[kWo]);
  }
  if (y.defined()) {
    h = h + y;
  }
  return {h, new_k, new_v};
}

}  // namespace

// Defined with its kernel (a composite: it only calls ATen operators), so that it also runs when the packed
// weights' MkldnnCPU dispatch key leads the inputs.
TORCH_LIBRARY_FRAGMENT(cpm2, m) {
  m.def(
      "decode_layers(Tensor h, Tensor[] weights, float[] eps, int heads, int d_kv, Tensor[] self_k, "
      "Tensor[] self_v, Tensor[] cross_k, Tensor[] cross_v, Tensor self_bias, Tensor? cross_bias) "
      "-> (Tensor, Tensor[], Tensor[])",
      &decode_layers);
  m.def("pack_panels(Tensor weight) -> Tensor", &pack_panels);
  m.def("panel_linear(Tensor x, Tensor panels, int n) -> Tensor", &panel_linear);
  m.def("single_query_attention(Tensor q, Tensor k, Tensor v, Tensor? bias) -> Tensor",
        [](const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& bias) {
          TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
                      "single_query_attention: float32 only");
          return single_query_attention(q, k, v, bias.has_value() ? *bias : Tensor());
        });
}
