// Branch-free float math for the project's C++ kernels (mpu/csrc/fused_ops.cpp, model/csrc/decode_step.cpp):
// written without calls so that the loops using them vectorise under every target_clones variant.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace cpm2 {

constexpr int64_t kLanes = 16;  // partial sums per reduction: one AVX-512 register

// exp(x) for x <= 0 (a softmax's scores minus their maximum): Cephes' expf, range reduction by ln 2 and a degree-6
// polynomial, within 2 ulp of the exact value.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);                // exp(-87) ~ 1.6e-38, still a normal float
  const float magic = 12582912.0f;        // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) <= 1.
inline float tanh_via_exp(float u) {
  const float e = exp_nonpositive(-2.0f * std::fabs(u));
  return std::copysign((1.0f - e) / (1.0f + e), u);
}

// gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), T5 v1.1's activation.
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoef = 0.044715f;

inline float gelu_tanh(float x) {
  return 0.5f * x * (1.0f + tanh_via_exp(kSqrt2OverPi * (x + kGeluCoef * x * x * x)));
}

// One row of T5's RMSNorm: y = w * x / sqrt(mean(x^2) + eps) over d floats (squares summed in kLanes partial
// sums); returns the reciprocal 1 / sqrt(mean(x^2) + eps).
inline float rms_norm_row(const float* x, const float* w, float eps, int64_t d, float* y) {
  float part[kLanes] = {};
  const int64_t d_main = d - d % kLanes;
  for (int64_t i0 = 0; i0 < d_main; i0 += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      part[j] += x[i0 + j] * x[i0 + j];
    }
  }
  float squares = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) squares += part[j];
  for (int64_t i = d_main; i < d; ++i) squares += x[i] * x[i];
  const float rstd = 1.0f / std::sqrt(squares / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) {
    y[i] = w[i] * (x[i] * rstd);
  }
  return rstd;
}

}  // namespace cpm2
