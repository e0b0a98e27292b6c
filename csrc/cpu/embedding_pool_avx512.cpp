// The table-batched embedding pooling kernels for AVX-512 (F, VL, BW, DQ).
//
// The ISA is chosen by `#pragma GCC target` around the kernels, not by -m flags
// for the whole file: the standard and c10 headers above it stay compiled for
// the baseline ISA, so an inline function of theirs that the compiler emits out
// of line here (one copy kept at link time for every file) cannot carry AVX-512
// instructions into code that runs on a CPU without them. The kernels live in
// their own namespace for the same reason.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "embedding_pool.h"

namespace unirec {
namespace emb_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
constexpr int kWidestBlock = 128;  // 8 of the 32 zmm registers
#include "embedding_kernels.h"
#pragma GCC pop_options
}  // namespace emb_avx512

template <typename scalar_t, typename acc_t, typename index_t>
PoolBagsFn<scalar_t, index_t> pool_bags_avx512() {
  return &emb_avx512::pool_bags<scalar_t, acc_t, index_t>;
}
UNIREC_INSTANTIATE_POOL_BAGS(pool_bags_avx512)

}  // namespace unirec
