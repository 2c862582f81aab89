// Prefill attention over a quantized KV cache on the CPU: an MLX primitive.
//
// One call computes a prefill chunk of one layer: L queries per (batch row,
// query head) against every segment of the cache (16-bit sinks, the
// quantized body, the 16-bit residual; the chunk's own tokens are already in
// them), under the causal rule and the layer's window by absolute positions,
// plus learned attention sinks, normalized.
//
// Work: the queries of each (row, kv head) are cut into blocks of QB
// positions; a block takes all R query heads of the GQA group at those
// positions (R * QB rows that read the same keys and values). The blocks go
// to the pool's threads, the longest first. A block walks the tokens the
// union of its rows may see (the causal rule stops at its last position, a
// window starts at its first position's window), KB tokens at a time:
//   * the block's keys are dequantized once into a [D, KB] tile (channel
//     keys are stored that way: each channel row a stretch of tokens, scale
//     and bias per group of tokens), values into a [KB, Dv] tile;
//   * scores S = Q K^T and the update O += P V are register-tiled products
//     over the tiles (MR rows x NC columns held in registers);
//   * each row masks the tokens it may not see (its own causal limit and
//     window), then updates its online softmax (running max m, sum l,
//     output o rescaled when m grows).
// The learned sinks start each row's softmax (m = sink, l = 1, o = 0); the
// rows end as o / l (0 for a row that sees no token). Nothing is merged
// across threads: a block owns its rows.
#pragma once

#include <vector>

#include "attention.h"
#include "decode.h"

namespace kvq {

// A deliberate fault of the prefill kernel beyond decode's 1-4 (1 skips the
// online softmax's rescaling, 2 gives every row the first row's counts and
// positions, 3 ignores the window, 4 reads the next group's key scales):
// 5 lets each query see the token after it, 6 reads the wider channels of
// keys split by width at the narrower width (decode's 5 concerns the merge
// of split keys' scores, which prefill does not have: it dequantizes them).
enum PrefillFault : int { CAUSAL = 5, SPLIT_WIDTH = 6 };

struct Prefill {
  int B, H, R, L, D, Dv, fault;
  bool causal;
  int window;                 // tokens a query sees back from itself; 0: no window
  const float* q;             // [B, H, R, L, D], scaled
  const float* sinks;         // [H * R] or nullptr
  std::vector<Segment> segs;  // counts/firsts per row as in decode
  const int* starts;          // [n_seg * B] absolute position of each segment's token 0
  const int* q0;              // [B] absolute position of each row's first query
  float* out;                 // [B, H, R, L, Dv]
};

// Attention of every query of a chunk, written to st.out.
void compute_prefill(const Prefill& st);

// out [B, H, R, L, Dv] float32: attention of q [B, H, R, L, D] (float32,
// scaled) over the segments (as decode_attention takes them: keys split by
// width, values with a group of their own), query i of
// row b at position q0[b] + i, token t of segment s at starts[s * B + b] + t.
// causal: a query sees no later position; window > 0: nor a position
// `window` or more before its own.
mx::array prefill_attention(
    const mx::array& q,
    const std::vector<mx::array>& arrays,
    const std::vector<SegmentLayout>& layouts,
    const std::vector<int>& counts,
    const std::vector<int>& firsts,
    const std::vector<int>& starts,
    const std::vector<int>& q0,
    bool causal,
    int window,
    const std::optional<mx::array>& sinks,
    int fault = 0,
    mx::StreamOrDevice s = {});

class PrefillAttention : public mx::Primitive {
 public:
  PrefillAttention(mx::Stream stream, std::vector<SegmentLayout> layouts,
                   std::vector<int> counts, std::vector<int> firsts, std::vector<int> starts,
                   std::vector<int> q0, bool causal, int window, bool has_sinks, int fault)
      : mx::Primitive(stream),
        layouts_(std::move(layouts)),
        counts_(std::move(counts)),
        firsts_(std::move(firsts)),
        starts_(std::move(starts)),
        q0_(std::move(q0)),
        causal_(causal),
        window_(window),
        has_sinks_(has_sinks),
        fault_(fault) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "KVQPrefillAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  std::vector<SegmentLayout> layouts_;
  std::vector<int> counts_, firsts_, starts_, q0_;
  bool causal_;
  int window_;
  bool has_sinks_;
  int fault_;
};

}  // namespace kvq
