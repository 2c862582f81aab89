// The CPU decode-attention kernel (flash decoding): what it reads and how.
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
#pragma once

#include <limits>
#include <vector>

#include "attention.h"
#include "codes.h"

namespace kvq {

constexpr int BLOCK = 128;        // tokens scored together
constexpr int MIN_SPLIT = 256;    // fewest tokens a part takes (automatic splits)
constexpr int PARTS_PER_THREAD = 4;
// Below this many token-rows of work a step runs on the calling thread:
// waking the pool would cost more than it saves.
constexpr long INLINE_WORK = 1 << 13;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

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
  Part k_lo;      // with k_hi: channels [k_hi, D) of per-channel keys (k: [0, k_hi))
  int k_hi = 0;
  int k_group = 32, v_group = 32;
  const int* counts = nullptr;  // [B]
  const int* firsts = nullptr;  // [B]
};

// Deliberate faults, for tests that show broken variants fail: 1 merges
// parts without rescaling, 2 gives every row the first row's token counts,
// 3 ignores the window's first tokens, 4 reads the next group's scales, 5
// lets the second part of split keys overwrite the first's scores.
enum Fault : int {
  NONE = 0, MERGE = 1, ROW_COUNT = 2, WINDOW = 3, GROUP_OFFSET = 4, SPLIT_OVERWRITE = 5
};

struct Step {
  int B, H, R, D, Dv, split, fault;
  const float* q;
  const float* sinks;
  std::vector<Segment> segs;
  float* out;
};

// Token t of (row, head) bh of an FP part as D float32 values.
void fp_row(const Part& p, long bh, int t, int D, float* out);
// Token t of (row, head) bh of a TOKEN part, dequantized (group G): D values.
void token_row(const Part& p, long bh, int t, int D, int G, float* out);

// The unpacker of a code width the kernel has (2, 3, 4, 5, 6, 8), else nullptr.
Unpack unpacker(int bits);

// The kernel's view of the segments whose arrays are ins[i], ins[i + 1], ...
// (as segment_inputs made them), with counts/firsts [n_seg * B].
std::vector<Segment> segments_of(const std::vector<mx::array>& ins, size_t i,
                                 const std::vector<SegmentLayout>& layouts, const int* counts,
                                 const int* firsts, int B, int H);

// Attention of every (row, head) of a step over its segments, written to
// st.out: parts on the pool's threads, then the merge.
void compute(Step& st);

}  // namespace kvq
