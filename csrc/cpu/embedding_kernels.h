// The pooling loops of the table-batched embedding forward. Included once by
// each of embedding_pool_avx512.cpp, embedding_pool_avx2.cpp and
// embedding_pool_baseline.cpp, inside its own namespace and, for AVX-512 and
// AVX2+FMA, under `#pragma GCC target`: no include guard, no includes (the
// includer includes <algorithm>, <cstdint>, <type_traits> and the c10 scalar
// types first, outside the pragma) and kWidestBlock, the widest column block
// whose sums fit in registers, is defined by the includer.

// How far ahead rows are prefetched, in index positions, in two steps: `far`
// into L2 (prefetcht1), `near` into L1 (prefetcht0). One core keeps only about
// two dozen L1 misses in flight; a row asked into L2 does not hold one, so the
// far prefetches keep several times as many rows coming from memory, and the
// near ones move them up while the loads that need them are still ahead.
// Measured on Zipf bags of 10^5-row tables (D = 32, 64, 96, 128), against
// prefetcht0 alone: 20-30% faster. `near` is capped at about 12 KB of rows,
// well inside L1.
struct PrefetchDistance {
  int64_t near, far;
};
inline PrefetchDistance prefetch_distance(int64_t row_bytes) {
  const int64_t near = std::clamp<int64_t>(12288 / std::max<int64_t>(row_bytes, 1), 4, 24);
  return {near, 5 * near};
}

// Asks for row `row` of `table` (D values) to be brought into the caches,
// kLevel as __builtin_prefetch's locality (3: L1, 2: L2). A prefetch never
// faults, so any address will do.
template <int kLevel, typename scalar_t>
inline void prefetch_row(const scalar_t* table, int64_t row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(table + row * D);
#pragma GCC unroll 8
  for (int64_t c = 0; c < D * static_cast<int64_t>(sizeof(scalar_t)); c += 64) __builtin_prefetch(p + c, 0, kLevel);
}

// Whether every id in idx[0:n] is a row of a table of `rows` rows: one pass
// the compiler vectorises (a negative id is a huge unsigned one).
template <typename index_t>
inline bool ids_inside(const index_t* idx, int64_t n, int64_t rows) {
  uint64_t largest = 0;
  for (int64_t j = 0; j < n; ++j) largest = std::max(largest, static_cast<uint64_t>(static_cast<int64_t>(idx[j])));
  return n == 0 || largest < static_cast<uint64_t>(rows);
}

// The bag [start, end) of positions, pooled into out[d0 : d0+W]:
// out = norm * sum_p scale[p] * table[idx[p]][d0 : d0+W]. W is a compile-time
// width so the sums live in registers across the bag. With kPrefetch, step p
// also prefetches the rows of positions p + ahead.near and p + ahead.far (the
// caller makes sure those ids exist), read as rows of this table: the rows
// later bags will read, asked for while this bag's loads are in flight. Near a
// table boundary that address is no row anything reads: a wasted prefetch, not
// a fault.
//
// The loop is latency-bound on random rows, so its cost is set by how many
// rows are in flight at once: kD > 0 (D known at compile time) unrolls the
// prefetches and makes the row offset a shift, which keeps a lookup short
// enough for the out-of-order window to hold many. Not inlined: inside the
// bag loop GCC stops keeping the sums in vector registers.
template <int W, bool kPrefetch, bool kScaled, int kD, typename scalar_t, typename acc_t, typename index_t>
__attribute__((noinline)) void pool_block(const scalar_t* table, const index_t* idx, const scalar_t* scale,
                                          int64_t start, int64_t end, PrefetchDistance ahead, int64_t D_,
                                          int64_t d0, acc_t norm, scalar_t* out) {
  const int64_t D = kD > 0 ? kD : D_;
  acc_t acc[W] = {};
  for (int64_t p = start; p < end; ++p) {
    const scalar_t* r = table + static_cast<int64_t>(idx[p]) * D + d0;
    if constexpr (kPrefetch) {
      prefetch_row<2>(table, static_cast<int64_t>(idx[p + ahead.far]), D);
      prefetch_row<3>(table, static_cast<int64_t>(idx[p + ahead.near]), D);
    }
    if constexpr (kScaled) {
      const acc_t s = static_cast<acc_t>(scale[p]);
#pragma GCC unroll 128
      for (int d = 0; d < W; ++d) acc[d] += s * static_cast<acc_t>(r[d]);
    } else {
#pragma GCC unroll 128
      for (int d = 0; d < W; ++d) acc[d] += static_cast<acc_t>(r[d]);
    }
  }
#pragma GCC unroll 128
  for (int d = 0; d < W; ++d) out[d0 + d] = static_cast<scalar_t>(acc[d] * norm);
}

