// Fused forward and backward kernels of a CPU fp32 training step's memory-bound ops: T5's gated GeLU, RMSNorm,
// and the cross-entropy of the logits.
//
// Why: between the GEMMs, ATen runs each of these as several passes over [tokens, hidden] tensors (gated GeLU:
// gelu, mul; its backward: mul, gelu_backward, mul; RMSNorm's backward: ~8 elementwise ops and reductions; the
// loss: max, sub, exp, sum, div over [tokens, vocab], then clone, scatter, mul in backward). Each kernel here
// reads its inputs once and writes its outputs once, row by row, with the row in cache
// (benchmarks/RESULTS.md, fifth session). The maths equals mpu/fused_ops.py's reference formulas up to fp32
// rounding (tests/mpu/test_fused_ops.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpm2_vector_math.h"

namespace {

using at::Tensor;

using cpm2::exp_nonpositive;
using cpm2::kGeluCoef;
using cpm2::kLanes;
using cpm2::kSqrt2OverPi;
using cpm2::tanh_via_exp;

void check_float_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "cpm2 fused ops: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// ---- gated GeLU: out = gelu_tanh(gate) * lin ----------------------------------------------------------------

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void gated_gelu_forward_span(const float* gate, const float* lin, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = cpm2::gelu_tanh(gate[i]) * lin[i];
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void gated_gelu_backward_span(const float* grad, const float* gate, const float* lin, float* grad_gate,
                              float* grad_lin, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float x = gate[i];
    const float t = tanh_via_exp(kSqrt2OverPi * (x + kGeluCoef * x * x * x));
    const float gelu = 0.5f * x * (1.0f + t);
    const float d_gelu =
        0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluCoef * x * x);
    grad_gate[i] = grad[i] * lin[i] * d_gelu;
    grad_lin[i] = grad[i] * gelu;
  }
}

constexpr int64_t kElementGrain = 16384;

Tensor gated_gelu_forward(const Tensor& gate, const Tensor& lin) {
  check_float_cpu(gate, "gate");
  check_float_cpu(lin, "lin");
  TORCH_CHECK(gate.sizes() == lin.sizes(), "gated_gelu: gate ", gate.sizes(), " and lin ", lin.sizes(), " differ");
  const Tensor g = gate.contiguous(), l = lin.contiguous();
  Tensor out = at::empty_like(g);
  const float* gp = g.data_ptr<float>();
  const float* lp = l.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, g.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
    gated_gelu_forward_span(gp + begin, lp + begin, op + begin, end - begin);
  });
  return out;
}

std::tuple<Tensor, Tensor> gated_gelu_backward(const Tensor& grad, const Tensor& gate, const Tensor& lin) {
  check_float_cpu(grad, "grad");
  check_float_cpu(gate, "gate");
  check_float_cpu(lin, "lin");
  TORCH_CHECK(gate.sizes() == lin.sizes() && grad.sizes() == gate.sizes(), "gated_gelu_backward: shapes differ");
  const Tensor d = grad.contiguous(), g = gate.contiguous(), l = lin.contiguous();
  Tensor grad_gate = at::empty_like(g), grad_lin = at::empty_like(l);
  const float* dp = d.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* lp = l.data_ptr<float>();
  float* ggp = grad_gate.data_ptr<float>();
  float* glp = grad_lin.data_ptr<float>();
  at::parallel_for(0, g.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
    gated_gelu_backward_span(dp + begin, gp + begin, lp + begin, ggp + begin, glp + begin, end - begin);
  });
  return {grad_gate, grad_lin};
}

// ---- RMSNorm: y = w * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps), over the last dimension ----------------------

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
float rms_norm_forward_row(const float* x, const float* w, float eps, int64_t d, float* y) {
  return cpm2::rms_norm_row(x, w, eps, d, y);
}

// dx = rstd * (w * dy) - x * rstd^3 / d * sum(w * dy * x); dw_acc += dy * x * rstd
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void rms_norm_backward_row(const float* dy, const float* x, const float* w, float rstd, int64_t d, float* dx,
                           float* dw_acc) {
  float part[kLanes] = {};
  const int64_t d_main = d - d % kLanes;
  for (int64_t i0 = 0; i0 < d_main; i0 += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      part[j] += w[i0 + j] * dy[i0 + j] * x[i0 + j];
    }
  }
  float dot = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) dot += part[j];
  for (int64_t i = d_main; i < d; ++i) dot += w[i] * dy[i] * x[i];
  const float coef = rstd * rstd * rstd * dot / static_cast<float>(d);
  for (int64_t i = 0; i < d; ++i) {
    dx[i] = rstd * w[i] * dy[i] - x[i] * coef;
    dw_acc[i] += dy[i] * x[i] * rstd;
  }
}

constexpr int64_t kRowGrain = 16;

