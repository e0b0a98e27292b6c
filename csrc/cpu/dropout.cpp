// Dropout on the CPU with a counter-based mask: the draw of element i is a pure
// function of (seed, i), so there is no generator state, threads split the
// work without coordination, a mask is the same for any thread count, and the
// backward regenerates the mask from (threshold, seed) instead of reading a
// stored one (FlashAttention does the same with its Philox dropout mask).
// torch's CPU bernoulli_ draws one Mersenne-Twister number per element from a
// locked generator, which made dropout the largest single cost of a CPU
// training step.
//
// The hash is 32-bit (two keyed lowbias32 rounds, 16-bit draws in pairs) so
// that it vectorises: AVX2 multiplies 8 32-bit lanes at once but has no 64-bit
// multiply. The loop is compiled twice, for AVX2+FMA and for the baseline ISA,
// and picked at run time. One pass: read the input, write the output.
//
// With row_keys (one int64 per row of the input viewed as [rows, cols]), the
// draw of element (r, c) is a pure function of (seed, row_keys[r], c) instead:
// a row's mask does not depend on where the row sits in the tensor, so a
// token keyed by (user, position) gets the same mask whichever process or
// batch it is in. Rows are the parallel tasks.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "unirec/checks.h"
#include "unirec/cpu_features.h"

namespace unirec {
namespace drop_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "dropout_kernels.h"
#pragma GCC pop_options
}  // namespace drop_avx2
namespace drop_base {
#include "dropout_kernels.h"
}  // namespace drop_base
}  // namespace unirec

namespace unirec {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr int64_t kChunk = drop_base::kChunk, kHalf = drop_base::kHalf;
// Chunks per parallel task: about 32K elements, so that a task outweighs its hand-out.
constexpr int64_t kChunkGrain = 16;

// SplitMix64's output function (Steele, Lea and Flood 2014).
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Chunk q of one row (or of the flat tensor): its keys from the 64-bit state and its first counter.
// The counter's high 32 bits (past 2^33 elements) go into the keys.
struct ChunkKeys {
  uint32_t c0, k0, k1;
};
inline ChunkKeys chunk_keys(uint64_t state, int64_t q) {
  const uint64_t ctr = static_cast<uint64_t>(q) * kHalf;
  const uint64_t key = mix64(state + (ctr >> 32) * kGolden);
  return {static_cast<uint32_t>(ctr), static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32)};
}

template <typename scalar_t, typename acc_t>
inline void run_chunk(bool avx2, const scalar_t* x, scalar_t* o, int m, int half, const ChunkKeys& k, int32_t thr,
                      acc_t scale) {
  if (avx2) {
    drop_avx2::dropout_chunk<scalar_t, acc_t>(x, o, m, half, k.c0, k.k0, k.k1, thr, scale);
  } else {
    drop_base::dropout_chunk<scalar_t, acc_t>(x, o, m, half, k.c0, k.k0, k.k1, thr, scale);
  }
}

at::Tensor dropout_cpu(const at::Tensor& input_, int64_t threshold, int64_t seed,
                       const std::optional<at::Tensor>& row_keys_) {
  UNIREC_CHECK(threshold >= 1 && threshold <= 65536,
               "threshold must lie in [1, 65536] (keep = threshold / 65536), got ", threshold);
  check_float_dtype(input_, "input");
  int64_t rows = 0, cols = 0;
  at::Tensor row_keys;
  if (row_keys_.has_value()) {
    row_keys = *row_keys_;
    UNIREC_CHECK(input_.dim() >= 1, "with row_keys, input must have at least 1 dimension (rows = input.numel() / "
                 "input.shape[-1]), got a 0-D tensor");
    UNIREC_CHECK(row_keys.scalar_type() == at::kLong, "row_keys must be int64, got ", row_keys.scalar_type());
    check_dim(row_keys, 1, "row_keys");
    check_same_device(row_keys, input_, "row_keys", "input");
    cols = input_.size(-1);
    rows = 1;
    for (int64_t d = 0; d + 1 < input_.dim(); ++d) rows *= input_.size(d);
    UNIREC_CHECK(row_keys.numel() == rows, "row_keys must have one entry per row of input (input.numel() / "
                 "input.shape[-1] = ", rows, " for input of shape ", input_.sizes(), "), got ", row_keys.numel());
    row_keys = row_keys.contiguous();
  }
  const at::Tensor input = input_.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t n = input.numel();
  if (n == 0) return out;
  const uint64_t state = mix64(static_cast<uint64_t>(seed) + kGolden);
  const int32_t thr = static_cast<int32_t>(threshold);
  const bool avx2 = cpu_has_avx2_fma();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(65536.0 / static_cast<double>(threshold));
    if (!row_keys.defined()) {
      // Flat: element i is element i % kChunk of chunk i / kChunk of the whole tensor.
      at::parallel_for(0, (n + kChunk - 1) / kChunk, kChunkGrain, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q) {
          const int64_t i0 = q * kChunk;
          const int m = static_cast<int>(std::min<int64_t>(kChunk, n - i0));
          run_chunk<scalar_t, acc_t>(avx2, x + i0, o + i0, m, kHalf, chunk_keys(state, q), thr, scale);
        }
      });
      return;
    }
    // Keyed: row r is a flat tensor of its own under the state mix64(state + mix64(row_keys[r])),
    // each chunk (m elements) split in halves of ceil(m / 2).
    const int64_t* keys = row_keys.data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, kChunkGrain * kChunk / cols);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const uint64_t row_state = mix64(state + mix64(static_cast<uint64_t>(keys[r])));
        const scalar_t* xr = x + r * cols;
        scalar_t* orow = o + r * cols;
        for (int64_t q = 0, j0 = 0; j0 < cols; ++q, j0 += kChunk) {
          const int m = static_cast<int>(std::min<int64_t>(kChunk, cols - j0));
          run_chunk<scalar_t, acc_t>(avx2, xr + j0, orow + j0, m, (m + 1) / 2, chunk_keys(row_state, q), thr, scale);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unirec, CPU, m) { m.impl("dropout", &dropout_cpu); }

}  // namespace unirec
