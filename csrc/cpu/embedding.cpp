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
#include <limits>
#include <string>
#include <type_traits>
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

// The positions of one table that look up rows lo..hi-1 of it, grouped by
// row. Tables sort independently: the table's positions are first..first+n-1
// (bags t*B .. t*B+B-1) and its ids are its own rows, so every number here is
// table-local and pos_t is int32 wherever that fits. Item m is the m-th such
// position in position order: pos[m] (from first) in bag sample[m]. Segment g
// holds the items order[seg[g] : seg[g+1]] (ascending), all looking up row
// rows[g].
template <typename pos_t>
struct TableGroups {
  std::vector<pos_t> pos;     // [items] position - first
  std::vector<pos_t> sample;  // [items] the sample b of the item's bag
  std::vector<pos_t> order;   // [items] items sorted by row, stable
  std::vector<pos_t> seg;     // [segments + 1]
  std::vector<pos_t> rows;    // [segments] table-local row of each segment, ascending
  std::vector<pos_t> keys, tmp_keys, tmp_order;  // sort scratch, kept to be reused
};

// Groups the positions of table t that look up rows [lo, hi) by row: a stable
// LSD radix sort on row - lo (at most 11 bits a pass, the passes of even
// width so that 10^5 rows take two of 9 bits whose counts stay in L1), then
// one walk that cuts the sorted run into segments.
template <typename pos_t, typename index_t>
void group_table(const index_t* idx, const index_t* off, const TbeShape& s, int64_t t, int64_t lo, int64_t hi,
                 TableGroups<pos_t>& g) {
  using key_t = std::make_unsigned_t<pos_t>;
  const int64_t first = off[t * s.B], n = off[(t + 1) * s.B] - first;
  g.pos.resize(n);
  g.sample.resize(n);
  g.keys.resize(n);
  int64_t items = 0;
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t p = off[t * s.B + b]; p < off[t * s.B + b + 1]; ++p) {
      // Written always, kept by advancing: no branch to mispredict on ids in
      // random order.
      const int64_t row = static_cast<int64_t>(idx[p]);
      g.pos[items] = static_cast<pos_t>(p - first);
      g.sample[items] = static_cast<pos_t>(b);
      g.keys[items] = static_cast<pos_t>(row - lo);
      items += (row >= lo) & (row < hi);
    }
  }
  g.pos.resize(items);
  g.sample.resize(items);
  g.keys.resize(items);
  g.order.resize(items);
  g.tmp_keys.resize(items);
  g.tmp_order.resize(items);
  for (int64_t i = 0; i < items; ++i) g.order[i] = static_cast<pos_t>(i);
  int bits = 0;
  while (bits < 63 && (int64_t(1) << bits) < hi - lo) ++bits;
  const int passes = (bits + 10) / 11, width = passes > 0 ? (bits + passes - 1) / passes : 0;
  const int64_t buckets = int64_t(1) << width;
  // The counts of every pass in one read of the keys.
  std::vector<int64_t> count(passes * buckets, 0);
  for (int64_t i = 0; i < items; ++i) {
    const key_t k = static_cast<key_t>(g.keys[i]);
    for (int q = 0; q < passes; ++q) ++count[q * buckets + ((k >> (q * width)) & (buckets - 1))];
  }
  for (int q = 0; q < passes; ++q) {
    int64_t* c = count.data() + q * buckets;
    int64_t sum = 0;
    for (int64_t j = 0; j < buckets; ++j) {
      const int64_t c0 = c[j];
      c[j] = sum;
      sum += c0;
    }
    for (int64_t i = 0; i < items; ++i) {
      const key_t k = static_cast<key_t>(g.keys[i]);
      const int64_t dst = c[(k >> (q * width)) & (buckets - 1)]++;
      g.tmp_keys[dst] = g.keys[i];
      g.tmp_order[dst] = g.order[i];
    }
    g.keys.swap(g.tmp_keys);
    g.order.swap(g.tmp_order);
  }
  g.seg.clear();
  g.rows.clear();
  for (int64_t i = 0; i < items; ++i) {
    if (i == 0 || g.keys[i] != g.keys[i - 1]) {
      g.seg.push_back(static_cast<pos_t>(i));
      g.rows.push_back(static_cast<pos_t>(g.keys[i] + lo));
    }
  }
  g.seg.push_back(static_cast<pos_t>(items));
}

