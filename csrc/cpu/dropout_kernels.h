// The dropout loop. Included twice by dropout.cpp, once under
// `#pragma GCC target("avx2,fma")` and once for the baseline ISA, each time
// inside its own namespace: no include guard, no includes (dropout.cpp
// includes what it needs first).
//
// Layout of the draws: elements are cut into chunks of 2 * kHalf. Counter
// c0 + k (k < half) of a chunk hashes to 32 bits; its low 16 bits decide
// element k of the chunk, its high 16 bits element half + k. Both halves of
// one hash thus sit in unit-stride loops, which the compiler vectorises
// (8 hashes per AVX2 vector, vpmulld); kHalf divides 2^32, so a chunk never
// straddles a change of the counter's high bits (folded into the keys).
// half = kHalf for every chunk of the flat (unkeyed) layout; the keyed layout
// (rows) gives each chunk of a row half = ceil(m / 2), m its element count
// (kHalf for a full chunk), so that a short row uses both halves of each hash.

constexpr int kHalf = 1024;
constexpr int kChunk = 2 * kHalf;

// Chris Wellons' lowbias32 (hash-prospector): a 32-bit permutation with good
// avalanche, two 32-bit multiplies.
inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The draw pair of counter c under keys (k0, k1): two keyed rounds.
inline uint32_t dropout_hash(uint32_t c, uint32_t k0, uint32_t k1) { return lowbias32(lowbias32(c ^ k0) ^ k1); }

// The two halves of a chunk: counters c0 .. c0 + low - 1, the first `both` of which also decide an
// element of the high half. Separate restrict pointers per half, so that the compiler needs no
// overlap check between o_lo[k] and o_hi[k] (and, under -fwrapv, no wrap check on `half + k`).
template <typename scalar_t, typename acc_t>
inline void dropout_halves(const scalar_t* __restrict__ x_lo, const scalar_t* __restrict__ x_hi,
                           scalar_t* __restrict__ o_lo, scalar_t* __restrict__ o_hi, int both, int low, uint32_t c0,
                           uint32_t k0, uint32_t k1, int32_t thr, acc_t scale) {
  // 32-bit indices: with 64-bit ones GCC keeps the counters in 64-bit lanes and narrows them each step.
  const acc_t zero(0);
  for (int k = 0; k < both; ++k) {
    const uint32_t h = dropout_hash(c0 + static_cast<uint32_t>(k), k0, k1);
    const int32_t lo = static_cast<int32_t>(h & 0xffffu), hi = static_cast<int32_t>(h >> 16);
    o_lo[k] = static_cast<scalar_t>(static_cast<acc_t>(x_lo[k]) * (lo < thr ? scale : zero));
    o_hi[k] = static_cast<scalar_t>(static_cast<acc_t>(x_hi[k]) * (hi < thr ? scale : zero));
  }
  for (int k = both; k < low; ++k) {
    const uint32_t h = dropout_hash(c0 + static_cast<uint32_t>(k), k0, k1);
    const int32_t lo = static_cast<int32_t>(h & 0xffffu);
    o_lo[k] = static_cast<scalar_t>(static_cast<acc_t>(x_lo[k]) * (lo < thr ? scale : zero));
  }
}

// o[k] = x[k] * (draw_k < thr ? scale : 0) for the m <= 2 * half elements of one chunk whose
// first counter is c0 (half <= kHalf); acc_t is the arithmetic type (float for bfloat16 and float16).
template <typename scalar_t, typename acc_t>
inline void dropout_chunk(const scalar_t* x, scalar_t* o, int m, int half, uint32_t c0, uint32_t k0, uint32_t k1,
                          int32_t thr, acc_t scale) {
  const int both = m > half ? m - half : 0;  // counters that decide two elements
  const int low = m < half ? m : half;
  const int hi = both > 0 ? half : 0;  // (no pointer past the chunk's end when the high half is empty)
  dropout_halves<scalar_t, acc_t>(x, x + hi, o, o + hi, both, low, c0, k0, k1, thr, scale);
}