std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& x, const Tensor& weight, double eps) {
  check_float_cpu(x, "x");
  check_float_cpu(weight, "weight");
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "rms_norm: weight ", weight.sizes(), " for hidden ", d);
  const Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t rows = d == 0 ? 0 : xc.numel() / d;
  Tensor y = at::empty_like(xc);
  Tensor rstd = at::empty({rows}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      rp[r] = rms_norm_forward_row(xp + r * d, wp, static_cast<float>(eps), d, yp + r * d);
    }
  });
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                             const Tensor& rstd) {
  check_float_cpu(grad, "grad");
  check_float_cpu(x, "x");
  const int64_t d = x.size(-1);
  const Tensor gc = grad.contiguous(), xc = x.contiguous(), wc = weight.contiguous(), rc = rstd.contiguous();
  const int64_t rows = d == 0 ? 0 : xc.numel() / d;
  TORCH_CHECK(gc.sizes() == xc.sizes() && rc.numel() == rows, "rms_norm_backward: shapes differ");
  Tensor dx = at::empty_like(xc);
  const int64_t threads = at::get_num_threads();
  Tensor dw_parts = at::zeros({threads, d}, xc.options());  // one accumulator per thread, summed below
  const float* gp = gc.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* rp = rc.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* partp = dw_parts.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    float* acc = partp + at::get_thread_num() * d;
    for (int64_t r = begin; r < end; ++r) {
      rms_norm_backward_row(gp + r * d, xp + r * d, wp, rp[r], d, dxp + r * d, acc);
    }
  });
  return {dx, dw_parts.sum(0)};
}

// ---- cross-entropy of logits [R, V] against labels [R] -----------------------------------------------------
// loss = log(sum exp(z - m)) - (z[label] - m), m the row max; a label outside [0, V) contributes no logit (the
// loss is then log(sum exp(z - m))), as mpu/cross_entropy.py defines it. grad = (softmax(z) - onehot) * g.

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void cross_entropy_row(const float* z, int64_t v, float* max_out, float* log_sum_out) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < v; ++i) m = std::max(m, z[i]);
  float part[kLanes] = {};
  const int64_t v_main = v - v % kLanes;
  for (int64_t i0 = 0; i0 < v_main; i0 += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      part[j] += exp_nonpositive(z[i0 + j] - m);
    }
  }
  float total = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) total += part[j];
  for (int64_t i = v_main; i < v; ++i) total += exp_nonpositive(z[i] - m);
  *max_out = m;
  *log_sum_out = std::log(total);
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void cross_entropy_backward_row(const float* z, int64_t v, float lse, float g, float* dz) {
  for (int64_t i = 0; i < v; ++i) {
    dz[i] = exp_nonpositive(z[i] - lse) * g;
  }
}

std::tuple<Tensor, Tensor> cross_entropy_forward(const Tensor& logits, const Tensor& labels) {
  check_float_cpu(logits, "logits");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "cross_entropy: labels must be int64");
  const int64_t v = logits.size(-1);
  const Tensor zc = logits.contiguous(), lc = labels.contiguous();
  const int64_t rows = v == 0 ? 0 : zc.numel() / v;
  TORCH_CHECK(lc.numel() == rows, "cross_entropy: ", rows, " rows of logits and ", lc.numel(), " labels");
  Tensor loss = at::empty({rows}, zc.options());
  Tensor lse = at::empty({rows}, zc.options());  // log-sum-exp of each row: m + log(sum exp(z - m))
  const float* zp = zc.data_ptr<float>();
  const int64_t* lp = lc.data_ptr<int64_t>();
  float* lossp = loss.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float m, log_sum;
      cross_entropy_row(zp + r * v, v, &m, &log_sum);
      const int64_t label = lp[r];
      const float picked = (label >= 0 && label < v) ? zp[r * v + label] - m : 0.0f;
      lossp[r] = log_sum - picked;
      lsep[r] = m + log_sum;
    }
  });
  return {loss, lse};
}

Tensor cross_entropy_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& labels,
                              const Tensor& lse) {
  check_float_cpu(grad_loss, "grad_loss");
  const int64_t v = logits.size(-1);
  const Tensor zc = logits.contiguous(), lc = labels.contiguous(), gc = grad_loss.contiguous(),
               sc = lse.contiguous();
  const int64_t rows = v == 0 ? 0 : zc.numel() / v;
  Tensor dz = at::empty_like(zc);
  const float* zp = zc.data_ptr<float>();
  const int64_t* lp = lc.data_ptr<int64_t>();
  const float* gp = gc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  float* dp = dz.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      cross_entropy_backward_row(zp + r * v, v, sp[r], gp[r], dp + r * v);
      const int64_t label = lp[r];
      if (label >= 0 && label < v) {
        dp[r * v + label] -= gp[r];
      }
    }
  });
  return dz;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cpm2, m) {
  m.def("gated_gelu(Tensor gate, Tensor lin) -> Tensor");
  m.def("gated_gelu_backward(Tensor grad, Tensor gate, Tensor lin) -> (Tensor, Tensor)");
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("cross_entropy_fwd(Tensor logits, Tensor labels) -> (Tensor, Tensor)");
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor labels, Tensor lse) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpm2, CPU, m) {
  m.impl("gated_gelu", gated_gelu_forward);
  m.impl("gated_gelu_backward", gated_gelu_backward);
  m.impl("rms_norm_fwd", rms_norm_forward);
  m.impl("rms_norm_bwd", rms_norm_backward);
  m.impl("cross_entropy_fwd", cross_entropy_forward);
  m.impl("cross_entropy_bwd", cross_entropy_backward);
}
