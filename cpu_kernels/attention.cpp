// Decode attention over a quantized KV cache on the CPU (flash decoding).
//
// Work: each (batch row, kv head) sees a run of tokens across the cache's
// segments (sinks, body, residual; a window or a ragged batch row clips
// each to [first, count)). That run is cut into parts of about
// `split` tokens; the parts of every (row, head) go to the pool's threads.
// A part reads, for its tokens only: the packed codes and fp16 scales and
// biases of the keys (per-channel keys in their stored layout, channel rows
// along tokens, so a part reads a contiguous stretch of every channel row),
// then the values' codes, scales and biases (per token), and every query
// head of the GQA group is scored against the same bytes (the codes are
// unpacked once per block of tokens, not once per query head).
//
// Per block of BLOCK tokens a part computes the scores of its R query rows,
// updates an online softmax (running max m, sum l, output o), dequantizes
// each value row once and accumulates it into the R outputs. It ends with
// unnormalized partials (m, l, o). The partials of a (row, head) then merge
// by log-sum-exp together with the learned sinks' logits (m = sink, l = 1,
// o = 0), and o / l is written (0 for a row that sees no token).
//
// Scores of per-channel keys: for channel d and quantization group g,
// k = code * scale[d, g] + bias[d, g], so q.k over a group's tokens is
// sum_d (q_d * scale) * code + sum_d q_d * bias: the second term is one
// number per group, added once after all channels.
#include "attention.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"

namespace kvq {
namespace {

constexpr int BLOCK = 128;        // tokens scored together
constexpr int MIN_SPLIT = 256;    // fewest tokens a part takes (automatic splits)
constexpr int PARTS_PER_THREAD = 4;
// Below this many token-rows of work a step runs on the calling thread:
// waking the pool would cost more than it saves.
constexpr long INLINE_WORK = 1 << 13;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

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

// 16 codes from code `start` (a multiple of 16) of a row, for widths that
// divide 32: lane j holds word (j * BITS) / 32 shifted by (j * BITS) % 32.
// Written with vector extensions, so it compiles to vector shifts (AVX2,
// NEON) instead of one shift per code.
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));

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
  const f32x8 f = __builtin_convertvector(codes, f32x8);
  std::memcpy(out, &f, sizeof(f));
}

template <int BITS>
inline void unpack16(const uint32_t* row, int start, float* out) {
  static_assert(32 % BITS == 0, "widths that divide 32");
  const uint32_t* w = row + start * BITS / 32;
  unpack8<BITS, 0>(w, out);
  unpack8<BITS, 1>(w, out + 8);
}

// Codes [start, start + n): 16 at a time where they are aligned.
template <int BITS>
inline void unpack_run(const uint32_t* row, int start, int n, float* out) {
  if constexpr (32 % BITS == 0) {
    if (n == 16 && start % 16 == 0) {
      unpack16<BITS>(row, start, out);
      return;
    }
  }
  unpack<BITS>(row, start, n, out);
}

using Unpack = void (*)(const uint32_t*, int, int, float*);

Unpack unpacker(int bits) {
  switch (bits) {
    case 2: return unpack<2>;
    case 3: return unpack<3>;
    case 4: return unpack<4>;
    case 5: return unpack<5>;
    case 6: return unpack<6>;
    case 8: return unpack<8>;
    default: return nullptr;
  }
}

// One part (keys or values) of one segment, as the kernel reads it.
struct Part {
  int kind = FP;
  int bits = 0;
  Unpack unpack = nullptr;
  mx::Dtype dtype = mx::float16;  // FP parts
  const void* fp = nullptr;       // FP: [BH, T, D]
  const uint32_t* codes = nullptr;
  const uint16_t* scales = nullptr;
  const uint16_t* biases = nullptr;
  long head = 0;         // elements of fp / codes per (row, head)
  long scale_head = 0;   // elements of scales per (row, head)
  int words = 0;         // uint32 words per code row
  int groups = 0;        // scales per code row
  int T = 0;             // token capacity (FP and TOKEN)
};

struct Segment {
  Part k, v;
  int group = 32;
  const int* counts = nullptr;  // [B]
  const int* firsts = nullptr;  // [B]
};

