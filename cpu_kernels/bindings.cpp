// Python bindings of the CPU attention kernel (module mlx_kvq.cpu_kernels._native).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "attention.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

NB_MODULE(_native, m) {
  m.doc() = "mlx_kvq's native CPU kernels: decode attention over the quantized cache.";
  m.def(
      "decode_attention",
      [](const mx::array& q, const std::vector<mx::array>& arrays,
         const std::vector<std::vector<int>>& layouts,
         const std::vector<int>& counts, const std::vector<int>& firsts,
         const std::optional<mx::array>& sinks, int split_tokens, int fault) {
        std::vector<kvq::SegmentLayout> ls;
        for (const auto& l : layouts) {  // (k_kind, k_bits, v_kind, v_bits, group[, v_group, k_hi])
          if (l.size() != 5 && l.size() != 7) {
            throw std::invalid_argument("a segment layout has 5 or 7 entries");
          }
          ls.push_back({l[0], l[1], l[2], l[3], l[4], l.size() == 7 ? l[5] : l[4],
                        l.size() == 7 ? l[6] : 0});
        }
        return kvq::decode_attention(q, arrays, ls, counts, firsts, sinks, split_tokens, fault);
      },
      "q"_a, "arrays"_a, "layouts"_a, "counts"_a, "firsts"_a, "sinks"_a = nb::none(),
      "split_tokens"_a = 0, "fault"_a = 0,
      "Decode attention over cache segments; see mlx_kvq.cpu_kernels.decode_attention.");
  m.def("threads", &kvq::threads, "Threads of the kernel's pool (MLX_KVQ_THREADS overrides).");
}
