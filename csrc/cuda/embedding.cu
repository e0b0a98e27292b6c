// Table-batched embedding bags on CUDA.
//
// Forward: one warp per bag; the warp loads 32 indices at a time and
// broadcasts them by shuffle, each lane owning VEC consecutive columns so a
// row is read with 16-byte loads. Backward: positions are sorted by row
// (stable) and cut into chunks of at most 32 positions of one row; one warp
// per chunk sums it, then one warp per row sums its chunks in order --
// deterministic, no atomics -- and writes the dense gradient row or applies
// the optimizer step to that row alone.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "unirec/embedding.h"

namespace unirec {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFull = 0xffffffffu;

int64_t blocks_for(int64_t items, int64_t per_block) { return std::max<int64_t>(1, (items + per_block - 1) / per_block); }

// Every kernel that walks the bags validates what it reads and never reads
// out of bounds: an invalid bag counts as empty and sets *bad. The host then
// raises, naming the culprit from a CPU copy (one flag read per call, which
// the op needs anyway to raise before returning).
struct Bag {
  int64_t start, stop, base, rows;
};

template <typename index_t>
__device__ __forceinline__ Bag load_bag(const int64_t* __restrict__ toff, const index_t* __restrict__ off,
                                        int64_t bag, int64_t T, int64_t B, int64_t R, int64_t nnz,
                                        int* __restrict__ bad) {
  const int64_t t = bag / B;
  Bag g{static_cast<int64_t>(off[bag]), static_cast<int64_t>(off[bag + 1]), toff[t], toff[t + 1] - toff[t]};
  const bool bad_offsets = g.start < 0 || g.stop < g.start || g.stop > nnz || (bag == 0 && g.start != 0) ||
                           (bag == T * B - 1 && g.stop != nnz);
  const bool bad_table = g.base < 0 || g.rows < 0 || g.base + g.rows > R || (t == 0 && g.base != 0) ||
                         (t == T - 1 && g.base + g.rows != R);
  if (bad_offsets || bad_table) {
    *bad = 1;
    g.stop = g.start;
    g.rows = 0;
  }
  return g;
}

__device__ __forceinline__ bool index_ok(int64_t row, int64_t rows, int* __restrict__ bad) {
  const bool ok = row >= 0 && row < rows;
  if (!ok) *bad = 1;
  return ok;
}

void raise_if_bad(const at::Tensor& bad, const at::Tensor& table_offsets, const at::Tensor& indices,
                  const at::Tensor& offsets, const TbeShape& s) {
  if (bad.item<int>() == 0) return;
  check_tbe_values(table_offsets.cpu(), indices.cpu(), offsets.cpu(), s);
  UNIREC_CHECK(false, "invalid table_offsets, offsets or indices");
}

// With no bags nothing walks offsets; its one entry must still be 0 = nnz.
void check_no_bags(const at::Tensor& offsets, const TbeShape& s) {
  if (s.T * s.B == 0) {
    UNIREC_CHECK(s.nnz == 0, "offsets[-1] must equal len(indices) (", s.nnz, "), got 0 bags");
    UNIREC_CHECK(offsets.cpu().to(at::kLong).item<int64_t>() == 0, "offsets[0] must be 0");
  }
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t, typename index_t, int VEC>
__global__ void tbe_forward_kernel(const scalar_t* __restrict__ weight, const int64_t* __restrict__ toff,
                                   const index_t* __restrict__ idx, const index_t* __restrict__ off,
                                   const scalar_t* __restrict__ psw, scalar_t* __restrict__ out, int64_t T, int64_t B,
                                   int64_t D, int64_t R, int64_t nnz, bool mean, int* __restrict__ bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t bag = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (bag >= T * B) return;
  const int64_t t = bag / B, b = bag % B;
  const Bag g = load_bag(toff, off, bag, T, B, R, nnz, bad);
  const scalar_t* table = weight + g.base * D;
  const int64_t start = g.start, stop = g.stop;
  const acc_t norm = (mean && stop > start) ? acc_t(1) / acc_t(stop - start) : acc_t(1);
  scalar_t* dst = out + (b * T + t) * D;
  for (int64_t col0 = 0; col0 < D; col0 += kWarp * VEC) {
    const int64_t col = col0 + lane * VEC;
    const bool active = col < D;
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0;
    for (int64_t base = start; base < stop; base += kWarp) {
      const int n = static_cast<int>(stop - base < kWarp ? stop - base : kWarp);
      int64_t my_row = lane < n ? static_cast<int64_t>(idx[base + lane]) : 0;
      acc_t my_scale = lane < n ? (psw ? static_cast<acc_t>(psw[base + lane]) : acc_t(1)) : acc_t(0);
      if (lane < n && !index_ok(my_row, g.rows, bad)) my_row = 0, my_scale = 0;
      const bool skip_all = g.rows == 0;
#pragma unroll 4
      for (int j = 0; j < n; ++j) {
        const int64_t row = __shfl_sync(kFull, my_row, j);
        const acc_t scale = __shfl_sync(kFull, my_scale, j);
        if (active && !skip_all) {
          const Pack<scalar_t, VEC> p = *reinterpret_cast<const Pack<scalar_t, VEC>*>(table + row * D + col);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += scale * static_cast<acc_t>(p.v[k]);
        }
      }
    }
    if (active) {
      Pack<scalar_t, VEC> p;
#pragma unroll
      for (int k = 0; k < VEC; ++k) p.v[k] = static_cast<scalar_t>(acc[k] * norm);
      *reinterpret_cast<Pack<scalar_t, VEC>*>(dst + col) = p;
    }
  }
}

template <typename scalar_t, typename index_t>
void launch_forward(const at::Tensor& weight, const at::Tensor& toff, const at::Tensor& idx, const at::Tensor& off,
                    const at::Tensor& psw, at::Tensor& out, const TbeShape& s, bool mean, at::Tensor& bad) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(blocks_for(s.T * s.B, kWarpsPerBlock)), block(kWarp * kWarpsPerBlock);
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = s.D % kVec == 0 && reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0;
  const scalar_t* ps = psw.defined() ? psw.data_ptr<scalar_t>() : nullptr;
#define UNIREC_TBE_FWD(V)                                                                                        \
  tbe_forward_kernel<scalar_t, index_t, V><<<grid, block, 0, stream>>>(                                          \
      weight.data_ptr<scalar_t>(), toff.data_ptr<int64_t>(), idx.data_ptr<index_t>(), off.data_ptr<index_t>(), \
      ps, out.data_ptr<scalar_t>(), s.T, s.B, s.D, s.R, s.nnz, mean, bad.data_ptr<int>())
  if (aligned) {
    UNIREC_TBE_FWD(kVec);
  } else {
    UNIREC_TBE_FWD(1);
  }
#undef UNIREC_TBE_FWD
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor tbe_forward_cuda(const at::Tensor& weight_, const at::Tensor& table_offsets_, const at::Tensor& indices_,
                            const at::Tensor& offsets_, const std::optional<at::Tensor>& per_sample_weights,
                            std::string pooling) {
  const TbeShape s = check_tbe_args(weight_, table_offsets_, indices_, offsets_, per_sample_weights, pooling);
  const c10::cuda::CUDAGuard guard(weight_.device());
  const bool mean = parse_pooling(pooling) == Pooling::kMean;
  const at::Tensor weight = weight_.contiguous(), table_offsets = table_offsets_.contiguous(),
                   indices = indices_.contiguous(), offsets = offsets_.contiguous();
  check_no_bags(offsets, s);
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.B, s.T, s.D}, weight.options());
  if (out.numel() == 0) return out;
  at::Tensor bad = at::zeros({1}, indices.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "tbe_forward_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "tbe_forward_cuda", [&] {
      launch_forward<scalar_t, index_t>(weight, table_offsets, indices, offsets, psw, out, s, mean, bad);
    });
  });
  raise_if_bad(bad, table_offsets, indices, offsets, s);
  return out;
}

