// The pooling kernels of the table-batched embedding forward, compiled once per
// instruction set, each in its own translation unit (embedding_pool_avx512.cpp,
// embedding_pool_avx2.cpp, embedding_pool_baseline.cpp) so that the build runs
// them in parallel; embedding.cpp picks one per call from cpu_isa(). The
// kernel files see raw pointers only, never ATen, which keeps them quick to
// compile.
#pragma once

#include <cstdint>

namespace unirec {

// Pools bags off[0 : nbags] of one table of `rows` rows, bag i into
// out + i * out_stride (D values), scaled by scale[p] where scale is given,
// divided by the bag's length where mean (an empty bag gives zeros). Ids up to
// position prefetch_end may be read ahead for prefetching. Returns nbags, or
// the first bag that holds an id outside the table (no row of it is read).
template <typename scalar_t, typename index_t>
using PoolBagsFn = int64_t (*)(const scalar_t* table, int64_t rows, const index_t* idx, const index_t* off,
                               int64_t nbags, const scalar_t* scale, bool mean, int64_t prefetch_end, int64_t D,
                               scalar_t* out, int64_t out_stride);

// The kernel of one instruction set for one (dtype, accumulator, index dtype).
// Defined in embedding_pool_<isa>.cpp for the combinations that
// UNIREC_INSTANTIATE_POOL_BAGS lists; only call where the CPU has the ISA.
template <typename scalar_t, typename acc_t, typename index_t>
PoolBagsFn<scalar_t, index_t> pool_bags_avx512();
template <typename scalar_t, typename acc_t, typename index_t>
PoolBagsFn<scalar_t, index_t> pool_bags_avx2();
template <typename scalar_t, typename acc_t, typename index_t>
PoolBagsFn<scalar_t, index_t> pool_bags_baseline();

// Every (dtype, accumulator, index dtype) that tbe_forward dispatches to: its
// floating types with at::opmath_type as accumulator, int32 and int64 ids.
#define UNIREC_INSTANTIATE_POOL_BAGS_FOR(getter, scalar_t, acc_t)         \
  template PoolBagsFn<scalar_t, int32_t> getter<scalar_t, acc_t, int32_t>(); \
  template PoolBagsFn<scalar_t, int64_t> getter<scalar_t, acc_t, int64_t>();
#define UNIREC_INSTANTIATE_POOL_BAGS(getter)                      \
  UNIREC_INSTANTIATE_POOL_BAGS_FOR(getter, float, float)          \
  UNIREC_INSTANTIATE_POOL_BAGS_FOR(getter, double, double)        \
  UNIREC_INSTANTIATE_POOL_BAGS_FOR(getter, c10::BFloat16, float)  \
  UNIREC_INSTANTIATE_POOL_BAGS_FOR(getter, c10::Half, float)

}  // namespace unirec