// Deliberate faults, for tests that show broken variants fail: 1 merges
// parts without rescaling, 2 gives every row the first row's token counts,
// 3 ignores the window's first tokens, 4 reads the next group's scales.
enum Fault : int { NONE = 0, MERGE = 1, ROW_COUNT = 2, WINDOW = 3, GROUP_OFFSET = 4 };

struct Step {
  int B, H, R, D, Dv, split, fault;
  const float* q;
  const float* sinks;
  std::vector<Segment> segs;
  float* out;
};

// A row of D values of an FP part as float32.
void fp_row(const Part& p, long bh, int t, int D, float* out) {
  const long off = bh * p.head + long(t) * D;
  if (p.dtype == mx::float32) {
    std::memcpy(out, static_cast<const float*>(p.fp) + off, sizeof(float) * D);
  } else if (p.dtype == mx::float16) {
    const uint16_t* r = static_cast<const uint16_t*>(p.fp) + off;
    for (int d = 0; d < D; ++d) {
      out[d] = half_to_float(r[d]);
    }
  } else {
    const uint16_t* r = static_cast<const uint16_t*>(p.fp) + off;
    for (int d = 0; d < D; ++d) {
      out[d] = bf16_to_float(r[d]);
    }
  }
}

// Token t of a TOKEN part, dequantized: D values.
void token_row(const Part& p, long bh, int t, int D, int G, float* out) {
  const long row = bh * p.T + t;
  p.unpack(p.codes + row * p.words, 0, D, out);
  const uint16_t* s = p.scales + row * p.groups;
  const uint16_t* b = p.biases + row * p.groups;
  for (int g = 0; g < p.groups; ++g) {
    const float sc = half_to_float(s[g]), bi = half_to_float(b[g]);
    for (int d = g * G; d < (g + 1) * G; ++d) {
      out[d] = out[d] * sc + bi;
    }
  }
}

struct Scratch {
  std::vector<float> S, codes, row, bias;
  void fit(int R, int D) {
    S.resize(size_t(R) * BLOCK);
    codes.resize(std::max(BLOCK, D));
    row.resize(D);
    bias.resize(size_t(R) * (BLOCK + 2));
  }
};

// Rows of q taken together by the inner loops (their accumulators stay in
// registers); more rows run in several passes over the same bytes, which
// the caches then hold.
constexpr int ROWS = 4;
constexpr int TT = 16;  // tokens of per-channel keys scored together
constexpr int CC = 16;  // value channels accumulated together (within a group)

// acc[r][j] += (w_r * s) * c[j] and bsum[r] += w_r * b for RR rows: one
// affine-quantized group of codes c (code * s + b) weighted by w_r, the
// bias term kept as one number per row. w_r is w[r * stride].
template <int RR, int N>
inline void add_weighted_codes(float (&acc)[RR][N], float (&bsum)[RR], const float* w,
                               int stride, float s, float b, const float* c) {
  for (int r = 0; r < RR; ++r) {
    const float x = w[r * stride];
    const float a = x * s;
    bsum[r] += x * b;
    for (int j = 0; j < N; ++j) {
      acc[r][j] += a * c[j];
    }
  }
}