template <typename index_t>
__global__ void tbe_linearize_kernel(const int64_t* __restrict__ toff, const index_t* __restrict__ idx,
                                     const index_t* __restrict__ off, int64_t T, int64_t B, int64_t R,
                                     int64_t nnz, int64_t* __restrict__ bag_of, int64_t* __restrict__ row_of,
                                     int* __restrict__ bad) {
  const int lane = threadIdx.x % kWarp;
  const int64_t bag = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (bag >= T * B) return;
  const Bag g = load_bag(toff, off, bag, T, B, R, nnz, bad);
  for (int64_t p = g.start + lane; p < g.stop; p += kWarp) {
    const int64_t row = static_cast<int64_t>(idx[p]);
    index_ok(row, g.rows, bad);
    bag_of[p] = bag;
    row_of[p] = g.base + row;
  }
}

// Positions sorted by row are cut into chunks of at most kChunk positions that
// never straddle two rows: flag 2 opens a row (and a chunk), flag 1 a chunk only.
// Hot rows (Zipf ids put a fifth of all lookups on one row) then spread over
// many warps instead of serialising one.
constexpr int64_t kChunk = 32;

__global__ void chunk_flags_kernel(const int64_t* __restrict__ sorted, int64_t n, int8_t* __restrict__ flags) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  flags[i] = (i == 0 || sorted[i] != sorted[i - 1]) ? 2 : (i % kChunk == 0 ? 1 : 0);
}

