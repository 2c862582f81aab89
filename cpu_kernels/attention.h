// Decode attention over a quantized KV cache on the CPU: an MLX primitive.
//
// One call computes a whole decode step of one layer: every segment of the
// cache (16-bit sinks, the quantized body, the 16-bit residual) under one
// softmax, plus learned attention sinks, normalized. See attention.cpp for the
// design; mlx_kvq/cpu_kernels/__init__.py for the Python side.
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "mlx/backend/cpu/encoder.h"

namespace kvq {

namespace mx = mlx::core;

// How one segment stores its keys and values.
enum Kind : int {
  FP = 0,          // [B, H, T, D] float16 / bfloat16 / float32
  CHANNEL = 1,     // quantized along tokens: codes [B, H, D, T*bits/32],
                   // scales/biases [B, H, D, T/group] (per-channel keys)
  TOKEN = 2,       // quantized along channels: codes [B, H, T, D*bits/32],
                   // scales/biases [B, H, T, D/group]
};

// group: of the keys; v_group: of the values; k_hi: per-channel keys whose
// first k_hi channels are a part of their own at k_bits + 1 (outlier
// channels; 6 arrays: that part, then the other channels at k_bits).
struct SegmentLayout {
  int k_kind, k_bits, v_kind, v_bits, group, v_group, k_hi;
  bool operator==(const SegmentLayout&) const = default;
};

// out [B, H, R, Dv] float32 = softmax attention of q [B, H, R, D] (float32,
// already scaled) over, for each segment s and batch row b, the tokens
// [firsts[s*B + b], counts[s*B + b]) of the segment's buffers. `arrays`
// holds each segment's key parts then value parts (1 array for FP, 3 for a
// quantized kind, 6 for keys split by width). sinks: [H*R] logits of learned attention sinks or an
// empty array. split_tokens: tokens per unit of work (0: chosen from the
// machine's threads). fault: 0, or a deliberate fault for tests (attention.cpp).
mx::array decode_attention(
    const mx::array& q,
    const std::vector<mx::array>& arrays,
    const std::vector<SegmentLayout>& layouts,
    const std::vector<int>& counts,
    const std::vector<int>& firsts,
    const std::optional<mx::array>& sinks,
    int split_tokens,
    int fault = 0,
    mx::StreamOrDevice s = {});

int threads();

// A primitive's eval_cpu prologue: allocates `out`, registers the inputs and
// `out` with the encoder, and returns the inputs' weak copies its task reads.
std::vector<mx::array> encode_io(mx::cpu::CommandEncoder& encoder,
                                 const std::vector<mx::array>& inputs, mx::array& out);

// The checked, row-contiguous input arrays of cache segments read by queries
// of batch B, kv heads H and key head dim D (the value head dim goes to Dv):
// shared by the decode and prefill primitives.
std::vector<mx::array> segment_inputs(
    int B, int H, int D,
    const std::vector<mx::array>& arrays,
    const std::vector<SegmentLayout>& layouts,
    const std::vector<int>& counts,
    const std::vector<int>& firsts,
    mx::StreamOrDevice s,
    int& Dv);

// The inputs of an attention primitive: q as float32 (row-contiguous), the
// segments' checked arrays (segment_inputs), then the learned sinks' logits
// (one per query head, n_heads = H * R) when given.
std::vector<mx::array> attention_inputs(
    const mx::array& q, int n_heads, int B, int H, int D,
    const std::vector<mx::array>& arrays,
    const std::vector<SegmentLayout>& layouts,
    const std::vector<int>& counts,
    const std::vector<int>& firsts,
    const std::optional<mx::array>& sinks,
    mx::StreamOrDevice s,
    int& Dv);

class DecodeAttention : public mx::Primitive {
 public:
  DecodeAttention(
      mx::Stream stream,
      std::vector<SegmentLayout> layouts,
      std::vector<int> counts,
      std::vector<int> firsts,
      bool has_sinks,
      int split_tokens,
      int fault)
      : mx::Primitive(stream),
        layouts_(std::move(layouts)),
        counts_(std::move(counts)),
        firsts_(std::move(firsts)),
        has_sinks_(has_sinks),
        split_tokens_(split_tokens),
        fault_(fault) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "KVQDecodeAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  std::vector<SegmentLayout> layouts_;
  std::vector<int> counts_;
  std::vector<int> firsts_;
  bool has_sinks_;
  int split_tokens_;
  int fault_;
};

}  // namespace kvq
