// Top-k retrieval over the whole catalogue on the GPU, never storing B x N.
//
// Why CUDA C++ rather than Triton: the score GEMM is cuBLAS (at::mm with a
// float32 output), and the selection needs per-query atomics, a variable-size
// candidate list and an exact fallback through at::topk -- plain CUDA kernels
// around ATen calls, where Triton has no top-k primitive that works across
// triton 3.6 to 3.9.
//
// Every (score, index) pair is an int64 key: the float32 score bits, made
// order-preserving, in the high half and 2^32-1-index in the low half, so
// comparing keys compares scores and breaks ties by the smaller index, and
// all keys are distinct. Excluded items get the smallest int64 (a sentinel).
//
// Per tile of items (doubling from 4096 up to 2^26 / B items, ~17 syncs at B=1024, N=1e6):
//   1. scores [B, tile] = queries @ items_tile^T (cuBLAS, float32 out);
//   2. filter: per query, the keys above its running k-th best key are
//      appended to a candidate list (capacity kCap per query, atomics);
//   3. merge: per query, running top-k + candidates (exclusions dropped) are
//      ranked by counting and the best k written back, giving a new k-th key.
// The first tile takes the exact slow path for all queries: keys for the
// whole tile, exclusions applied, at::topk over [running | tile]. Later, only
// the queries whose candidates overflow (scores increasing with the index, or
// a query that excludes almost everything) take it, for that tile.
// Extra memory: B * (k + kCap + tile) * 12 bytes or so.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdint>
#include <limits>

#include "unirec/retrieval.h"

namespace unirec {
namespace {

constexpr int64_t kSentinel = std::numeric_limits<int64_t>::min();
constexpr int kCap = 1024;        // candidates per query per tile before the exact path
constexpr int64_t kMaxRankK = 1024;  // above this k the ranking merge is O(k^2) too slow: always exact path
constexpr int kThreads = 256;

__device__ __forceinline__ int64_t make_key(float v, int64_t idx) {
  uint32_t bits = __float_as_uint(v);
  if ((bits & 0x7FFFFFFFu) == 0) bits = 0;  // -0 ties with +0
  int32_t s = static_cast<int32_t>(bits);
  const int32_t hi = s < 0 ? (s ^ 0x7FFFFFFF) : s;
  const uint64_t u = (static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) |
                     static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(idx));
  return static_cast<int64_t>(u);
}

__device__ __forceinline__ void decode_key(int64_t key, float* v, int64_t* idx) {
  if (key == kSentinel) {
    *v = -INFINITY;
    *idx = -1;
    return;
  }
  const int32_t hi = static_cast<int32_t>(static_cast<uint64_t>(key) >> 32);
  const int32_t s = hi < 0 ? (hi ^ 0x7FFFFFFF) : hi;
  *v = __uint_as_float(static_cast<uint32_t>(s));
  *idx = static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(static_cast<uint64_t>(key) & 0xFFFFFFFFu));
}

__global__ void filter_kernel(const float* __restrict__ scores, int64_t B, int64_t len, int64_t t0,
                              const float* __restrict__ bias, const int64_t* __restrict__ kth,
                              int* __restrict__ count, int64_t* __restrict__ cand) {
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const float* row = scores + b * len;
    const int64_t thr = kth[b];
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < len;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float v = row[j];
      if (bias != nullptr) v += bias[t0 + j];
      const int64_t key = make_key(v, t0 + j);
      if (key > thr) {
        const int pos = atomicAdd(&count[b], 1);
        if (pos < kCap) cand[b * kCap + pos] = key;
      }
    }
  }
}

__device__ __forceinline__ bool is_excluded(int64_t idx, int64_t b, const int64_t* xoff, const int64_t* xids) {
  if (xoff == nullptr) return false;
  for (int64_t p = xoff[b]; p < xoff[b + 1]; ++p) {
    if (xids[p] == idx) return true;
  }
  return false;
}