enum class RowUpdate { kDenseGrad, kSgd, kRowwiseAdagrad };

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Columns a lane accumulates per pass over a chunk's positions.
constexpr int kCols = 4;

// Pass 1, one warp per chunk: partial[c] = sum over the chunk's positions p
// (in order) of scale_p * grad_output[bag(p)], in the accumulation type.
template <typename scalar_t, typename index_t>
__global__ void tbe_chunk_sum_kernel(const scalar_t* __restrict__ grad_out, const index_t* __restrict__ off,
                                     const scalar_t* __restrict__ psw, const int64_t* __restrict__ bag_of,
                                     const int64_t* __restrict__ order, const int64_t* __restrict__ chunk_start,
                                     int64_t chunks, int64_t nnz, int64_t T, int64_t B, int64_t D, bool mean,
                                     at::opmath_type<scalar_t>* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (c >= chunks) return;
  const int64_t first = chunk_start[c], n = (c + 1 < chunks ? chunk_start[c + 1] : nnz) - first;
  // Lane j holds position j of the chunk: its grad_output row and scale.
  int64_t my_src = 0;
  acc_t my_scale = 0;
  if (lane < n) {
    const int64_t p = order[first + lane], bag = bag_of[p];
    my_src = ((bag % B) * T + bag / B) * D;
    my_scale = psw ? static_cast<acc_t>(psw[p]) : acc_t(1);
    if (mean) my_scale /= static_cast<acc_t>(off[bag + 1] - off[bag]);
  }
  for (int64_t col0 = 0; col0 < D; col0 += kWarp * kCols) {
    acc_t acc[kCols] = {};
    for (int j = 0; j < n; ++j) {
      const int64_t src = __shfl_sync(kFull, my_src, j);
      const acc_t scale = __shfl_sync(kFull, my_scale, j);
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        const int64_t col = col0 + k * kWarp + lane;
        if (col < D) acc[k] += scale * static_cast<acc_t>(grad_out[src + col]);
      }
    }
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int64_t col = col0 + k * kWarp + lane;
      if (col < D) partial[c * D + col] = acc[k];
    }
  }
}

