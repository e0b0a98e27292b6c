// The pooling loop of the table-batched embedding forward. Included twice by
// embedding.cpp, once under `#pragma GCC target("avx2,fma")` and once for the
// baseline ISA, each time inside its own namespace: no include guard, no
// includes (embedding.cpp includes what it needs first).

// out[d0 : d0+W] = norm * sum_j scale_j * table[idx[j]][d0 : d0+W]; W is a
// compile-time width so the accumulator lives in registers across the bag.
template <int W, typename scalar_t, typename acc_t, typename index_t>
inline void pool_block(const scalar_t* table, const index_t* idx, const scalar_t* scale, int64_t n, int64_t D,
                       int64_t d0, acc_t norm, scalar_t* out) {
  acc_t acc[W] = {};
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* r = table + static_cast<int64_t>(idx[j]) * D + d0;
    const acc_t s = scale ? static_cast<acc_t>(scale[j]) : acc_t(1);
#pragma GCC unroll 64
    for (int d = 0; d < W; ++d) acc[d] += s * static_cast<acc_t>(r[d]);
  }
#pragma GCC unroll 64
  for (int d = 0; d < W; ++d) out[d0 + d] = static_cast<scalar_t>(acc[d] * norm);
}

// out[0:D] = norm * sum_{j < n} scale_j * table[idx[j]][0:D] (scale_j = 1 without scale).
template <typename scalar_t, typename acc_t, typename index_t>
inline void pool_bag(const scalar_t* table, const index_t* idx, const scalar_t* scale, int64_t n, int64_t D,
                     acc_t norm, scalar_t* out) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) pool_block<64>(table, idx, scale, n, D, d0, norm, out);
  if (d0 + 32 <= D) pool_block<32>(table, idx, scale, n, D, d0, norm, out), d0 += 32;
  if (d0 + 16 <= D) pool_block<16>(table, idx, scale, n, D, d0, norm, out), d0 += 16;
  if (d0 + 8 <= D) pool_block<8>(table, idx, scale, n, D, d0, norm, out), d0 += 8;
  for (; d0 < D; ++d0) pool_block<1>(table, idx, scale, n, D, d0, norm, out);
}