// Scores of per-channel keys: RR query rows, tokens [tb, tb + n), a run of at
// most TT tokens inside one group at a time. Per channel d the run's codes
// are unpacked once and each row adds (q_d * scale) * code; q_d * bias is
// summed per row and added once.
template <int BITS, int RR>
void score_channel(const Part& k, long bh, int tb, int n, const float* q, int D, int G,
                   float* S, int fault) {
  const uint32_t* codes = k.codes + bh * k.head;
  const uint16_t* scales = k.scales + bh * k.scale_head;
  const uint16_t* biases = k.biases + bh * k.scale_head;
  // Every channel row is a stream of its own, more than a hardware
  // prefetcher follows: ask for the next block's bytes of each row now.
  const int next = tb + BLOCK;
  if (next < k.words * 32 / BITS) {
    for (int d = 0; d < D; ++d) {
      __builtin_prefetch(codes + long(d) * k.words + long(next) * BITS / 32);
      __builtin_prefetch(scales + long(d) * k.groups + next / G);
      __builtin_prefetch(biases + long(d) * k.groups + next / G);
    }
  }
  for (int i = 0; i < n;) {
    const int t = tb + i, g = t / G;
    const int len = std::min({TT - t % TT, n - i, (g + 1) * G - t});
    const int gs = fault == GROUP_OFFSET ? std::min(g + 1, k.groups - 1) : g;
    float acc[RR][TT] = {};
    float bsum[RR] = {};
    float c[TT] = {};
    for (int d = 0; d < D; ++d) {
      unpack_run<BITS>(codes + long(d) * k.words, t, len, c);
      const float s = half_to_float(scales[long(d) * k.groups + gs]);
      const float b = half_to_float(biases[long(d) * k.groups + gs]);
      add_weighted_codes(acc, bsum, q + d, D, s, b, c);
    }
    for (int r = 0; r < RR; ++r) {
      for (int j = 0; j < len; ++j) {
        S[r * BLOCK + i + j] = acc[r][j] + bsum[r];
      }
    }
    i += len;
  }
}

// o[r] += sum_i P[r, i] * v_{tb + i} for per-token quantized values: CC
// channels (inside one group) at a time, the RR rows' sums in registers;
// p * scale multiplies the codes, p * bias is summed per row and added once.
template <int BITS, int RR>
void accumulate_token_values(const Part& v, long bh, int tb, int n, const float* P, int Dv,
                             int G, float* o) {
  for (int c0 = 0; c0 < Dv; c0 += CC) {
    const int g = c0 / G;
    float acc[RR][CC] = {};
    float bsum[RR] = {};
    for (int i = 0; i < n; ++i) {
      const long row = bh * v.T + tb + i;
      float c[CC];
      unpack_run<BITS>(v.codes + row * v.words, c0, CC, c);
      const float s = half_to_float(v.scales[row * v.groups + g]);
      const float b = half_to_float(v.biases[row * v.groups + g]);
      add_weighted_codes(acc, bsum, P + i, BLOCK, s, b, c);
    }
    for (int r = 0; r < RR; ++r) {
      for (int j = 0; j < CC; ++j) {
        o[r * Dv + c0 + j] += acc[r][j] + bsum[r];
      }
    }
  }
}

using ScoreChannel = void (*)(const Part&, long, int, int, const float*, int, int, float*, int);
using AccumulateValues = void (*)(const Part&, long, int, int, const float*, int, int, float*);

// The kernels of one code width, for 1 to ROWS rows at a time.
struct WidthKernels {
  ScoreChannel score[ROWS];
  AccumulateValues values[ROWS];
};

template <int BITS>
constexpr WidthKernels width_kernels = {
    {score_channel<BITS, 1>, score_channel<BITS, 2>, score_channel<BITS, 3>,
     score_channel<BITS, 4>},
    {accumulate_token_values<BITS, 1>, accumulate_token_values<BITS, 2>,
     accumulate_token_values<BITS, 3>, accumulate_token_values<BITS, 4>}};

const WidthKernels& kernels_for(int bits) {
  switch (bits) {
    case 2: return width_kernels<2>;
    case 3: return width_kernels<3>;
    case 4: return width_kernels<4>;
    case 5: return width_kernels<5>;
    case 6: return width_kernels<6>;
    default: return width_kernels<8>;
  }
}

// Scores S[r * BLOCK + i] = q_r . k_{tb + i} for n tokens from tb.
void score_block(const Step& st, const Segment& sg, long bh, int tb, int n,
                 const float* q, Scratch& sc) {
  const int R = st.R, D = st.D, G = sg.group;
  float* S = sc.S.data();
  const Part& k = sg.k;
  if (k.kind == CHANNEL) {
    for (int r0 = 0; r0 < R; r0 += ROWS) {
      const int rr = std::min(ROWS, R - r0);
      kernels_for(k.bits).score[rr - 1](k, bh, tb, n, q + r0 * D, D, G, S + r0 * BLOCK, st.fault);
    }
    return;
  }
  float* row = sc.row.data();
  for (int i = 0; i < n; ++i) {
    if (k.kind == FP) {
      fp_row(k, bh, tb + i, D, row);
    } else {
      token_row(k, bh, tb + i, D, G, row);
    }
    for (int r = 0; r < R; ++r) {
      const float* qr = q + r * D;
      float s = 0.0f;
      for (int d = 0; d < D; ++d) {
        s += qr[d] * row[d];
      }
      S[r * BLOCK + i] = s;
    }
  }
}