// One block per query: rank every live key of [running | candidates] by
// counting the larger ones (keys are distinct) and write the best k back.
__global__ void merge_kernel(int64_t* __restrict__ running, int64_t* __restrict__ scratch, int64_t k,
                             int64_t* __restrict__ cand, int* __restrict__ count, int64_t* __restrict__ kth,
                             const int64_t* __restrict__ xoff, const int64_t* __restrict__ xids) {
  const int64_t b = blockIdx.x;
  const int c = count[b];
  if (c == 0) return;
  if (c > kCap) {  // overflowed: this query takes the exact path for the tile
    __syncthreads();
    if (threadIdx.x == 0) count[b] = 0;
    return;
  }
  int64_t* run = running + b * k;
  int64_t* old = scratch + b * k;
  int64_t* cd = cand + b * kCap;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    old[i] = run[i];
    run[i] = kSentinel;
  }
  for (int i = threadIdx.x; i < c; i += blockDim.x) {
    float v;
    int64_t idx;
    decode_key(cd[i], &v, &idx);
    if (is_excluded(idx, b, xoff, xids)) cd[i] = kSentinel;
  }
  __syncthreads();
  const int64_t n = k + c;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    const int64_t x = e < k ? old[e] : cd[e - k];
    if (x == kSentinel) continue;
    int64_t rank = 0;
    for (int64_t i = 0; i < k; ++i) rank += old[i] > x;
    for (int i = 0; i < c; ++i) rank += cd[i] > x;
    if (rank < k) run[rank] = x;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    kth[b] = run[k - 1];
    count[b] = 0;
  }
}

__global__ void keys_kernel(const float* __restrict__ scores, int64_t B, int64_t len, int64_t t0,
                            const float* __restrict__ bias, int64_t* __restrict__ keys) {
  const int64_t total = B * len;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e % len;
    float v = scores[e];
    if (bias != nullptr) v += bias[t0 + j];
    keys[e] = make_key(v, t0 + j);
  }
}

// Row r of keys belongs to query rows[r] (rows == nullptr: query r).
__global__ void exclude_kernel(int64_t* __restrict__ keys, int64_t R, int64_t len, int64_t t0,
                               const int64_t* __restrict__ rows, const int64_t* __restrict__ xoff,
                               const int64_t* __restrict__ xids) {
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const int64_t b = rows != nullptr ? rows[r] : r;
    for (int64_t p = xoff[b] + threadIdx.x; p < xoff[b + 1]; p += blockDim.x) {
      const int64_t i = xids[p];
      if (i >= t0 && i < t0 + len) keys[r * len + (i - t0)] = kSentinel;
    }
  }
}

template <typename scalar_t>
__global__ void decode_kernel(const int64_t* __restrict__ running, int64_t total, scalar_t* __restrict__ values,
                              int64_t* __restrict__ indices) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v;
    int64_t idx;
    decode_key(running[e], &v, &idx);
    values[e] = static_cast<scalar_t>(v);
    indices[e] = idx;
  }
}

inline unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)));
}

void check_exclusions(const at::Tensor& off, const at::Tensor& ids, int64_t B, int64_t N) {
  UNIREC_CHECK(off[0].item<int64_t>() == 0, "exclude_offsets[0] must be 0");
  UNIREC_CHECK(off[B].item<int64_t>() == ids.numel(), "exclude_offsets[-1] must equal len(exclude_indices) (",
               ids.numel(), ")");
  if (B > 0) {
    UNIREC_CHECK(!off.narrow(0, 1, B).lt(off.narrow(0, 0, B)).any().item<bool>(),
                 "exclude_offsets must not decrease");
  }
  if (ids.numel() > 0) {
    UNIREC_CHECK(!ids.lt(0).logical_or(ids.ge(N)).any().item<bool>(),
                 "exclude_indices must lie in [0, N) with N = ", N);
  }
}

at::Tensor scores_tile(const at::Tensor& q, const at::Tensor& items_tile) {
  if (q.scalar_type() == at::kFloat) return at::mm(q, items_tile.t());
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  return at::mm(q, items_tile.t(), at::kFloat);  // bf16/half GEMM, float32 accumulation and output
#else
  return at::mm(q.to(at::kFloat), items_tile.to(at::kFloat).t());
#endif
}

