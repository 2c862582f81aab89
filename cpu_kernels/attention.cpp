// Decode attention over a quantized KV cache on the CPU: the MLX primitive
// (checks, inputs, evaluation on the CPU stream). The kernel: decode.cpp.
#include "attention.h"

#include <sstream>
#include <stdexcept>

#include "decode.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"

namespace kvq {
namespace {

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
  throw std::invalid_argument("[mlx_kvq.cpu_kernels] " + what);
}

// Arrays of one side of a segment: 1 (FP), 3, or 6 (keys split by width).
int parts_of(int kind, int hi) {
  return parts_of(kind) * (hi ? 2 : 1);
}

// The head dim of a part (D for keys, Dv for values).
int part_dim(int kind, int bits, const mx::array* a, int hi = 0) {
  if (kind == FP) {
    return a[0].shape(3);
  }
  if (kind == CHANNEL) {
    return a[0].shape(2) + (hi ? a[3].shape(2) : 0);
  }
  return a[0].shape(3) * 32 / bits;
}

}  // namespace

std::vector<Segment> segments_of(const std::vector<mx::array>& ins, size_t i,
                                 const std::vector<SegmentLayout>& layouts, const int* counts,
                                 const int* firsts, int B, int H) {
  const long BH = long(B) * H;
  std::vector<Segment> segs;
  for (size_t j = 0; j < layouts.size(); ++j) {
    const auto& L = layouts[j];
    Segment sg;
    sg.k_group = L.group;
    sg.v_group = L.v_group;
    sg.k_hi = L.k_hi;
    sg.counts = counts + j * B;
    sg.firsts = firsts + j * B;
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
        auto quantized = [&](Part& part, size_t at, int bits) {
          part.kind = p.kind;
          part.bits = bits;
          part.unpack = unpacker(bits);
          part.codes = ins[at].data<uint32_t>();
          part.scales = ins[at + 1].data<uint16_t>();
          part.biases = ins[at + 2].data<uint16_t>();
          part.head = long(ins[at].size() / BH);
          part.scale_head = long(ins[at + 1].size() / BH);
          part.words = ins[at].shape(3);
          part.groups = ins[at + 1].shape(3);
          part.T = ins[at].shape(2);
        };
        const bool split = side == 0 && L.k_hi;
        const int bits = p.bits;
        quantized(p, i, split ? bits + 1 : bits);
        if (split) {  // the other channels, one bit narrower
          quantized(sg.k_lo, i + 3, bits);
        }
      }
      i += parts_of(p.kind, side == 0 ? L.k_hi : 0);
    }
    segs.push_back(sg);
  }
  return segs;
}

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
  int Dv = -1;
  auto inputs = attention_inputs(q, H * R, B, H, D, arrays, layouts, counts, firsts, sinks, s, Dv);
  if (fault < NONE || fault > SPLIT_OVERWRITE) {
    fail("unknown fault");
  }
  auto prim = std::make_shared<DecodeAttention>(mx::to_stream(s, mx::Device::cpu), layouts,
                                                counts, firsts, bool(sinks), split_tokens, fault);
  return mx::array({B, H, R, Dv}, mx::float32, prim, inputs);
}

std::vector<mx::array> attention_inputs(
    const mx::array& q, int n_heads, int B, int H, int D,
    const std::vector<mx::array>& arrays,
    const std::vector<SegmentLayout>& layouts,
    const std::vector<int>& counts,
    const std::vector<int>& firsts,
    const std::optional<mx::array>& sinks,
    mx::StreamOrDevice s,
    int& Dv) {
  std::vector<mx::array> inputs = {rows_contiguous(mx::astype(q, mx::float32, s), s)};
  for (auto& a : segment_inputs(B, H, D, arrays, layouts, counts, firsts, s, Dv)) {
    inputs.push_back(std::move(a));
  }
  if (sinks) {
    if (sinks->size() != size_t(n_heads)) {
      fail("sinks must hold one logit per query head (H * R)");
    }
    inputs.push_back(rows_contiguous(
        mx::astype(mx::reshape(*sinks, {n_heads}, s), mx::float32, s), s));
  }
  return inputs;
}

std::vector<mx::array> encode_io(mx::cpu::CommandEncoder& encoder,
                                 const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  std::vector<mx::array> ins;
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
    ins.push_back(mx::array::unsafe_weak_copy(a));
  }
  encoder.set_output_array(out);
  return ins;
}