// Softmax update of one block and its values: m, l [R], o [R, Dv].
void attend_block(const Step& st, const Segment& sg, long bh, int tb, int n, float* m,
                  float* l, float* o, Scratch& sc) {
  const int R = st.R, Dv = st.Dv;
  float* S = sc.S.data();
  for (int r = 0; r < R; ++r) {
    float* Sr = S + r * BLOCK;
    // 8 partial maxima and sums: loops that vectorize (no reassociation asked).
    float bm8[8], sum8[8];
    std::fill(bm8, bm8 + 8, NEG_INF);
    std::fill(sum8, sum8 + 8, 0.0f);
    const int n8 = n / 8 * 8;
    for (int i = 0; i < n8; i += 8) {
      for (int j = 0; j < 8; ++j) {
        bm8[j] = Sr[i + j] > bm8[j] ? Sr[i + j] : bm8[j];
      }
    }
    float bm = NEG_INF;
    for (int i = n8; i < n; ++i) {
      bm = std::max(bm, Sr[i]);
    }
    for (int j = 0; j < 8; ++j) {
      bm = std::max(bm, bm8[j]);
    }
    const float mn = std::max(m[r], bm);
    const float alpha = exp_nonpositive(m[r] - mn);
    for (int i = 0; i < n; ++i) {
      Sr[i] = exp_nonpositive(Sr[i] - mn);
    }
    for (int i = 0; i < n8; i += 8) {
      for (int j = 0; j < 8; ++j) {
        sum8[j] += Sr[i + j];
      }
    }
    float sum = 0.0f;
    for (int i = n8; i < n; ++i) {
      sum += Sr[i];
    }
    for (int j = 0; j < 8; ++j) {
      sum += sum8[j];
    }
    l[r] = l[r] * alpha + sum;
    if (alpha != 1.0f) {
      float* orow = o + r * Dv;
      for (int d = 0; d < Dv; ++d) {
        orow[d] *= alpha;
      }
    }
    m[r] = mn;
  }
  if (sg.v.kind == TOKEN && Dv % CC == 0 && sg.group % CC == 0) {
    for (int r0 = 0; r0 < R; r0 += ROWS) {
      const int rr = std::min(ROWS, R - r0);
      kernels_for(sg.v.bits).values[rr - 1](sg.v, bh, tb, n, S + r0 * BLOCK, Dv, sg.group,
                                       o + r0 * Dv);
    }
    return;
  }
  float* row = sc.row.data();
  for (int i = 0; i < n; ++i) {
    if (sg.v.kind == FP) {
      fp_row(sg.v, bh, tb + i, Dv, row);
    } else {
      token_row(sg.v, bh, tb + i, Dv, sg.group, row);
    }
    for (int r = 0; r < R; ++r) {
      const float p = S[r * BLOCK + i];
      float* orow = o + r * Dv;
      for (int d = 0; d < Dv; ++d) {
        orow[d] += p * row[d];
      }
    }
  }
}

struct Work {
  int bh;
  long begin, end;  // among the (row, head)'s visible tokens, in segment order
};

void run_part(const Step& st, const Work& w, float* m, float* l, float* o) {
  thread_local Scratch sc;
  sc.fit(st.R, std::max(st.D, st.Dv));
  const int b = st.fault == ROW_COUNT ? 0 : w.bh / st.H;
  const float* q = st.q + long(w.bh) * st.R * st.D;
  std::fill(m, m + st.R, NEG_INF);
  std::fill(l, l + st.R, 0.0f);
  std::fill(o, o + size_t(st.R) * st.Dv, 0.0f);
  long pos = 0;
  for (const Segment& sg : st.segs) {
    const int first = st.fault == WINDOW ? 0 : sg.firsts[b], count = sg.counts[b];
    if (count <= first) {
      continue;
    }
    const long len = count - first;
    const long a = std::max(pos, w.begin), e = std::min(pos + len, w.end);
    for (long t = a; t < e; t += BLOCK) {
      const int tb = int(first + (t - pos));
      const int n = int(std::min<long>(BLOCK, e - t));
      score_block(st, sg, w.bh, tb, n, q, sc);
      attend_block(st, sg, w.bh, tb, n, m, l, o, sc);
    }
    pos += len;
  }
}

