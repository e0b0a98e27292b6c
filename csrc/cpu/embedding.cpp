// Table-batched embedding bags on the CPU: OpenMP over bags (forward) and over
// unique rows (backward), inner loops over D that the compiler vectorises.
//
// The backward groups index positions by their row with a stable sort, then
// sums each row's contributions in position order: no two threads ever write
// the same row, so the result is deterministic and race-free.
//
// The forward's pooling kernels, built once per instruction set, live in
// embedding_pool_<isa>.cpp (declared in embedding_pool.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>  // new_empty: lighter than at::empty's headers
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "embedding_pool.h"
#include "unirec/cpu_features.h"
#include "unirec/embedding.h"

namespace unirec {
namespace {

// Bags per parallel task: small bags are cheap, so hand out several at once.
constexpr int64_t kBagGrain = 16;

at::Tensor tbe_forward_cpu(const at::Tensor& weight_, const at::Tensor& table_offsets_, const at::Tensor& indices_,
                           const at::Tensor& offsets_, const std::optional<at::Tensor>& per_sample_weights,
                           std::string pooling) {
  const TbeShape s = check_tbe_args(weight_, table_offsets_, indices_, offsets_, per_sample_weights, pooling);
  const bool mean = parse_pooling(pooling) == Pooling::kMean;
  const at::Tensor weight = weight_.contiguous(), table_offsets = table_offsets_.contiguous(),
                   indices = indices_.contiguous(), offsets = offsets_.contiguous();
  check_tbe_offsets(table_offsets, offsets, s);
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  at::Tensor out = weight.new_empty({s.B, s.T, s.D});
  if (out.numel() == 0) {  // D = 0 reads no rows, but a bad index still raises
    check_tbe_indices(table_offsets, indices, offsets, s);
    return out;
  }
  const CpuIsa isa = cpu_isa();
  std::atomic<bool> bad_index{false};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "tbe_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "tbe_forward_cpu", [&] {
      const scalar_t* w = weight.data_ptr<scalar_t>();
      const scalar_t* ps = psw.defined() ? psw.data_ptr<scalar_t>() : nullptr;
      const int64_t* toff = table_offsets.data_ptr<int64_t>();
      const index_t* idx = indices.data_ptr<index_t>();
      const index_t* off = offsets.data_ptr<index_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      const int64_t D = s.D;
      const int64_t nnz = off[s.T * s.B];
      const PoolBagsFn<scalar_t, index_t> pool = isa == CpuIsa::kAvx512 ? pool_bags_avx512<scalar_t, acc_t, index_t>()
                                                 : isa == CpuIsa::kAvx2
                                                     ? pool_bags_avx2<scalar_t, acc_t, index_t>()
                                                     : pool_bags_baseline<scalar_t, acc_t, index_t>();
      at::parallel_for(0, s.T * s.B, kBagGrain, [&](int64_t begin, int64_t end) {
        // Runs of bags of one table: bag t*B + b is sample b of table t.
        for (int64_t first = begin; first < end;) {
          const int64_t t = first / s.B, b = first % s.B, nbags = std::min(end, (t + 1) * s.B) - first;
          const scalar_t* table = w + toff[t] * D;
          const int64_t rows = toff[t + 1] - toff[t];
          scalar_t* dst = o + (b * s.T + t) * D;
          const int64_t done = pool(table, rows, idx, off + first, nbags, ps, mean, nnz, D, dst, s.T * D);
          if (done < nbags) {
            bad_index = true;
            return;
          }
          first += nbags;
        }
      });
    });
  });
  if (bad_index) check_tbe_indices(table_offsets, indices, offsets, s);  // raises, naming the index
  return out;
}

// The index positions grouped by row: segment g holds the positions
// order[seg[g] : seg[g+1]] (ascending), all looking up row rows[g].
struct RowGroups {
  std::vector<int64_t> bag_of;  // [nnz] position -> bag t*B + b
  std::vector<int64_t> row_of;  // [nnz] position -> row of weight
  std::vector<int64_t> order;   // [nnz] positions sorted by row, stable
  std::vector<int64_t> seg;     // [segments + 1]
  std::vector<int64_t> rows;    // [segments] the row of each segment, ascending
};

// Stable LSD radix sort of positions by row, 11 bits a pass: a handful of
// linear passes instead of a comparison sort, and the stable order fixes the
// summation order of every row's gradient.
void sort_positions_by_row(const std::vector<int64_t>& row_of, int64_t R, std::vector<int64_t>& order) {
  const int64_t n = static_cast<int64_t>(row_of.size());
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  int bits = 1;
  while (bits < 63 && (int64_t(1) << bits) < R) ++bits;
  order.resize(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::vector<int64_t> keys(row_of), tmp_keys(n), tmp_order(n);
  std::vector<int64_t> count(kBuckets);
  for (int shift = 0; shift < bits; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(keys[i] >> shift) & (kBuckets - 1)];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t c0 = c;
      c = sum;
      sum += c0;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t dst = count[(keys[i] >> shift) & (kBuckets - 1)]++;
      tmp_keys[dst] = keys[i];
      tmp_order[dst] = order[i];
    }
    keys.swap(tmp_keys);
    order.swap(tmp_order);
  }
}