// Pass 2, one warp per chunk that opens a row: sums the row's chunks in order
// and applies kMode to that row alone. Other warps exit at once.
template <typename scalar_t, RowUpdate kMode>
__global__ void tbe_row_update_kernel(const at::opmath_type<scalar_t>* __restrict__ partial,
                                      const int8_t* __restrict__ flags, const int64_t* __restrict__ chunk_start,
                                      const int64_t* __restrict__ sorted_rows, int64_t chunks, int64_t D,
                                      scalar_t* __restrict__ dst, float* __restrict__ state,
                                      at::opmath_type<scalar_t> lr, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (c >= chunks || flags[chunk_start[c]] != 2) return;
  int64_t end = c + 1;
  while (end < chunks && flags[chunk_start[end]] != 2) ++end;
  const int64_t row = sorted_rows[chunk_start[c]];
  auto gradient = [&](int64_t col) {
    acc_t v = 0;
    for (int64_t k = c; k < end; ++k) v += partial[k * D + col];
    return v;
  };
  acc_t mult = lr;
  if (kMode == RowUpdate::kRowwiseAdagrad) {
    // Row-wise Adagrad (FBGEMM): one accumulator per row, the mean of g^2 over D.
    // Every lane reads the old state before the warp_sum barrier; lane 0
    // writes the new one only after it.
    const acc_t prev = static_cast<acc_t>(state[row]);
    acc_t sq = 0;
    for (int64_t col = lane; col < D; col += kWarp) {
      const acc_t v = gradient(col);
      sq += v * v;
    }
    sq = warp_sum(sq);
    const acc_t h = prev + sq / static_cast<acc_t>(D);
    if (lane == 0) state[row] = static_cast<float>(h);
    mult = lr / (sqrt(h) + eps);
  }
  for (int64_t col = lane; col < D; col += kWarp) {
    const acc_t v = gradient(col);
    scalar_t* out = dst + row * D + col;
    if (kMode == RowUpdate::kDenseGrad) {
      *out = static_cast<scalar_t>(v);
    } else {
      *out = static_cast<scalar_t>(static_cast<acc_t>(*out) - mult * v);
    }
  }
}

template <typename scalar_t, typename index_t>
__global__ void tbe_psw_grad_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ weight,
                                    const int64_t* __restrict__ bag_of, const int64_t* __restrict__ row_of,
                                    int64_t nnz, int64_t T, int64_t B, int64_t D, scalar_t* __restrict__ grad_psw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (p >= nnz) return;
  const int64_t bag = bag_of[p];
  const scalar_t* go = grad_out + ((bag % B) * T + bag / B) * D;
  const scalar_t* w = weight + row_of[p] * D;
  acc_t dot = 0;
  for (int64_t col = lane; col < D; col += kWarp) dot += static_cast<acc_t>(go[col]) * static_cast<acc_t>(w[col]);
  dot = warp_sum(dot);
  if (lane == 0) grad_psw[p] = static_cast<scalar_t>(dot);
}

