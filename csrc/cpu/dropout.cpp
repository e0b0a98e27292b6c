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
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

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

at::Tensor dropout_cpu(const at::Tensor& input_, int64_t threshold, int64_t seed) {
  UNIREC_CHECK(threshold >= 1 && threshold <= 65536,
               "threshold must lie in [1, 65536] (keep = threshold / 65536), got ", threshold);
  check_float_dtype(input_, "input");
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
    at::parallel_for(0, (n + kChunk - 1) / kChunk, kChunkGrain, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        // The counter's high 32 bits (tensors past 2^33 elements) go into the keys.
        const uint64_t ctr = static_cast<uint64_t>(q) * kHalf;
        const uint64_t key = mix64(state + (ctr >> 32) * kGolden);
        const uint32_t c0 = static_cast<uint32_t>(ctr), k0 = static_cast<uint32_t>(key),
                       k1 = static_cast<uint32_t>(key >> 32);
        const int64_t i0 = q * kChunk;
        const int m = static_cast<int>(std::min<int64_t>(kChunk, n - i0));
        if (avx2) {
          drop_avx2::dropout_chunk<scalar_t, acc_t>(x + i0, o + i0, m, c0, k0, k1, thr, scale);
        } else {
          drop_base::dropout_chunk<scalar_t, acc_t>(x + i0, o + i0, m, c0, k0, k1, thr, scale);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unirec, CPU, m) { m.impl("dropout", &dropout_cpu); }

}  // namespace unirec