template <typename index_t>
RowGroups group_by_row(const at::Tensor& table_offsets, const at::Tensor& indices, const at::Tensor& offsets,
                       const TbeShape& s) {
  RowGroups g;
  g.bag_of.resize(s.nnz);
  g.row_of.resize(s.nnz);
  const int64_t* toff = table_offsets.data_ptr<int64_t>();
  const index_t* idx = indices.data_ptr<index_t>();
  const index_t* off = offsets.data_ptr<index_t>();
  at::parallel_for(0, s.T * s.B, kBagGrain * 4, [&](int64_t begin, int64_t end) {
    for (int64_t bag = begin; bag < end; ++bag) {
      const int64_t base = toff[bag / s.B];
      for (int64_t p = off[bag]; p < off[bag + 1]; ++p) {
        g.bag_of[p] = bag;
        g.row_of[p] = base + static_cast<int64_t>(idx[p]);
      }
    }
  });
  sort_positions_by_row(g.row_of, s.R, g.order);
  g.seg.push_back(0);
  for (int64_t i = 0; i < s.nnz; ++i) {
    const int64_t row = g.row_of[g.order[i]];
    if (i > 0 && row != g.rows.back()) g.seg.push_back(i);
    if (i == 0 || row != g.rows.back()) g.rows.push_back(row);
  }
  g.seg.push_back(s.nnz);
  if (s.nnz == 0) g.seg.pop_back();
  return g;
}

// Sums the gradient of segment g's row into a (length D), in position order.
template <typename scalar_t, typename acc_t, typename index_t>
inline void row_gradient(const RowGroups& groups, int64_t g, const scalar_t* grad_out, const scalar_t* psw,
                         const index_t* off, const TbeShape& s, bool mean, acc_t* a) {
  const int64_t D = s.D;
  std::fill(a, a + D, acc_t(0));
  for (int64_t i = groups.seg[g]; i < groups.seg[g + 1]; ++i) {
    const int64_t p = groups.order[i];
    const int64_t bag = groups.bag_of[p];
    acc_t scale = psw ? static_cast<acc_t>(psw[p]) : acc_t(1);
    if (mean) scale /= static_cast<acc_t>(off[bag + 1] - off[bag]);
    const scalar_t* src = grad_out + ((bag % s.B) * s.T + bag / s.B) * D;
    for (int64_t d = 0; d < D; ++d) a[d] += scale * static_cast<acc_t>(src[d]);
  }
}

// d loss / d per_sample_weights[p] = <grad_output[b, t], weight[row_of[p]]>.
template <typename scalar_t, typename acc_t>
at::Tensor psw_gradient(const at::Tensor& grad_output, const at::Tensor& weight, const RowGroups& groups,
                        const TbeShape& s) {
  at::Tensor grad = weight.new_empty({s.nnz});
  const scalar_t* go = grad_output.data_ptr<scalar_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  scalar_t* gp = grad.data_ptr<scalar_t>();
  const int64_t D = s.D;
  at::parallel_for(0, s.nnz, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t bag = groups.bag_of[p];
      const scalar_t* g = go + ((bag % s.B) * s.T + bag / s.B) * D;
      const scalar_t* row = w + groups.row_of[p] * D;
      acc_t dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(g[d]) * static_cast<acc_t>(row[d]);
      gp[p] = static_cast<scalar_t>(dot);
    }
  });
  return grad;
}

// A dense gradient of a large table is written once per step; on a fresh
// allocation 4 KiB page faults cost more than the writes themselves.
at::Tensor empty_dense_gradient(const at::Tensor& weight) {
  at::Tensor out = weight.new_empty(weight.sizes());  // contiguous
  advise_huge_pages(out.data_ptr(), static_cast<int64_t>(out.nbytes()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> tbe_backward_cpu(const at::Tensor& grad_output_, const at::Tensor& weight_,
                                                    const at::Tensor& table_offsets_, const at::Tensor& indices_,
                                                    const at::Tensor& offsets_,
                                                    const std::optional<at::Tensor>& per_sample_weights,
                                                    std::string pooling) {
  const TbeShape s = check_tbe_args(weight_, table_offsets_, indices_, offsets_, per_sample_weights, pooling);
  check_grad_output(grad_output_, weight_, s);
  const bool mean = parse_pooling(pooling) == Pooling::kMean;
  const at::Tensor weight = weight_.contiguous(), table_offsets = table_offsets_.contiguous(),
                   indices = indices_.contiguous(), offsets = offsets_.contiguous(),
                   grad_output = grad_output_.contiguous();
  check_tbe_values(table_offsets, indices, offsets, s);
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  at::Tensor grad_weight = empty_dense_gradient(weight);
  at::Tensor grad_psw = weight.new_empty({0});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "tbe_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "tbe_backward_cpu", [&] {
      const RowGroups groups = group_by_row<index_t>(table_offsets, indices, offsets, s);
      const scalar_t* go = grad_output.data_ptr<scalar_t>();
      const scalar_t* ps = psw.defined() ? psw.data_ptr<scalar_t>() : nullptr;
      const index_t* off = offsets.data_ptr<index_t>();
      scalar_t* gw = grad_weight.data_ptr<scalar_t>();
      const int64_t D = s.D;
      // One pass over all rows writes each exactly once: the summed gradient
      // of a used row, zeros elsewhere. Threads own disjoint row ranges.
      at::parallel_for(0, s.R, 2048, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(D);
        int64_t g = std::lower_bound(groups.rows.begin(), groups.rows.end(), begin) - groups.rows.begin();
        const int64_t segments = static_cast<int64_t>(groups.rows.size());
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* dst = gw + r * D;
          if (g < segments && groups.rows[g] == r) {
            row_gradient<scalar_t, acc_t, index_t>(groups, g++, go, ps, off, s, mean, acc.data());
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
          } else {
            std::fill(dst, dst + D, scalar_t(0));
          }
        }
      });
      if (psw.defined()) grad_psw = psw_gradient<scalar_t, acc_t>(grad_output, weight, groups, s);
    });
  });
  return {grad_weight, grad_psw};
}