// Runs the sorted-row backward and applies kMode to each unique row. Returns
// the per-sample-weight gradient ([nnz] or [0]), computed before any update.
template <RowUpdate kMode>
at::Tensor backward_rows(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& table_offsets,
                         const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& psw,
                         const TbeShape& s, bool mean, at::Tensor& dst, float* state, double lr, double eps) {
  at::Tensor grad_psw = at::empty({psw.defined() ? s.nnz : 0}, weight.options());
  if (s.T * s.B == 0) return grad_psw;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto long_opts = indices.options().dtype(at::kLong);
  at::Tensor bag_of = at::empty({s.nnz}, long_opts), row_of = at::empty({s.nnz}, long_opts);
  const dim3 block(kWarp * kWarpsPerBlock);
  at::Tensor bad = at::zeros({1}, indices.options().dtype(at::kInt));
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "tbe_linearize_cuda", [&] {
    tbe_linearize_kernel<index_t><<<blocks_for(s.T * s.B, kWarpsPerBlock), block, 0, stream>>>(
        table_offsets.data_ptr<int64_t>(), indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(), s.T, s.B,
        s.R, s.nnz, bag_of.data_ptr<int64_t>(), row_of.data_ptr<int64_t>(), bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Invalid input must raise before anything is sorted or updated.
  raise_if_bad(bad, table_offsets, indices, offsets, s);
  // Stable: equal rows keep position order, which fixes the summation order.
  at::Tensor sorted_rows, order;
  std::tie(sorted_rows, order) = at::sort(row_of, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor flags = at::empty({s.nnz}, long_opts.dtype(at::kChar));
  chunk_flags_kernel<<<blocks_for(s.nnz, 256), 256, 0, stream>>>(sorted_rows.data_ptr<int64_t>(), s.nnz,
                                                                  flags.data_ptr<int8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor chunk_start = at::nonzero(flags).view({-1}).contiguous();
  const int64_t chunks = chunk_start.numel();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "tbe_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "tbe_backward_cuda", [&] {
      const scalar_t* ps = psw.defined() ? psw.data_ptr<scalar_t>() : nullptr;
      if (psw.defined()) {
        tbe_psw_grad_kernel<scalar_t, index_t><<<blocks_for(s.nnz, kWarpsPerBlock), block, 0, stream>>>(
            grad_output.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bag_of.data_ptr<int64_t>(),
            row_of.data_ptr<int64_t>(), s.nnz, s.T, s.B, s.D, grad_psw.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (chunks == 0) return;
      at::Tensor partial = at::empty({chunks, s.D}, weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      const dim3 grid(blocks_for(chunks, kWarpsPerBlock));
      tbe_chunk_sum_kernel<scalar_t, index_t><<<grid, block, 0, stream>>>(
          grad_output.data_ptr<scalar_t>(), offsets.data_ptr<index_t>(), ps, bag_of.data_ptr<int64_t>(),
          order.data_ptr<int64_t>(), chunk_start.data_ptr<int64_t>(), chunks, s.nnz, s.T, s.B, s.D, mean,
          partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      tbe_row_update_kernel<scalar_t, kMode><<<grid, block, 0, stream>>>(
          partial.data_ptr<acc_t>(), flags.data_ptr<int8_t>(), chunk_start.data_ptr<int64_t>(),
          sorted_rows.data_ptr<int64_t>(), chunks, s.D, dst.data_ptr<scalar_t>(), state, static_cast<acc_t>(lr),
          static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_psw;
}

std::tuple<at::Tensor, at::Tensor> tbe_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& weight_,
                                                     const at::Tensor& table_offsets_, const at::Tensor& indices_,
                                                     const at::Tensor& offsets_,
                                                     const std::optional<at::Tensor>& per_sample_weights,
                                                     std::string pooling) {
  const TbeShape s = check_tbe_args(weight_, table_offsets_, indices_, offsets_, per_sample_weights, pooling);
  check_grad_output(grad_output_, weight_, s);
  const c10::cuda::CUDAGuard guard(weight_.device());
  const bool mean = parse_pooling(pooling) == Pooling::kMean;
  const at::Tensor weight = weight_.contiguous(), table_offsets = table_offsets_.contiguous(),
                   indices = indices_.contiguous(), offsets = offsets_.contiguous(),
                   grad_output = grad_output_.contiguous();
  check_no_bags(offsets, s);
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  at::Tensor grad_weight = at::zeros_like(weight);
  at::Tensor grad_psw = backward_rows<RowUpdate::kDenseGrad>(grad_output, weight, table_offsets, indices, offsets,
                                                             psw, s, mean, grad_weight, nullptr, 0.0, 0.0);
  return {grad_weight, grad_psw};
}

at::Tensor tbe_backward_update_cuda(at::Tensor& weight, at::Tensor& state, const at::Tensor& grad_output_,
                                    const at::Tensor& table_offsets_, const at::Tensor& indices_,
                                    const at::Tensor& offsets_, const std::optional<at::Tensor>& per_sample_weights,
                                    std::string pooling, std::string optimizer, double lr, double eps) {
  const TbeShape s = check_tbe_args(weight, table_offsets_, indices_, offsets_, per_sample_weights, pooling);
  check_grad_output(grad_output_, weight, s);
  const Optimizer opt = check_optimizer(optimizer, state, weight);
  UNIREC_CHECK(weight.is_contiguous(), "weight must be contiguous to be updated in place");
  const c10::cuda::CUDAGuard guard(weight.device());
  const bool mean = parse_pooling(pooling) == Pooling::kMean;
  const at::Tensor table_offsets = table_offsets_.contiguous(), indices = indices_.contiguous(),
                   offsets = offsets_.contiguous(), grad_output = grad_output_.contiguous();
  check_no_bags(offsets, s);
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  if (opt == Optimizer::kRowwiseAdagrad) {
    return backward_rows<RowUpdate::kRowwiseAdagrad>(grad_output, weight, table_offsets, indices, offsets, psw, s,
                                                     mean, weight, state.data_ptr<float>(), lr, eps);
  }
  return backward_rows<RowUpdate::kSgd>(grad_output, weight, table_offsets, indices, offsets, psw, s, mean, weight,
                                        nullptr, lr, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(unirec, CUDA, m) {
  m.impl("tbe_forward", &tbe_forward_cuda);
  m.impl("tbe_backward", &tbe_backward_cuda);
  m.impl("tbe_backward_update_", &tbe_backward_update_cuda);
}

}  // namespace unirec