std::tuple<at::Tensor, at::Tensor> topk_scores_cuda(const at::Tensor& queries, const at::Tensor& items, int64_t k,
                                                    const std::optional<at::Tensor>& item_bias,
                                                    const std::optional<at::Tensor>& exclude_offsets,
                                                    const std::optional<at::Tensor>& exclude_indices) {
  const TopkShape s = check_topk_args(queries, items, k, item_bias, exclude_offsets, exclude_indices);
  UNIREC_CHECK(queries.scalar_type() != at::kDouble, "queries: float64 is supported on CPU only");
  c10::cuda::CUDAGuard guard(queries.device());
  at::Tensor values = at::empty({s.B, k}, queries.options());
  at::Tensor indices = at::empty({s.B, k}, queries.options().dtype(at::kLong));
  at::Tensor xoff, xids;
  if (s.exclude) {
    xoff = exclude_offsets->contiguous();
    xids = exclude_indices->contiguous();
    check_exclusions(xoff, xids, s.B, s.N);
  }
  if (s.B == 0) return {values, indices};
  const int64_t B = s.B, N = s.N;
  at::Tensor running = at::full({B, k}, kSentinel, queries.options().dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (N > 0) {
    const at::Tensor q = queries.contiguous();
    const at::Tensor it = items.contiguous();
    const at::Tensor biasf = s.bias ? item_bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* bp = s.bias ? biasf.data_ptr<float>() : nullptr;
    const int64_t* xo = s.exclude ? xoff.data_ptr<int64_t>() : nullptr;
    const int64_t* xi = s.exclude ? xids.data_ptr<int64_t>() : nullptr;
    const bool rank_merge = k <= kMaxRankK;
    at::Tensor scratch = at::empty({B, k}, running.options());
    at::Tensor kth = at::full({B}, kSentinel, running.options());
    at::Tensor count = at::zeros({B}, queries.options().dtype(at::kInt));
    at::Tensor cand = at::empty({rank_merge ? B * kCap : 0}, running.options());
    const int64_t max_tile = std::max<int64_t>(4096, (int64_t(1) << 26) / B);
    int64_t len = std::min<int64_t>(N, std::max<int64_t>(4096, 2 * k));
    bool first = true;
    for (int64_t t0 = 0; t0 < N; t0 += len, len = std::min<int64_t>(std::min(max_tile, t0), N - t0)) {
      len = std::min(len, N - t0);
      const at::Tensor sc = scores_tile(q, it.narrow(0, t0, len)).contiguous();
      bool exact = first || !rank_merge;
      at::Tensor rows;  // the queries that overflowed in this tile (undefined: none, or all when exact)
      if (!exact) {
        const dim3 grid(static_cast<unsigned>(std::min<int64_t>((len + kThreads * 4 - 1) / (kThreads * 4), 1024)),
                        static_cast<unsigned>(std::min<int64_t>(B, 65535)));
        filter_kernel<<<grid, kThreads, 0, stream>>>(sc.data_ptr<float>(), B, len, t0, bp, kth.data_ptr<int64_t>(),
                                                     count.data_ptr<int>(), cand.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // One sync per tile: which queries overflowed their candidate lists.
        const at::Tensor over = count.gt(kCap);
        if (over.any().item<bool>()) rows = over.nonzero().squeeze(1);
        merge_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
            running.data_ptr<int64_t>(), scratch.data_ptr<int64_t>(), k, cand.data_ptr<int64_t>(),
            count.data_ptr<int>(), kth.data_ptr<int64_t>(), xo, xi);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        exact = rows.defined();
      }
      if (exact) {
        // Exact path for all queries (first tile, large k) or the overflowed ones.
        const at::Tensor sub = rows.defined() ? sc.index_select(0, rows) : sc;
        const int64_t R = sub.size(0);
        at::Tensor keys = at::empty({R, len}, running.options());
        keys_kernel<<<grid_for(R * len), kThreads, 0, stream>>>(sub.data_ptr<float>(), R, len, t0, bp,
                                                                keys.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (s.exclude) {
          exclude_kernel<<<static_cast<unsigned>(std::min<int64_t>(R, 65535)), 64, 0, stream>>>(
              keys.data_ptr<int64_t>(), R, len, t0, rows.defined() ? rows.data_ptr<int64_t>() : nullptr, xo, xi);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        const at::Tensor run_sub = rows.defined() ? running.index_select(0, rows) : running;
        const at::Tensor top = std::get<0>(at::topk(at::cat({run_sub, keys}, 1), k, 1, true, true)).contiguous();
        if (rows.defined()) {
          running.index_copy_(0, rows, top);
          kth.index_copy_(0, rows, top.select(1, k - 1).contiguous());
        } else {
          running.copy_(top);
          kth.copy_(top.select(1, k - 1));
        }
      }
      first = false;
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, queries.scalar_type(), "topk_scores_decode", [&] {
    decode_kernel<scalar_t><<<grid_for(B * k), kThreads, 0, stream>>>(
        running.data_ptr<int64_t>(), B * k, values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(unirec, CUDA, m) { m.impl("topk_scores", &topk_scores_cuda); }

}  // namespace unirec