void compute(Step& st) {
  const int BH = st.B * st.H, R = st.R, Dv = st.Dv;
  std::vector<long> visible(BH, 0);
  long total = 0;
  for (int bh = 0; bh < BH; ++bh) {
    const int b = st.fault == ROW_COUNT ? 0 : bh / st.H;
    for (const Segment& sg : st.segs) {
      visible[bh] += std::max(0, sg.counts[b] - (st.fault == WINDOW ? 0 : sg.firsts[b]));
    }
    total += visible[bh];
  }
  Pool& pool = Pool::get();
  const bool inline_only = st.split <= 0 && total * R < INLINE_WORK;
  long split = st.split;
  if (split <= 0) {
    const long parts = long(pool.threads()) * PARTS_PER_THREAD;
    split = std::max<long>(MIN_SPLIT, (total + parts - 1) / parts);
  }
  std::vector<Work> work;
  std::vector<int> first_part(BH + 1, 0);
  for (int bh = 0; bh < BH; ++bh) {
    first_part[bh] = int(work.size());
    for (long a = 0; a < visible[bh]; a += split) {
      work.push_back({bh, a, std::min(visible[bh], a + split)});
    }
  }
  first_part[BH] = int(work.size());
  const size_t P = work.size();
  std::vector<float> pm(P * R), pl(P * R), po(P * R * size_t(Dv));
  auto one = [&](int p) {
    run_part(st, work[p], &pm[size_t(p) * R], &pl[size_t(p) * R], &po[size_t(p) * R * Dv]);
  };
  if (inline_only) {
    for (size_t p = 0; p < P; ++p) {
      one(int(p));
    }
  } else {
    pool.run(int(P), one);
  }
  // Merge each (row, head)'s parts and the sinks by log-sum-exp; normalize.
  for (int bh = 0; bh < BH; ++bh) {
    const int h = bh % st.H;
    for (int r = 0; r < R; ++r) {
      float M = st.sinks ? st.sinks[h * R + r] : NEG_INF;
      for (int p = first_part[bh]; p < first_part[bh + 1]; ++p) {
        M = std::max(M, pm[size_t(p) * R + r]);
      }
      float* out = st.out + (size_t(bh) * R + r) * Dv;
      std::fill(out, out + Dv, 0.0f);
      if (M == NEG_INF) {
        continue;  // sees no token (and no sink): 0
      }
      float L = st.sinks ? exp_nonpositive(st.sinks[h * R + r] - M) : 0.0f;
      for (int p = first_part[bh]; p < first_part[bh + 1]; ++p) {
        const float w = st.fault == MERGE ? 1.0f : exp_nonpositive(pm[size_t(p) * R + r] - M);
        L += pl[size_t(p) * R + r] * w;
        const float* op = &po[(size_t(p) * R + r) * Dv];
        for (int d = 0; d < Dv; ++d) {
          out[d] += w * op[d];
        }
      }
      const float inv = L > 0.0f ? 1.0f / L : 0.0f;
      for (int d = 0; d < Dv; ++d) {
        out[d] *= inv;
      }
    }
  }
}

int parts_of(int kind) {
  return kind == FP ? 1 : 3;
}

// The array itself when it is known to be row-contiguous (evaluated cache
// buffers are), else a contiguous copy node: the kernel indexes rows by shape.
mx::array rows_contiguous(const mx::array& a, mx::StreamOrDevice s) {
  if (a.is_available() && a.flags().row_contiguous) {
    return a;
  }
  return mx::contiguous(a, false, s);
}

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("[mlx_kvq.cpu_kernels.decode_attention] " + what);
}

