// The table-batched embedding pooling kernels for AVX2 + FMA. Why the ISA is
// set by a pragma and not by -m flags: embedding_pool_avx512.cpp.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "embedding_pool.h"

namespace unirec {
namespace emb_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
constexpr int kWidestBlock = 64;  // 8 of the 16 ymm registers
#include "embedding_kernels.h"
#pragma GCC pop_options
}  // namespace emb_avx2

template <typename scalar_t, typename acc_t, typename index_t>
PoolBagsFn<scalar_t, index_t> pool_bags_avx2() {
  return &emb_avx2::pool_bags<scalar_t, acc_t, index_t>;
}
UNIREC_INSTANTIATE_POOL_BAGS(pool_bags_avx2)

}  // namespace unirec