// Pools bags off[0 : nbags] of one table of `rows` rows (positions index
// idx, scale and the prefetch bound), bag i into out + i * out_stride, D
// values each, norm = 1/n for mean pooling (an empty bag gives zeros). Every
// id of a bag is checked before its rows are read. Returns nbags, or the first
// bag that holds an id outside the table.
//
// The usual widths (16, 32, 48, 64, and 96 and 128 where 32 vector registers
// hold the sums) are one straight-line pass per bag with D a compile-time
// constant. Any other D goes in blocks of at most kWidestBlock columns, one
// pass over the bag per block (the first one prefetches): D = 96 that way was
// 1.5x slower than its own loop.
template <bool kScaled, typename scalar_t, typename acc_t, typename index_t>
int64_t pool_bags_impl(const scalar_t* table, int64_t rows, const index_t* idx, const index_t* off, int64_t nbags,
                       const scalar_t* scale, bool mean, int64_t prefetch_end, int64_t D, scalar_t* out,
                       int64_t out_stride) {
  const PrefetchDistance ahead = prefetch_distance(D * static_cast<int64_t>(sizeof(scalar_t)));
  auto bags = [&](auto width) -> int64_t {
    constexpr int w = decltype(width)::value;
    for (int64_t bag = 0; bag < nbags; ++bag) {
      const int64_t start = off[bag], end = off[bag + 1];
      if (!ids_inside(idx + start, end - start, rows)) return bag;
      const acc_t norm = (mean && end > start) ? acc_t(1) / acc_t(end - start) : acc_t(1);
      scalar_t* dst = out + bag * out_stride;
      // Prefetching reads the ids `ahead` past the bag: only where they exist.
      const bool prefetch = end + ahead.far <= prefetch_end;
      if constexpr (w > 0) {
        if (prefetch) {
          pool_block<w, true, kScaled, w>(table, idx, scale, start, end, ahead, D, 0, norm, dst);
        } else {
          pool_block<w, false, kScaled, w>(table, idx, scale, start, end, ahead, D, 0, norm, dst);
        }
      } else {
        int64_t d0 = 0;
        auto block = [&](auto block_width) {
          constexpr int bw = decltype(block_width)::value;
          if (d0 == 0 && prefetch) {
            pool_block<bw, true, kScaled, 0>(table, idx, scale, start, end, ahead, D, d0, norm, dst);
          } else {
            pool_block<bw, false, kScaled, 0>(table, idx, scale, start, end, ahead, D, d0, norm, dst);
          }
          d0 += bw;
        };
        if constexpr (kWidestBlock >= 128) {
          while (d0 + 128 <= D) block(std::integral_constant<int, 128>{});
        }
        while (d0 + 64 <= D) block(std::integral_constant<int, 64>{});
        if (d0 + 32 <= D) block(std::integral_constant<int, 32>{});
        if (d0 + 16 <= D) block(std::integral_constant<int, 16>{});
        if (d0 + 8 <= D) block(std::integral_constant<int, 8>{});
        while (d0 < D) block(std::integral_constant<int, 1>{});
      }
    }
    return nbags;
  };
  // float64 (gradcheck, not training) takes the blocked path: fewer loops to compile.
  if constexpr (!std::is_same_v<scalar_t, double>) {
    switch (D) {
      case 16: return bags(std::integral_constant<int, 16>{});
      case 32: return bags(std::integral_constant<int, 32>{});
      case 48: return bags(std::integral_constant<int, 48>{});
      case 64: return bags(std::integral_constant<int, 64>{});
      default: break;
    }
    if constexpr (kWidestBlock >= 128) {
      if (D == 96) return bags(std::integral_constant<int, 96>{});
      if (D == 128) return bags(std::integral_constant<int, 128>{});
    }
  }
  return bags(std::integral_constant<int, 0>{});
}

template <typename scalar_t, typename acc_t, typename index_t>
int64_t pool_bags(const scalar_t* table, int64_t rows, const index_t* idx, const index_t* off, int64_t nbags,
                  const scalar_t* scale, bool mean, int64_t prefetch_end, int64_t D, scalar_t* out,
                  int64_t out_stride) {
  if (scale) return pool_bags_impl<true, scalar_t, acc_t>(table, rows, idx, off, nbags, scale, mean, prefetch_end, D,
                                                          out, out_stride);
  return pool_bags_impl<false, scalar_t, acc_t>(table, rows, idx, off, nbags, scale, mean, prefetch_end, D, out,
                                                out_stride);
}
