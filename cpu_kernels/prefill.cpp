// The CPU prefill-attention kernel and its MLX primitive: see prefill.h.
#include "prefill.h"

#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"

namespace kvq {
namespace {

constexpr int KB = 64;          // key tokens per tile (a multiple of 8)
constexpr int MR = 4;           // rows of a register tile
constexpr int NC = 16;          // columns of a register tile
constexpr int BLOCK_ROWS = 192; // about R * QB rows per block of queries

struct Tiles {
  std::vector<float> q, kt, v, s, o, m, l, row;
  std::vector<long> pos;
  void fit(int rows, int D, int Dv) {
    q.assign(size_t(rows) * D, 0.0f);
    kt.resize(size_t(D) * KB);
    v.resize(size_t(KB) * Dv);
    s.resize(size_t(rows) * KB);
    o.resize(size_t(rows) * Dv);
    m.resize(rows);
    l.resize(rows);
    row.resize(std::max(D, Dv));
    pos.resize(rows);
  }
};

// Channel-key codes [tb, tb + n) of one channel row, 16 at a time where
// aligned, else through the width's unpacker.
template <int BITS>
void unpack_tokens(const Part& k, const uint32_t* row, int tb, int n, float* out) {
  int j = 0;
  for (; j < n && (tb + j) % 16; ++j) {
    k.unpack(row, tb + j, 1, out + j);
  }
  for (; j + 16 <= n; j += 16) {
    unpack16<BITS>(row, tb + j, out + j);
  }
  if (j < n) {
    k.unpack(row, tb + j, n - j, out + j);
  }
}

// Channel row d's keys of tokens [tb, tb + n), dequantized into out[0, n)
// and zero to KB: row `d` of part k (codes, scales and biases of its own).
void channel_keys(const Part& k, long bh, int d, int tb, int n, int G, int fault, float* out) {
  const uint32_t* row = k.codes + bh * k.head + long(d) * k.words;
  const uint16_t* scales = k.scales + bh * k.scale_head + long(d) * k.groups;
  const uint16_t* biases = k.biases + bh * k.scale_head + long(d) * k.groups;
  switch (k.bits) {
    case 2: unpack_tokens<2>(k, row, tb, n, out); break;
    case 3: unpack_tokens<3>(k, row, tb, n, out); break;
    case 4: unpack_tokens<4>(k, row, tb, n, out); break;
    case 5: unpack_tokens<5>(k, row, tb, n, out); break;
    case 6: unpack_tokens<6>(k, row, tb, n, out); break;
    default: unpack_tokens<8>(k, row, tb, n, out);
  }
  for (int j = 0; j < n;) {
    const int g = (tb + j) / G, len = std::min(n - j, (g + 1) * G - tb - j);
    const int gs = fault == GROUP_OFFSET ? std::min(g + 1, k.groups - 1) : g;
    const float s = half_to_float(scales[gs]), b = half_to_float(biases[gs]);
    for (int i = j; i < j + len; ++i) {
      out[i] = out[i] * s + b;
    }
    j += len;
  }
  std::fill(out + n, out + KB, 0.0f);
}

// Keys of tokens [tb, tb + n) of a segment as the tile kt[d * KB + j], zero
// past n. Keys split by width hold channels [0, k_hi) in sg.k (one bit
// wider) and [k_hi, D) in sg.k_lo, each part with its own scales.
void load_keys(const Segment& sg, long bh, int tb, int n, int D, int fault, Tiles& t) {
  const Part& k = sg.k;
  const int G = sg.k_group;
  float* kt = t.kt.data();
  if (k.kind == CHANNEL) {
    Part wide = k;
    if (sg.k_hi && fault == SPLIT_WIDTH) {  // the wide channels read at the narrow width
      wide.bits = sg.k_lo.bits;
      wide.unpack = sg.k_lo.unpack;
    }
    for (int d = 0; d < D; ++d) {
      if (sg.k_hi && d >= sg.k_hi) {
        channel_keys(sg.k_lo, bh, d - sg.k_hi, tb, n, G, fault, kt + d * KB);
      } else {
        channel_keys(wide, bh, d, tb, n, G, fault, kt + d * KB);
      }
    }
    return;
  }
  float* row = t.row.data();
  for (int j = 0; j < n; ++j) {
    if (k.kind == FP) {
      fp_row(k, bh, tb + j, D, row);
    } else {
      token_row(k, bh, tb + j, D, G, row);
    }
    for (int d = 0; d < D; ++d) {
      kt[d * KB + j] = row[d];
    }
  }
  for (int d = 0; d < D; ++d) {
    std::fill(kt + d * KB + n, kt + (d + 1) * KB, 0.0f);
  }
}

// Values of tokens [tb, tb + n) as the tile v[j * Dv + c].
void load_values(const Part& v, long bh, int tb, int n, int Dv, int G, Tiles& t) {
  for (int j = 0; j < n; ++j) {
    float* out = t.v.data() + size_t(j) * Dv;
    if (v.kind == FP) {
      fp_row(v, bh, tb + j, Dv, out);
    } else {
      token_row(v, bh, tb + j, Dv, G, out);
    }
  }
}

// s[r * KB + j] = q_r . k_j for rows [0, rows) (a multiple of MR) and the
// tile's first nc columns (a multiple of NC).
void score_tiles(const float* q, int rows, int D, const float* kt, int nc, float* s) {
  for (int r0 = 0; r0 < rows; r0 += MR) {
    const float* qr = q + size_t(r0) * D;
    for (int j0 = 0; j0 < nc; j0 += NC) {
      float acc[MR][NC] = {};
      for (int d = 0; d < D; ++d) {
        const float* k = kt + d * KB + j0;
        for (int r = 0; r < MR; ++r) {
          const float x = qr[r * D + d];
          for (int j = 0; j < NC; ++j) {
            acc[r][j] += x * k[j];
          }
        }
      }
      for (int r = 0; r < MR; ++r) {
        std::copy(acc[r], acc[r] + NC, s + size_t(r0 + r) * KB + j0);
      }
    }
  }
}

// o[r] += sum_j p[r * KB + j] * v_j over the tile's n tokens.
void accumulate_tiles(const float* p, int rows, const float* v, int n, int Dv, float* o) {
  const int wide = Dv / NC * NC;
  for (int r0 = 0; r0 < rows; r0 += MR) {
    for (int c0 = 0; c0 < wide; c0 += NC) {
      float acc[MR][NC];
      for (int r = 0; r < MR; ++r) {
        std::copy(o + size_t(r0 + r) * Dv + c0, o + size_t(r0 + r) * Dv + c0 + NC, acc[r]);
      }
      for (int j = 0; j < n; ++j) {
        const float* vj = v + size_t(j) * Dv + c0;
        for (int r = 0; r < MR; ++r) {
          const float w = p[size_t(r0 + r) * KB + j];
          for (int c = 0; c < NC; ++c) {
            acc[r][c] += w * vj[c];
          }
        }
      }
      for (int r = 0; r < MR; ++r) {
        std::copy(acc[r], acc[r] + NC, o + size_t(r0 + r) * Dv + c0);
      }
    }
    for (int c = wide; c < Dv; ++c) {
      for (int r = r0; r < r0 + MR; ++r) {
        float sum = 0.0f;
        for (int j = 0; j < n; ++j) {
          sum += p[size_t(r) * KB + j] * v[size_t(j) * Dv + c];
        }
        o[size_t(r) * Dv + c] += sum;
      }
    }
  }
}

struct Block {
  int bh, l0, nq;
};

// The online softmax of `rows` rows over one tile of tokens [tb, tb + n) of
// a segment whose token 0 sits at `start`: each row keeps the tokens its
// position may see, s becomes the weights p (0 where hidden).
void softmax_update(const Prefill& st, int rows, int real, long start, int tb, int n,
                    Tiles& t) {
  for (int r = 0; r < rows; ++r) {
    float* sr = t.s.data() + size_t(r) * KB;
    long lo = tb, hi = tb + n;
    if (r < real) {
      const long p = t.pos[r];
      if (st.causal) {
        hi = std::min(hi, p - start + 1 + (st.fault == CAUSAL));
      }
      if (st.window > 0 && st.fault != WINDOW) {
        lo = std::max(lo, p - st.window + 1 - start);
      }
    }
    if (r >= real || lo >= hi) {
      std::fill(sr, sr + KB, 0.0f);
      continue;
    }
    const int a = int(lo - tb), e = int(hi - tb);
    // Hidden tokens become -inf, then 0 through the exp; 8 partial maxima
    // and sums keep the loops vectorized (no reassociation asked).
    std::fill(sr, sr + a, NEG_INF);
    std::fill(sr + e, sr + KB, NEG_INF);
    float m8[8], s8[8];
    std::fill(m8, m8 + 8, NEG_INF);
    std::fill(s8, s8 + 8, 0.0f);
    for (int j = 0; j < KB; j += 8) {
      for (int i = 0; i < 8; ++i) {
        m8[i] = sr[j + i] > m8[i] ? sr[j + i] : m8[i];
      }
    }
    const float mn = std::max(t.m[r], *std::max_element(m8, m8 + 8));
    const float alpha = st.fault == MERGE ? 1.0f : exp_nonpositive(t.m[r] - mn);
    for (int j = 0; j < KB; ++j) {
      sr[j] = exp_nonpositive(sr[j] - mn);
    }
    for (int j = 0; j < KB; j += 8) {
      for (int i = 0; i < 8; ++i) {
        s8[i] += sr[j + i];
      }
    }
    float sum = 0.0f;
    for (int i = 0; i < 8; ++i) {
      sum += s8[i];
    }
    t.l[r] = t.l[r] * alpha + sum;
    if (alpha != 1.0f) {
      float* orow = t.o.data() + size_t(r) * st.Dv;
      for (int c = 0; c < st.Dv; ++c) {
        orow[c] *= alpha;
      }
    }
    t.m[r] = mn;
  }
}

void run_block(const Prefill& st, const Block& blk) {
  thread_local Tiles t;
  const int R = st.R, D = st.D, Dv = st.Dv, nq = blk.nq;
  const int real = R * nq, rows = (real + MR - 1) / MR * MR;
  t.fit(rows, D, Dv);
  const int b = st.fault == ROW_COUNT ? 0 : blk.bh / st.H, h = blk.bh % st.H;
  for (int r = 0; r < R; ++r) {
    const float* src = st.q + ((size_t(blk.bh) * R + r) * st.L + blk.l0) * D;
    std::copy(src, src + size_t(nq) * D, t.q.data() + size_t(r) * nq * D);
    for (int i = 0; i < nq; ++i) {
      t.pos[r * nq + i] = long(st.q0[b]) + blk.l0 + i;
      t.m[r * nq + i] = st.sinks ? st.sinks[h * R + r] : NEG_INF;
      t.l[r * nq + i] = st.sinks ? 1.0f : 0.0f;
    }
  }
  std::fill(t.m.begin() + real, t.m.end(), NEG_INF);
  std::fill(t.l.begin() + real, t.l.end(), 0.0f);
  std::fill(t.o.begin(), t.o.end(), 0.0f);
  const long p_first = long(st.q0[b]) + blk.l0, p_last = p_first + nq - 1;
  for (size_t j = 0; j < st.segs.size(); ++j) {
    const Segment& sg = st.segs[j];
    const long start = st.starts[j * st.B + b];
    long lo = sg.firsts[b], hi = sg.counts[b];
    if (st.causal) {
      hi = std::min(hi, p_last - start + 1 + (st.fault == CAUSAL));
    }
    if (st.window > 0 && st.fault != WINDOW) {
      lo = std::max(lo, p_first - st.window + 1 - start);
    }
    lo = std::max(0L, lo);
    if (lo >= hi) {
      continue;  // the block's rows see none of this segment
    }
    for (long a = lo / KB * KB; a < hi; a += KB) {
      const int tb = int(std::max(a, lo)), n = int(std::min(a + KB, hi) - tb);
      load_keys(sg, blk.bh, tb, n, D, st.fault, t);
      score_tiles(t.q.data(), rows, D, t.kt.data(), (n + NC - 1) / NC * NC, t.s.data());
      softmax_update(st, rows, real, start, tb, n, t);
      load_values(sg.v, blk.bh, tb, n, Dv, sg.v_group, t);
      accumulate_tiles(t.s.data(), rows, t.v.data(), n, Dv, t.o.data());
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < nq; ++i) {
      const int ri = r * nq + i;
      float* dst = st.out + ((size_t(blk.bh) * R + r) * st.L + blk.l0 + i) * Dv;
      const float inv = t.l[ri] > 0.0f ? 1.0f / t.l[ri] : 0.0f;
      const float* orow = t.o.data() + size_t(ri) * Dv;
      for (int c = 0; c < Dv; ++c) {
        dst[c] = orow[c] * inv;
      }
    }
  }
}

}  // namespace

void compute_prefill(const Prefill& st) {
  const int qb = std::max(4, BLOCK_ROWS / st.R);
  std::vector<Block> blocks;
  // The latest queries see the most tokens under the causal rule: first.
  for (int l0 = (st.L - 1) / qb * qb; l0 >= 0; l0 -= qb) {
    for (int bh = 0; bh < st.B * st.H; ++bh) {
      blocks.push_back({bh, l0, std::min(qb, st.L - l0)});
    }
  }
  long work = 0;
  for (const Segment& sg : st.segs) {
    for (int b = 0; b < st.B; ++b) {
      work += sg.counts[b];
    }
  }
  work *= long(st.H) * st.R * st.L;
  auto one = [&](int i) { run_block(st, blocks[i]); };
  if (work < INLINE_WORK) {
    for (size_t i = 0; i < blocks.size(); ++i) {
      one(int(i));
    }
  } else {
    Pool::get().run(int(blocks.size()), one);
  }
}

namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("[mlx_kvq.cpu_kernels.prefill_attention] " + what);
}

}  // namespace