// The head dim of a part (D for keys, Dv for values).
int part_dim(int kind, int bits, const mx::array* a) {
  if (kind == FP) {
    return a[0].shape(3);
  }
  if (kind == CHANNEL) {
    return a[0].shape(2);
  }
  return a[0].shape(3) * 32 / bits;
}

}  // namespace

int threads() {
  return Pool::get().threads();
}

mx::array decode_attention(
    const mx::array& q,
    const std::vector<mx::array>& arrays,
    const std::vector<SegmentLayout>& layouts,
    const std::vector<int>& counts,
    const std::vector<int>& firsts,
    const std::optional<mx::array>& sinks,
    int split_tokens,
    int fault,
    mx::StreamOrDevice s) {
  if (q.ndim() != 4) {
    fail("q must be [B, H, R, D]");
  }
  const int B = q.shape(0), H = q.shape(1), R = q.shape(2), D = q.shape(3);
  const size_t n_seg = layouts.size();
  if (n_seg == 0) {
    fail("no segments");
  }
  if (counts.size() != n_seg * B || firsts.size() != n_seg * B) {
    fail("counts and firsts need one entry per segment and batch row");
  }
  size_t need = 0;
  for (const auto& L : layouts) {
    if (L.k_kind < FP || L.k_kind > TOKEN || (L.v_kind != FP && L.v_kind != TOKEN)) {
      fail("unknown segment layout kind");
    }
    for (int kind_bits : {L.k_kind == FP ? 0 : L.k_bits, L.v_kind == FP ? 0 : L.v_bits}) {
      if (kind_bits && !unpacker(kind_bits)) {
        fail("bits must be 2, 3, 4, 5, 6 or 8, got " + std::to_string(kind_bits));
      }
    }
    need += parts_of(L.k_kind) + parts_of(L.v_kind);
  }
  if (arrays.size() != need) {
    fail("expected " + std::to_string(need) + " arrays for these segments, got " +
         std::to_string(arrays.size()));
  }
  std::vector<mx::array> inputs = {rows_contiguous(mx::astype(q, mx::float32, s), s)};
  int Dv = -1;
  size_t i = 0;
  for (size_t j = 0; j < n_seg; ++j) {
    const auto& L = layouts[j];
    for (int side = 0; side < 2; ++side) {
      const int kind = side == 0 ? L.k_kind : L.v_kind;
      const int bits = side == 0 ? L.k_bits : L.v_bits;
      const mx::array* a = &arrays[i];
      for (int p = 0; p < parts_of(kind); ++p) {
        if (a[p].ndim() != 4 || a[p].shape(0) != B || a[p].shape(1) != H) {
          fail("every cache array must be [B, H, ., .] with q's B and H");
        }
      }
      if (kind == FP && a[0].dtype() != mx::float16 && a[0].dtype() != mx::bfloat16 &&
          a[0].dtype() != mx::float32) {
        fail("16-bit parts must be float16, bfloat16 or float32");
      }
      if (kind != FP) {
        if (a[0].dtype() != mx::uint32 || a[1].dtype() != mx::float16 ||
            a[2].dtype() != mx::float16) {
          fail("quantized parts are (uint32 codes, float16 scales, float16 biases)");
        }
        if (L.group <= 0 || (kind == TOKEN && part_dim(kind, bits, a) % L.group)) {
          fail("the group must divide the head dim of per-token parts");
        }
      }
      const int dim = part_dim(kind, bits, a);
      const long cap = kind == CHANNEL ? std::min<long>(long(a[0].shape(3)) * 32 / bits,
                                                         long(a[1].shape(3)) * L.group)
                                       : a[0].shape(2);
      for (int b = 0; b < B; ++b) {
        if (counts[j * B + b] > cap) {
          fail("a row's token count exceeds its segment's buffer (" +
               std::to_string(counts[j * B + b]) + " > " + std::to_string(cap) + ")");
        }
      }
      if (side == 0 && dim != D) {
        fail("keys' head dim differs from q's");
      }
      if (side == 1) {
        if (Dv >= 0 && dim != Dv) {
          fail("segments' value head dims differ");
        }
        Dv = dim;
      }
      for (int p = 0; p < parts_of(kind); ++p) {
        inputs.push_back(rows_contiguous(a[p], s));
      }
      i += parts_of(kind);
    }
  }
  for (size_t j = 0; j < counts.size(); ++j) {
    if (firsts[j] < 0 || counts[j] < 0) {
      fail("token counts and first tokens must be >= 0");
    }
  }
  if (sinks) {
    if (sinks->size() != size_t(H) * R) {
      fail("sinks must hold one logit per query head (H * R)");
    }
    inputs.push_back(rows_contiguous(mx::astype(mx::reshape(*sinks, {H * R}, s), mx::float32, s),
                                     s));
  }
  if (fault < NONE || fault > GROUP_OFFSET) {
    fail("unknown fault");
  }
  auto prim = std::make_shared<DecodeAttention>(mx::to_stream(s, mx::Device::cpu), layouts,
                                                counts, firsts, bool(sinks), split_tokens, fault);
  return mx::array({B, H, R, Dv}, mx::float32, prim, inputs);
}

