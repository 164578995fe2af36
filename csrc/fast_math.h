// Vectorisable float32 exp for the CPU kernels' elementwise loops.
//
// glibc's expf/tanhf are scalar calls (~15-20 ns each), which made the transcendental
// functions, not the matrix products, the cost of a GRU forward step. This exp is branch-free
// so that `#pragma omp simd` loops vectorise it: Cody-Waite range reduction x = k ln2 + f,
// |f| <= ln2/2, a degree-6 minimax polynomial for e^f, and 2^k built in the exponent bits.
// Relative error about 2 ulp over the clamped range [-87.3, 88.7] (outside it the result
// saturates near FLT_MIN or FLT_MAX instead of flushing to 0 or inf).
#pragma once

#include <cstdint>
#include <cstring>

namespace lfads {

inline float fast_expf(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  // k = round(x / ln2) through the 1.5 * 2^23 shifter, valid for |x / ln2| < 2^22.
  const float shifter = 12582912.0f;
  const float kf = (x * 1.44269504088896341f + shifter) - shifter;
  const float f = (x - kf * 0.693359375f) + kf * 2.12194440e-4f;  // ln2 split hi/lo
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  const float y = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

}  // namespace lfads