mx::array prefill_attention(const mx::array& q, const std::vector<mx::array>& arrays,
                            const std::vector<SegmentLayout>& layouts,
                            const std::vector<int>& counts, const std::vector<int>& firsts,
                            const std::vector<int>& starts, const std::vector<int>& q0,
                            bool causal, int window, const std::optional<mx::array>& sinks,
                            int fault, mx::StreamOrDevice s) {
  if (q.ndim() != 5) {
    fail("q must be [B, H, R, L, D]");
  }
  const int B = q.shape(0), H = q.shape(1), R = q.shape(2), L = q.shape(3), D = q.shape(4);
  if (layouts.empty()) {
    fail("no segments");
  }
  if (starts.size() != layouts.size() * B || q0.size() != size_t(B)) {
    fail("starts need one entry per segment and batch row, q0 one per batch row");
  }
  if (window < 0) {
    fail("window must be >= 0 (0: no window)");
  }
  if (fault < NONE || fault > SPLIT_WIDTH) {
    fail("unknown fault");
  }
  auto cpu = mx::to_stream(s, mx::Device::cpu);
  int Dv = -1;
  auto inputs = attention_inputs(q, H * R, B, H, D, arrays, layouts, counts, firsts, sinks, cpu,
                                 Dv);
  auto prim = std::make_shared<PrefillAttention>(cpu, layouts, counts, firsts, starts, q0,
                                                 causal, window, bool(sinks), fault);
  return mx::array({B, H, R, L, Dv}, mx::float32, prim, inputs);
}

