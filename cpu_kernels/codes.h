// Number formats the CPU kernel reads: fp16 and bf16 values, mx.quantize's
// packed codes (a little-endian bit stream per row), and exp of non-positive
// arguments, written so that the loops using them vectorize.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace kvq {

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#elif defined(__aarch64__)
  __fp16 f;
  std::memcpy(&f, &h, 2);
  return float(f);
#else
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
  if (e == 0) {
    if (m == 0) {
      u = sign;
    } else {
      e = 113;
      while (!(m & 0x400u)) {
        m <<= 1;
        --e;
      }
      u = sign | (e << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13);
  } else {
    u = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

inline float bf16_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// exp(x) for x <= 0 (scores minus their running max; merge weights), within
// 2 ulp of expf; 0 below -87 (and for -inf). Branch-free, so loops over it
// vectorize.
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.0f ? 0.0f : p * scale;
}

// Codes [start, start + n) of one row packed by mx.quantize: a little-endian
// bit stream, element i at bits [BITS*i, BITS*i + BITS) of the row's words.
template <int BITS>
void unpack(const uint32_t* row, int start, int n, float* out) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  if constexpr (32 % BITS == 0) {
    constexpr int PER = 32 / BITS;
    int i = 0, idx = start;
    for (; i < n && idx % PER; ++i, ++idx) {
      out[i] = float((row[idx / PER] >> ((idx % PER) * BITS)) & MASK);
    }
    for (; i + PER <= n; i += PER, idx += PER) {
      const uint32_t w = row[idx / PER];
      for (int j = 0; j < PER; ++j) {
        out[i + j] = float((w >> (j * BITS)) & MASK);
      }
    }
    for (; i < n; ++i, ++idx) {
      out[i] = float((row[idx / PER] >> ((idx % PER) * BITS)) & MASK);
    }
  } else {
    for (int i = 0; i < n; ++i) {
      const uint64_t bit = uint64_t(start + i) * BITS;
      const uint32_t word = uint32_t(bit >> 5), shift = uint32_t(bit & 31);
      uint64_t v = row[word];
      if (shift + BITS > 32) {
        v |= uint64_t(row[word + 1]) << 32;
      }
      out[i] = float((v >> shift) & MASK);
    }
  }
}

// 8 codes (half HALF of 16 from a multiple of 16) for widths that divide
// 32: lane j holds word (j * BITS) / 32 shifted by (j * BITS) % 32.
// Written with vector extensions, so it compiles to vector shifts (AVX2,
// NEON) instead of one shift per code.
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));
// 8 floats stored where a float may sit: a vector store the compiler keeps
// (a memcpy into a small local array lets it split the array into scalars,
// and the 8 codes then leave the vector register one at a time).
typedef float f32x8_unaligned __attribute__((vector_size(32), aligned(4)));

inline void store8(float* out, f32x8 f) {
  *reinterpret_cast<f32x8_unaligned*>(out) = f;
}

template <int BITS, int HALF>
inline void unpack8(const uint32_t* w, float* out) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  // Lanes hold at most two distinct words (8 codes of at most 8 bits).
  constexpr int lo = HALF * 8 * BITS / 32, hi = (HALF * 8 + 7) * BITS / 32;
  constexpr int per = 32 / BITS;  // codes per word
  const u32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const u32x8 shifts = ((lane + HALF * 8) % per) * BITS;
  u32x8 words = u32x8{} + w[lo];
  if constexpr (hi != lo) {
    words = (lane + HALF * 8) / per == uint32_t(hi) ? u32x8{} + w[hi] : words;
  }
  const i32x8 codes = (i32x8)((words >> shifts) & MASK);
  store8(out, __builtin_convertvector(codes, f32x8));
}

// The same for widths that do not divide 32 (3, 5, 6): code j starts at bit
// PHASE + j * BITS of w (PHASE: the first code's bit in its word). The 8
// codes take 8 * BITS <= 48 bits from bit b0 = PHASE + HALF * 8 * BITS; with
// PHASE 0 or 16 they lie in the word of b0 and, when they cross it, the next
// one (read only then: words past the last code's are not read). Shifted
// down by b0 % 32 they are two words a, b: lane j takes its code from
// (a, b) or (b, 0) by whether it starts below bit 32, shifted by its start
// mod 32 as (lo >> s) | (hi << (32 - s)), the second shift split in two so
// that s = 0 shifts by no more than 31. The lanes' choices and shifts are
// constants: two broadcasts, two blends and vector shifts, no gather.
template <int BITS, int PHASE, int HALF>
inline void unpack8_spanning(const uint32_t* w, float* out) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  constexpr int b0 = PHASE + HALF * 8 * BITS, w0 = b0 >> 5, s0 = b0 & 31;
  static_assert(s0 + 8 * BITS <= 64, "8 codes within two words");
  uint64_t x = w[w0];
  if constexpr (s0 + 8 * BITS > 32) {
    x |= uint64_t(w[w0 + 1]) << 32;
  }
  x >>= s0;
  const u32x8 a = u32x8{} + uint32_t(x), b = u32x8{} + uint32_t(x >> 32);
  const u32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const u32x8 start = lane * BITS;
  const i32x8 upper = (i32x8)(start >= 32);  // all ones where a code starts in b
  const u32x8 lo = (u32x8)(upper ? (i32x8)b : (i32x8)a);
  const u32x8 hi = (u32x8)(upper ? i32x8{} : (i32x8)b);
  const u32x8 sh = start & 31;
  const i32x8 codes = (i32x8)(((lo >> sh) | ((hi << 1) << (31 - sh))) & MASK);
  store8(out, __builtin_convertvector(codes, f32x8));
}

// 16 codes from code `start` (a multiple of 16) of a row, any width.
template <int BITS>
inline void unpack16(const uint32_t* row, int start, float* out) {
  if constexpr (32 % BITS == 0) {
    const uint32_t* w = row + start * BITS / 32;
    unpack8<BITS, 0>(w, out);
    unpack8<BITS, 1>(w, out + 8);
  } else {
    // 16 codes span 16 * BITS bits, a multiple of 16: code `start` begins
    // at bit 0 or 16 of its word.
    const long bit = long(start) * BITS;
    const uint32_t* w = row + (bit >> 5);
    if ((bit & 31) == 0) {
      unpack8_spanning<BITS, 0, 0>(w, out);
      unpack8_spanning<BITS, 0, 1>(w, out + 8);
    } else {
      unpack8_spanning<BITS, 16, 0>(w, out);
      unpack8_spanning<BITS, 16, 1>(w, out + 8);
    }
  }
}

// Codes [start, start + n): 16 at a time where they are aligned.
template <int BITS>
inline void unpack_run(const uint32_t* row, int start, int n, float* out) {
  if (n == 16 && start % 16 == 0) {
    unpack16<BITS>(row, start, out);
    return;
  }
  unpack<BITS>(row, start, n, out);
}

using Unpack = void (*)(const uint32_t*, int, int, float*);

}  // namespace kvq
