// Dropout masks from a counter-based generator. Element i of the mask for a
// seed is a pure function of (seed, i): no generator state, threads split the
// work without coordination, and a mask is the same for any thread count.
// torch's CPU bernoulli_ draws one Mersenne-Twister number per element from a
// locked generator, which made dropout the largest single cost of a CPU
// training step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "unirec/checks.h"

namespace unirec {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// SplitMix64's output function (Steele, Lea and Flood 2014).
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::tuple<at::Tensor, at::Tensor> dropout_fwd_cpu(const at::Tensor& input_, int64_t threshold, int64_t seed) {
  UNIREC_CHECK(threshold >= 1 && threshold <= 65536,
               "threshold must lie in [1, 65536] (keep = threshold / 65536), got ", threshold);
  check_float_dtype(input_, "input");
  const at::Tensor input = input_.contiguous();
  at::Tensor out = at::empty_like(input), mask = at::empty_like(input);
  const int64_t n = input.numel();
  if (n == 0) return {out, mask};
  const uint64_t state = mix64(static_cast<uint64_t>(seed) + kGolden);
  const uint32_t thr = static_cast<uint32_t>(threshold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "dropout_fwd_cpu", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* m = mask.data_ptr<scalar_t>();
    const scalar_t scale = static_cast<scalar_t>(65536.0 / static_cast<double>(threshold)), zero(0);
    // Word w (one 64-bit draw) decides elements 4w .. 4w+3, 16 bits each, low bits first.
    at::parallel_for(0, (n + 3) / 4, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const uint64_t h = mix64(state + static_cast<uint64_t>(w + 1) * kGolden);
        const int64_t i0 = 4 * w, len = std::min<int64_t>(4, n - i0);
        for (int64_t k = 0; k < len; ++k) {
          const scalar_t mk = ((h >> (16 * k)) & 0xffff) < thr ? scale : zero;
          m[i0 + k] = mk;
          o[i0 + k] = x[i0 + k] * mk;
        }
      }
    });
  });
  return {out, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(unirec, CPU, m) { m.impl("dropout_fwd", &dropout_fwd_cpu); }

}  // namespace unirec