std::vector<mx::Shape> PrefillAttention::output_shapes(const std::vector<mx::array>&) {
  throw std::runtime_error("KVQPrefillAttention: output shapes are set when it is built");
}

bool PrefillAttention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const PrefillAttention&>(other);
  return layouts_ == o.layouts_ && counts_ == o.counts_ && firsts_ == o.firsts_ &&
      starts_ == o.starts_ && q0_ == o.q0_ && causal_ == o.causal_ && window_ == o.window_ &&
      has_sinks_ == o.has_sinks_ && fault_ == o.fault_;
}

void PrefillAttention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("KVQPrefillAttention runs on the CPU only");
}

void PrefillAttention::eval_cpu(const std::vector<mx::array>& inputs,
                                std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  auto& encoder = mx::cpu::get_command_encoder(stream());
  auto ins = encode_io(encoder, inputs, out);
  encoder.dispatch([ins = std::move(ins), out = mx::array::unsafe_weak_copy(out),
                    layouts = layouts_, counts = counts_, firsts = firsts_, starts = starts_,
                    q0 = q0_, causal = causal_, window = window_, has_sinks = has_sinks_,
                    fault = fault_]() mutable {
    const mx::array& q = ins[0];
    Prefill st;
    st.B = q.shape(0);
    st.H = q.shape(1);
    st.R = q.shape(2);
    st.L = q.shape(3);
    st.D = q.shape(4);
    st.Dv = out.shape(4);
    st.fault = fault;
    st.causal = causal;
    st.window = window;
    st.q = q.data<float>();
    st.sinks = has_sinks ? ins.back().data<float>() : nullptr;
    st.out = out.data<float>();
    st.starts = starts.data();
    st.q0 = q0.data();
    st.segs = segments_of(ins, 1, layouts, counts.data(), firsts.data(), st.B, st.H);
    compute_prefill(st);
  });
}

}  // namespace kvq
