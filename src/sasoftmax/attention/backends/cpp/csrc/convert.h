// Element type conversions of the SA attention CPU kernel: half inputs to the float32 compute type, and results back
// to the caller's dtype, row by row inside the kernel's tasks (no separate whole-tensor passes).
//
// bfloat16 <-> float32 by bit manipulation (round to nearest even, NaN kept quiet), as c10::BFloat16 does; float16
// with the F16C instructions when the build has them, else through c10::Half.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace sa_cpu {

inline float bf16_to_float(uint16_t x) {
  const uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if (f != f) return uint16_t(0x7FC0);
  return uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// dst[0, n) = src[0, n) converted to D (D = float or double); src holds elements of dtype st.
template <class D>
inline void load_row(const void* src, at::ScalarType st, D* dst, int64_t n) {
  switch (st) {
    case at::kFloat: {
      const float* s = static_cast<const float*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = D(s[j]);
      return;
    }
    case at::kDouble: {
      const double* s = static_cast<const double*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = D(s[j]);
      return;
    }
    case at::kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = D(bf16_to_float(s[j]));
      return;
    }
    case at::kHalf: {
      const c10::Half* s = static_cast<const c10::Half*>(src);
      int64_t j = 0;
#if defined(__F16C__)
      if constexpr (std::is_same_v<D, float>) {
        for (; j + 8 <= n; j += 8)
          _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j))));
      }
#endif
      for (; j < n; ++j) dst[j] = D(static_cast<float>(s[j]));
      return;
    }
    default:
      TORCH_CHECK(false, "sa_cpu: unsupported dtype ", st);
  }
}

// dst[0, n) (elements of dtype dt) = src[0, n) converted from S (float or double).
template <class S>
inline void store_row(const S* src, void* dst, at::ScalarType dt, int64_t n) {
  switch (dt) {
    case at::kFloat: {
      float* d = static_cast<float*>(dst);
      for (int64_t j = 0; j < n; ++j) d[j] = float(src[j]);
      return;
    }
    case at::kDouble: {
      double* d = static_cast<double*>(dst);
      for (int64_t j = 0; j < n; ++j) d[j] = double(src[j]);
      return;
    }
    case at::kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t j = 0; j < n; ++j) d[j] = float_to_bf16(float(src[j]));
      return;
    }
    case at::kHalf: {
      c10::Half* d = static_cast<c10::Half*>(dst);
      int64_t j = 0;
#if defined(__F16C__)
      if constexpr (std::is_same_v<S, float>) {
        for (; j + 8 <= n; j += 8)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + j),
                           _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
#endif
      for (; j < n; ++j) d[j] = c10::Half(float(src[j]));
      return;
    }
    default:
      TORCH_CHECK(false, "sa_cpu: unsupported dtype ", dt);
  }
}

}  // namespace sa_cpu
