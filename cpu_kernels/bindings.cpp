// Python bindings of the CPU attention kernel (module mlx_kvq.cpu_kernels._native).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "attention.h"
#include "prefill.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

namespace {

// Segment layouts as Python gives them: (k_kind, k_bits, v_kind, v_bits,
// group[, v_group, k_hi]), 5 entries meaning v_group = group and k_hi = 0.
std::vector<kvq::SegmentLayout> layouts_of(const std::vector<std::vector<int>>& layouts) {
  std::vector<kvq::SegmentLayout> ls;
  for (const auto& l : layouts) {
    if (l.size() != 5 && l.size() != 7) {
      throw std::invalid_argument(
          "a segment layout has 5 entries (k_kind, k_bits, v_kind, v_bits, group) or 7 "
          "(then v_group, k_hi), got " + std::to_string(l.size()));
    }
    ls.push_back({l[0], l[1], l[2], l[3], l[4], l.size() == 7 ? l[5] : l[4],
                  l.size() == 7 ? l[6] : 0});
  }
  return ls;
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "mlx_kvq's native CPU kernels: decode and prefill attention over the quantized cache.";
  m.def(
      "decode_attention",
      [](const mx::array& q, const std::vector<mx::array>& arrays,
         const std::vector<std::vector<int>>& layouts,
         const std::vector<int>& counts, const std::vector<int>& firsts,
         const std::optional<mx::array>& sinks, int split_tokens, int fault) {
        return kvq::decode_attention(q, arrays, layouts_of(layouts), counts, firsts, sinks,
                                     split_tokens, fault);
      },
      "q"_a, "arrays"_a, "layouts"_a, "counts"_a, "firsts"_a, "sinks"_a = nb::none(),
      "split_tokens"_a = 0, "fault"_a = 0,
      "Decode attention over cache segments; see mlx_kvq.cpu_kernels.decode_attention.");
  m.def(
      "prefill_attention",
      [](const mx::array& q, const std::vector<mx::array>& arrays,
         const std::vector<std::vector<int>>& layouts,
         const std::vector<int>& counts, const std::vector<int>& firsts,
         const std::vector<int>& starts, const std::vector<int>& q0, bool causal, int window,
         const std::optional<mx::array>& sinks, int fault) {
        return kvq::prefill_attention(q, arrays, layouts_of(layouts), counts, firsts, starts,
                                      q0, causal, window, sinks, fault);
      },
      "q"_a, "arrays"_a, "layouts"_a, "counts"_a, "firsts"_a, "starts"_a, "q0"_a,
      "causal"_a = true, "window"_a = 0, "sinks"_a = nb::none(), "fault"_a = 0,
      "Prefill attention over cache segments; see mlx_kvq.cpu_kernels.prefill_attention.");
  m.def("threads", &kvq::threads, "Threads of the kernel's pool (MLX_KVQ_THREADS overrides).");
}