std::vector<mx::Shape> DecodeAttention::output_shapes(const std::vector<mx::array>& inputs) {
  throw std::runtime_error("KVQDecodeAttention: output shapes are set when it is built");
}

bool DecodeAttention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DecodeAttention&>(other);
  if (layouts_.size() != o.layouts_.size()) {
    return false;
  }
  for (size_t j = 0; j < layouts_.size(); ++j) {
    const auto &a = layouts_[j], &b = o.layouts_[j];
    if (a.k_kind != b.k_kind || a.k_bits != b.k_bits || a.v_kind != b.v_kind ||
        a.v_bits != b.v_bits || a.group != b.group) {
      return false;
    }
  }
  return counts_ == o.counts_ && firsts_ == o.firsts_ && has_sinks_ == o.has_sinks_ &&
      split_tokens_ == o.split_tokens_ && fault_ == o.fault_;
}

void DecodeAttention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("KVQDecodeAttention runs on the CPU only");
}

void DecodeAttention::eval_cpu(const std::vector<mx::array>& inputs,
                               std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<mx::array> ins;
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
    ins.push_back(mx::array::unsafe_weak_copy(a));
  }
  encoder.set_output_array(out);
  encoder.dispatch([ins = std::move(ins), out = mx::array::unsafe_weak_copy(out),
                    layouts = layouts_, counts = counts_, firsts = firsts_,
                    has_sinks = has_sinks_, split = split_tokens_, fault = fault_]() mutable {
    const mx::array& q = ins[0];
    Step st;
    st.B = q.shape(0);
    st.H = q.shape(1);
    st.R = q.shape(2);
    st.D = q.shape(3);
    st.Dv = out.shape(3);
    st.split = split;
    st.fault = fault;
    st.q = q.data<float>();
    st.sinks = has_sinks ? ins.back().data<float>() : nullptr;
    st.out = out.data<float>();
    const long BH = long(st.B) * st.H;
    size_t i = 1;
    for (size_t j = 0; j < layouts.size(); ++j) {
      const auto& L = layouts[j];
      Segment sg;
      sg.group = L.group;
      sg.counts = counts.data() + j * st.B;
      sg.firsts = firsts.data() + j * st.B;
      for (int side = 0; side < 2; ++side) {
        Part& p = side == 0 ? sg.k : sg.v;
        p.kind = side == 0 ? L.k_kind : L.v_kind;
        p.bits = side == 0 ? L.k_bits : L.v_bits;
        const mx::array& a = ins[i];
        if (p.kind == FP) {
          p.dtype = a.dtype();
          p.fp = a.data<void>();
          p.head = long(a.size() / BH);
          p.T = a.shape(2);
        } else {
          p.unpack = unpacker(p.bits);
          p.codes = a.data<uint32_t>();
          p.scales = ins[i + 1].data<uint16_t>();
          p.biases = ins[i + 2].data<uint16_t>();
          p.head = long(a.size() / BH);
          p.scale_head = long(ins[i + 1].size() / BH);
          p.words = a.shape(3);
          p.groups = ins[i + 1].shape(3);
          p.T = a.shape(2);
        }
        i += parts_of(p.kind);
      }
      st.segs.push_back(sg);
    }
    compute(st);
  });
}

}  // namespace kvq
