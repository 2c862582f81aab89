// The CPU decode-attention kernel: see decode.h for the design.
#include "decode.h"

#include "pool.h"

namespace kvq {

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

namespace {

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
// nd channels of the part, q rows D apart; add: add to S instead of writing
// it (the second part of keys split by width).
template <int BITS, int RR>
void score_channel(const Part& k, long bh, int tb, int n, const float* q, int D, int nd,
                   int G, float* S, int fault, bool add) {
  const uint32_t* codes = k.codes + bh * k.head;
  const uint16_t* scales = k.scales + bh * k.scale_head;
  const uint16_t* biases = k.biases + bh * k.scale_head;
  // Every channel row is a stream of its own, more than a hardware
  // prefetcher follows: ask for the next block's bytes of each row now.
  const int next = tb + BLOCK;
  if (next < k.words * 32 / BITS) {
    for (int d = 0; d < nd; ++d) {
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
    for (int d = 0; d < nd; ++d) {
      unpack_run<BITS>(codes + long(d) * k.words, t, len, c);
      const float s = half_to_float(scales[long(d) * k.groups + gs]);
      const float b = half_to_float(biases[long(d) * k.groups + gs]);
      add_weighted_codes(acc, bsum, q + d, D, s, b, c);
    }
    for (int r = 0; r < RR; ++r) {
      float* Sr = S + r * BLOCK + i;
      for (int j = 0; j < len; ++j) {
        Sr[j] = (add ? Sr[j] : 0.0f) + acc[r][j] + bsum[r];
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

using ScoreChannel = void (*)(const Part&, long, int, int, const float*, int, int, int, float*,
                              int, bool);
using AccumulateValues = void (*)(const Part&, long, int, int, const float*, int, int, float*);

// The kernels of one code width, for 1 to ROWS rows at a time.
struct WidthKernels {
  Unpack unpack;
  ScoreChannel score[ROWS];
  AccumulateValues values[ROWS];
};

template <int BITS>
constexpr WidthKernels width_kernels = {
    unpack<BITS>,
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

}  // namespace

Unpack unpacker(int bits) {
  const bool known = bits >= 2 && bits <= 8 && bits != 7;
  return known ? kernels_for(bits).unpack : nullptr;
}

namespace {

// Scores S[r * BLOCK + i] = q_r . k_{tb + i} for n tokens from tb.
void score_block(const Step& st, const Segment& sg, long bh, int tb, int n,
                 const float* q, Scratch& sc) {
  const int R = st.R, D = st.D, G = sg.k_group;
  float* S = sc.S.data();
  const Part& k = sg.k;
  if (k.kind == CHANNEL) {
    const int hi = sg.k_hi;
    for (int r0 = 0; r0 < R; r0 += ROWS) {
      const int rr = std::min(ROWS, R - r0);
      const float* qr = q + r0 * D;
      float* Sr = S + r0 * BLOCK;
      kernels_for(k.bits).score[rr - 1](k, bh, tb, n, qr, D, hi ? hi : D, G, Sr, st.fault,
                                        false);
      if (hi) {  // the other channels, one bit narrower: their scores add
        kernels_for(sg.k_lo.bits).score[rr - 1](sg.k_lo, bh, tb, n, qr + hi, D, D - hi, G, Sr,
                                                st.fault, st.fault != SPLIT_OVERWRITE);
      }
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
  if (sg.v.kind == TOKEN && Dv % CC == 0 && sg.v_group % CC == 0) {
    for (int r0 = 0; r0 < R; r0 += ROWS) {
      const int rr = std::min(ROWS, R - r0);
      kernels_for(sg.v.bits).values[rr - 1](sg.v, bh, tb, n, S + r0 * BLOCK, Dv, sg.v_group,
                                       o + r0 * Dv);
    }
    return;
  }
  float* row = sc.row.data();
  for (int i = 0; i < n; ++i) {
    if (sg.v.kind == FP) {
      fp_row(sg.v, bh, tb + i, Dv, row);
    } else {
      token_row(sg.v, bh, tb + i, Dv, sg.v_group, row);
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

}  // namespace

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

}  // namespace kvq
