// Helpers for the decode-attention kernels in dequant_attention.metal.
// This text is passed as the `header` of mx.fast.metal_kernel (and compiled
// unchanged by mlx_kvq.metal_emu on CPU), so it must stay plain Metal C++.
#include <metal_stdlib>

// Code number `idx` of one row packed by mx.quantize(..., bits=BITS).
// mx.quantize writes each row as a single little-endian bit stream: element i
// occupies bits [BITS*i, BITS*i + BITS) of the row's uint32 words. For 3, 5 and
// 6 bits an element can straddle two words; for 2, 4 and 8 it never does, and
// the second load is compiled out.
template <int BITS>
inline uint kvq_unpack(const device uint32_t* row, uint idx) {
  const uint bit = idx * BITS;
  const uint word = bit >> 5;
  const uint shift = bit & 31u;
  uint v = row[word] >> shift;
  if ((32 % BITS) != 0 && shift + BITS > 32u) {
    v |= row[word + 1] << (32u - shift);
  }
  return v & ((1u << BITS) - 1u);
}