// What the fused update reads and writes, shared by every table.
template <typename scalar_t, typename index_t>
struct UpdateArgs {
  const scalar_t* grad_out;  // [B, T, D]
  const scalar_t* psw;       // [nnz] or null
  const index_t* off;
  const int64_t* toff;
  scalar_t* weight;
  float* state;  // row-wise Adagrad's, or null for SGD
  TbeShape s;
  bool mean;
  at::opmath_type<scalar_t> lr, eps;
};

// How many segments ahead the update asks for a row, in two steps as the
// forward does (embedding_kernels.h): far ones into L2, which holds no L1
// miss slot and so keeps many random rows coming from memory, near ones on
// into L1. Asking for 16 rows straight into L1 stalled on the prefetches.
constexpr int64_t kRowsNear = 8, kRowsFar = 32;

// Rows updated together. Each row's sum of squares is one serial chain (its
// order fixes the result), 4-cycle adds one after another; chains of
// different rows are independent, so stepping kRowLanes of them in lockstep
// keeps the adder busy.
constexpr int64_t kRowLanes = 8;

// Asks for row `row` of `table` (D values) and its optimizer state to be
// brought into the caches, kLevel as __builtin_prefetch's locality, for writing.
template <int kLevel, typename scalar_t>
inline void prefetch_update_row(const scalar_t* table, const float* state, int64_t row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(table + row * D);
  for (int64_t c = 0; c < D * static_cast<int64_t>(sizeof(scalar_t)); c += 64) __builtin_prefetch(p + c, 1, kLevel);
  if (state) __builtin_prefetch(state + row, 1, kLevel);
}