at::Tensor tbe_backward_update_cpu(at::Tensor& weight, at::Tensor& state, const at::Tensor& grad_output_,
                                   const at::Tensor& table_offsets_, const at::Tensor& indices_,
                                   const at::Tensor& offsets_, const std::optional<at::Tensor>& per_sample_weights,
                                   std::string pooling, std::string optimizer, double lr, double eps) {
  const TbeShape s = check_tbe_args(weight, table_offsets_, indices_, offsets_, per_sample_weights, pooling);
  check_grad_output(grad_output_, weight, s);
  const Optimizer opt = check_optimizer(optimizer, state, weight);
  UNIREC_CHECK(weight.is_contiguous(), "weight must be contiguous to be updated in place");
  const bool mean = parse_pooling(pooling) == Pooling::kMean;
  const at::Tensor table_offsets = table_offsets_.contiguous(), indices = indices_.contiguous(),
                   offsets = offsets_.contiguous(), grad_output = grad_output_.contiguous();
  check_tbe_values(table_offsets, indices, offsets, s);
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  at::Tensor grad_psw = weight.new_empty({0});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "tbe_backward_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "tbe_backward_update_cpu", [&] {
      const RowGroups groups = group_by_row<index_t>(table_offsets, indices, offsets, s);
      // The per-sample-weight gradient needs the weights before the update.
      if (psw.defined()) grad_psw = psw_gradient<scalar_t, acc_t>(grad_output, weight, groups, s);
      const scalar_t* go = grad_output.data_ptr<scalar_t>();
      const scalar_t* ps = psw.defined() ? psw.data_ptr<scalar_t>() : nullptr;
      const index_t* off = offsets.data_ptr<index_t>();
      scalar_t* w = weight.data_ptr<scalar_t>();
      float* st = opt == Optimizer::kRowwiseAdagrad ? state.data_ptr<float>() : nullptr;
      const int64_t D = s.D;
      const acc_t step = static_cast<acc_t>(lr), epsilon = static_cast<acc_t>(eps);
      // Only the used rows are visited; each by one thread.
      at::parallel_for(0, static_cast<int64_t>(groups.rows.size()), 64, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(D);
        acc_t* a = acc.data();
        for (int64_t g = begin; g < end; ++g) {
          row_gradient<scalar_t, acc_t, index_t>(groups, g, go, ps, off, s, mean, a);
          const int64_t row = groups.rows[g];
          acc_t mult = step;
          if (st) {
            // Row-wise Adagrad (FBGEMM): one accumulator per row, the mean of g^2.
            acc_t sq = 0;
            for (int64_t d = 0; d < D; ++d) sq += a[d] * a[d];
            const acc_t h = static_cast<acc_t>(st[row]) + sq / static_cast<acc_t>(D);
            st[row] = static_cast<float>(h);
            mult = step / (std::sqrt(h) + epsilon);
          }
          scalar_t* dst = w + row * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(dst[d]) - mult * a[d]);
        }
      });
    });
  });
  return grad_psw;
}

}  // namespace

bool advise_huge_pages(void* data, int64_t nbytes) {
#ifdef __linux__
  static const bool enabled = [] {
    const char* flag = std::getenv("UNIREC_HUGE_PAGES");
    return flag == nullptr || std::string(flag) != "0";
  }();
  constexpr uintptr_t kHuge = 2 << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + nbytes) & ~(kHuge - 1);
  if (!enabled || last < first + 8 * kHuge) return false;
  return madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) == 0;
#else
  (void)data;
  (void)nbytes;
  return false;
#endif
}

TORCH_LIBRARY_IMPL(unirec, CPU, m) {
  m.impl("tbe_forward", &tbe_forward_cpu);
  m.impl("tbe_backward", &tbe_backward_cpu);
  m.impl("tbe_backward_update_", &tbe_backward_update_cpu);
}

}  // namespace unirec