std::vector<mx::array> segment_inputs(
    int B, int H, int D,
    const std::vector<mx::array>& arrays,
    const std::vector<SegmentLayout>& layouts,
    const std::vector<int>& counts,
    const std::vector<int>& firsts,
    mx::StreamOrDevice s,
    int& Dv) {
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
    if (L.k_hi < 0 || (L.k_hi && L.k_kind != CHANNEL)) {
      fail("only per-channel keys split their channels by width (k_hi)");
    }
    for (int kind_bits : {L.k_kind == FP ? 0 : L.k_bits, L.v_kind == FP ? 0 : L.v_bits,
                          L.k_hi ? L.k_bits + 1 : 0}) {
      if (kind_bits && !unpacker(kind_bits)) {
        fail("bits must be 2, 3, 4, 5, 6 or 8, got " + std::to_string(kind_bits));
      }
    }
    need += parts_of(L.k_kind, L.k_hi) + parts_of(L.v_kind);
  }
  if (arrays.size() != need) {
    fail("expected " + std::to_string(need) + " arrays for these segments, got " +
         std::to_string(arrays.size()));
  }
  std::vector<mx::array> inputs;
  Dv = -1;
  size_t i = 0;
  for (size_t j = 0; j < n_seg; ++j) {
    const auto& L = layouts[j];
    for (int side = 0; side < 2; ++side) {
      const int kind = side == 0 ? L.k_kind : L.v_kind;
      const int bits = side == 0 ? L.k_bits : L.v_bits;
      const int group = side == 0 ? L.group : L.v_group;
      const int hi = side == 0 ? L.k_hi : 0;
      const int n_parts = parts_of(kind, hi);
      const mx::array* a = &arrays[i];
      for (int p = 0; p < n_parts; ++p) {
        if (a[p].ndim() != 4 || a[p].shape(0) != B || a[p].shape(1) != H) {
          fail("every cache array must be [B, H, ., .] with q's B and H");
        }
      }
      if (kind == FP && a[0].dtype() != mx::float16 && a[0].dtype() != mx::bfloat16 &&
          a[0].dtype() != mx::float32) {
        fail("16-bit parts must be float16, bfloat16 or float32");
      }
      if (kind != FP) {
        for (int p = 0; p < n_parts; p += 3) {
          if (a[p].dtype() != mx::uint32 || a[p + 1].dtype() != mx::float16 ||
              a[p + 2].dtype() != mx::float16) {
            fail("quantized parts are (uint32 codes, float16 scales, float16 biases)");
          }
        }
        if (group <= 0 || (kind == TOKEN && part_dim(kind, bits, a) % group)) {
          fail("the group must divide the head dim of per-token parts");
        }
        if (hi && a[0].shape(2) != hi) {
          fail("the first part of split keys must hold k_hi channels");
        }
      }
      const int dim = part_dim(kind, bits, a, hi);
      long cap = kind == CHANNEL ? std::min<long>(long(a[0].shape(3)) * 32 / (bits + (hi > 0)),
                                                   long(a[1].shape(3)) * group)
                                 : a[0].shape(2);
      if (hi) {
        cap = std::min<long>({cap, long(a[3].shape(3)) * 32 / bits, long(a[4].shape(3)) * group});
      }
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
      for (int p = 0; p < n_parts; ++p) {
        inputs.push_back(rows_contiguous(a[p], s));
      }
      i += n_parts;
    }
  }
  for (size_t j = 0; j < counts.size(); ++j) {
    if (firsts[j] < 0 || counts[j] < 0) {
      fail("token counts and first tokens must be >= 0");
    }
  }
  return inputs;
}

std::vector<mx::Shape> DecodeAttention::output_shapes(const std::vector<mx::array>& inputs) {
  throw std::runtime_error("KVQDecodeAttention: output shapes are set when it is built");
}

bool DecodeAttention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DecodeAttention&>(other);
  return layouts_ == o.layouts_ && counts_ == o.counts_ && firsts_ == o.firsts_ &&
      has_sinks_ == o.has_sinks_ && split_tokens_ == o.split_tokens_ && fault_ == o.fault_;
}

void DecodeAttention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("KVQDecodeAttention runs on the CPU only");
}

void DecodeAttention::eval_cpu(const std::vector<mx::array>& inputs,
                               std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  auto& encoder = mx::cpu::get_command_encoder(stream());
  auto ins = encode_io(encoder, inputs, out);
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
    st.segs = segments_of(ins, 1, layouts, counts.data(), firsts.data(), st.B, st.H);
    compute(st);
  });
}

}  // namespace kvq