// Sums the gradient of every segment of g (rows of table t), each in position
// order, and applies the optimizer step to its row.
template <typename scalar_t, typename index_t, typename pos_t>
void update_segments(const UpdateArgs<scalar_t, index_t>& u, const TableGroups<pos_t>& g, int64_t t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = u.s.D, T = u.s.T, B = u.s.B;
  const int64_t first = u.off[t * B];
  scalar_t* table = u.weight + u.toff[t] * D;
  float* state = u.state ? u.state + u.toff[t] : nullptr;
  const int64_t segments = static_cast<int64_t>(g.rows.size());
  std::vector<acc_t> acc(kRowLanes * D);
  for (int64_t j0 = 0; j0 < segments; j0 += kRowLanes) {
    const int64_t lanes = std::min(kRowLanes, segments - j0);
    for (int64_t j = j0 + kRowsFar; j < std::min(j0 + kRowsFar + lanes, segments); ++j) {
      prefetch_update_row<2>(table, state, g.rows[j], D);
    }
    for (int64_t j = j0 + kRowsNear; j < std::min(j0 + kRowsNear + lanes, segments); ++j) {
      prefetch_update_row<3>(table, state, g.rows[j], D);
    }
    for (int64_t q = 0; q < lanes; ++q) {
      acc_t* a = acc.data() + q * D;
      std::fill(a, a + D, acc_t(0));
      for (int64_t i = g.seg[j0 + q]; i < g.seg[j0 + q + 1]; ++i) {
        const int64_t m = g.order[i], b = g.sample[m];
        acc_t scale = u.psw ? static_cast<acc_t>(u.psw[first + g.pos[m]]) : acc_t(1);
        if (u.mean) scale /= static_cast<acc_t>(u.off[t * B + b + 1] - u.off[t * B + b]);
        const scalar_t* src = u.grad_out + (b * T + t) * D;
        for (int64_t d = 0; d < D; ++d) a[d] += scale * static_cast<acc_t>(src[d]);
      }
    }
    acc_t mult[kRowLanes];
    std::fill(mult, mult + kRowLanes, u.lr);
    // With D = 0 there is no gradient to average: the state stays as it is.
    if (state && D > 0) {
      // Row-wise Adagrad (FBGEMM): one accumulator per row, the mean of g^2.
      acc_t sq[kRowLanes] = {};
      if (lanes == kRowLanes) {
        for (int64_t d = 0; d < D; ++d) {
#pragma GCC unroll 8
          for (int64_t q = 0; q < kRowLanes; ++q) sq[q] += acc[q * D + d] * acc[q * D + d];
        }
      } else {
        for (int64_t q = 0; q < lanes; ++q) {
          for (int64_t d = 0; d < D; ++d) sq[q] += acc[q * D + d] * acc[q * D + d];
        }
      }
      for (int64_t q = 0; q < lanes; ++q) {
        const int64_t row = g.rows[j0 + q];
        const acc_t h = static_cast<acc_t>(state[row]) + sq[q] / static_cast<acc_t>(D);
        state[row] = static_cast<float>(h);
        mult[q] = u.lr / (std::sqrt(h) + u.eps);
      }
    }
    for (int64_t q = 0; q < lanes; ++q) {
      const acc_t* a = acc.data() + q * D;
      scalar_t* dst = table + static_cast<int64_t>(g.rows[j0 + q]) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(dst[d]) - mult[q] * a[d]);
    }
  }
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
  at::Tensor grad_psw = psw.defined() ? weight.new_empty({s.nnz}) : weight.new_empty({0});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "tbe_backward_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "tbe_backward_update_cpu", [&] {
      const index_t* idx = indices.data_ptr<index_t>();
      const UpdateArgs<scalar_t, index_t> u{grad_output.data_ptr<scalar_t>(),
                                            psw.defined() ? psw.data_ptr<scalar_t>() : nullptr,
                                            offsets.data_ptr<index_t>(),
                                            table_offsets.data_ptr<int64_t>(),
                                            weight.data_ptr<scalar_t>(),
                                            opt == Optimizer::kRowwiseAdagrad ? state.data_ptr<float>() : nullptr,
                                            s,
                                            mean,
                                            static_cast<acc_t>(lr),
                                            static_cast<acc_t>(eps)};
      scalar_t* gp = psw.defined() ? grad_psw.data_ptr<scalar_t>() : nullptr;
      // Each task groups and updates the rows [lo, hi) of one table; no two
      // tasks share a row. Fewer tables than threads are cut into row ranges
      // so that every thread has work; each task then scans its whole table's
      // ids (more ranges than threads: slower on one 10^5-row table).
      const int64_t threads = at::get_num_threads();
      const int64_t parts = (threads + s.T - 1) / std::max<int64_t>(s.T, 1);
      auto run = [&](auto pos) {
        using pos_t = decltype(pos);
        at::parallel_for(0, s.T * parts, 1, [&](int64_t begin, int64_t end) {
          TableGroups<pos_t> g;
          for (int64_t task = begin; task < end; ++task) {
            const int64_t t = task / parts, part = task % parts, rows = u.toff[t + 1] - u.toff[t];
            group_table<pos_t>(idx, u.off, s, t, rows * part / parts, rows * (part + 1) / parts, g);
            if (gp) {
              // The per-sample-weight gradient reads these rows before their update.
              const int64_t first = u.off[t * s.B], D = s.D;
              for (size_t m = 0; m < g.pos.size(); ++m) {
                const scalar_t* go = u.grad_out + (static_cast<int64_t>(g.sample[m]) * s.T + t) * D;
                const scalar_t* row = u.weight + (u.toff[t] + static_cast<int64_t>(idx[first + g.pos[m]])) * D;
                acc_t dot = 0;
                for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(go[d]) * static_cast<acc_t>(row[d]);
                gp[first + g.pos[m]] = static_cast<scalar_t>(dot);
              }
            }
            update_segments(u, g, t);
          }
        });
      };
      constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
      if (std::max({s.nnz, s.R, s.B}) <= kInt32Max) {
        run(int32_t{});
      } else {
        run(int64_t{});
      }
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
