// The table-batched embedding pooling kernels for the baseline ISA the whole
// extension is compiled for (SSE2 on x86-64 unless UNIREC_NATIVE=1).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "embedding_pool.h"

namespace unirec {
namespace emb_base {
constexpr int kWidestBlock = 64;
#include "embedding_kernels.h"
}  // namespace emb_base

template <typename scalar_t, typename acc_t, typename index_t>
PoolBagsFn<scalar_t, index_t> pool_bags_baseline() {
  return &emb_base::pool_bags<scalar_t, acc_t, index_t>;
}
UNIREC_INSTANTIATE_POOL_BAGS(pool_bags_baseline)

}  // namespace unirec
